"""Shared by the training tests: a single-tenant pool's loop run under a real Ray Train
``TorchTrainer`` (gloo on CPU), as the sweep starts it, and the mid-training data fault."""

from __future__ import annotations

from pathlib import Path


def fit_pool(loop, jobs: list, folder: Path, workers: int = 2, max_failures: int = 0,
             extra: dict | None = None) -> dict:
    """Train ``jobs`` (``TenantJob``s) in one pool of ``workers`` CPU workers running ``loop``
    (``farm.train.adapter.ray_pool_loop`` or a wrapper of it, which gets ``extra`` in its
    config too); checkpoints and final adapters go to ``folder/pooled/<tenant>/``. Returns the
    loop's return value (rank 0's)."""
    from farm.pools import queue_actor
    from farm.trainers import cpu_workers

    queue = queue_actor([job.model_dump() for job in jobs], closed=True)
    return cpu_workers(workers).trainer(
        loop, {"queue": queue, "pool": "pool-1", "board": None, "tenants_dir": str(folder / "pooled"), **(extra or {})},
        "pool", str(folder / "ray"), max_retries=max_failures).fit().return_value


class Vanishing:
    """A tenant's training rows that stop being readable after ``good`` batches (as if its
    spilled data vanished mid-training): the fault the pool and co-training tests inject."""

    def __init__(self, rows, good: int):
        self.rows, self.left = rows, good

    def __len__(self) -> int:
        return len(self.rows)

    def __getattr__(self, name):
        return getattr(self.rows, name)

    def batch(self, indices):
        if self.left == 0:
            raise OSError("No such file or directory: 'ids.i32'")
        self.left -= 1
        return self.rows.batch(indices)
