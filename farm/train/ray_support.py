"""What a recipe needs when it runs inside a Ray Train worker: checkpoints and live progress.

Checkpoints are reported with ``ray.train.report`` so they land in the run's
``storage_path`` (a shared folder or ``s3://``), where a restarted worker group (after a
worker dies) or a re-run of the same sweep finds them through ``ray.train.get_checkpoint``.
Progress goes to a ``ProgressBoard`` actor that the sweep's driver reads for its live view.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from farm.train.common import StepEvent, checkpoint_name

FINAL_ADAPTER = "adapter"
FINAL_RESULT = "result.json"


class RayCheckpoints:
    """Checkpoints through Ray Train: every worker reports, rank 0 attaches the files."""

    def __init__(self, keep: int, rank: int):
        self.keep, self.rank = keep, rank

    @contextmanager
    def latest(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def save(self, write: Callable[[Path], None], step: int, metrics: dict) -> Path | None:
        self._report(write, step, metrics)
        return None

    def finish(self, out: Path, write: Callable[[Path], None], step: int, metrics: dict) -> None:
        """Report the final checkpoint: resumable state plus ``adapter/`` and ``result.json``."""

        def write_final(folder: Path) -> None:
            shutil.copytree(out / FINAL_ADAPTER, folder / FINAL_ADAPTER)
            shutil.copy2(out / FINAL_RESULT, folder / FINAL_RESULT)
            write(folder)  # state.json last, as for every checkpoint

        self._report(write_final, step, {**metrics, "final": True})

    def _report(self, write: Callable[[Path], None], step: int, metrics: dict) -> None:
        import ray.train

        # Every worker must call report the same number of times (it is a barrier);
        # only rank 0 hands over files.
        if self.rank != 0:
            ray.train.report(metrics)
            return
        folder = Path(tempfile.mkdtemp(prefix="farm-ckpt-"))
        try:
            write(folder)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=checkpoint_name(step))
        finally:
            shutil.rmtree(folder, ignore_errors=True)


class BoardProgress:
    """Sends rank 0's step events to the sweep's ``ProgressBoard`` actor (fire and forget)."""

    def __init__(self, board, tenant: str, min_interval_s: float = 1.0):
        self.board, self.tenant = board, tenant
        self.min_interval_s = min_interval_s
        self._last = 0.0

    def on_step(self, event: StepEvent) -> None:
        import ray.train

        if self.board is None or ray.train.get_context().get_world_rank() != 0:
            return
        now = time.time()
        if event.step == 1 or event.step == event.max_steps or now - self._last >= self.min_interval_s:
            self._last = now
            self.board.update.remote(self.tenant, {
                "step": event.step, "max_steps": event.max_steps, "loss": event.loss,
                "tokens_per_s": event.tokens_per_s, "eta_s": event.eta_s, "time": now})
