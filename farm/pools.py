"""Warm pools' shared queues: tenants wait here until a pool takes them.

A pool is a long-running Ray Train worker that loads the base once and takes tenants as its
slots free up (today: a co-training pack). Every pool of a group (same base, row layout, method
and precision) takes from the group's one ``TenantQueue``, so a pool whose tenants finish early
takes the next waiting tenant instead of idling while another pool still has a list. The queue
remembers which pool took which tenant: a pool that Ray Train restarts after its worker died
resumes exactly those (from their checkpoints on storage) before it takes more.

A queue is open while tenants may still arrive (``add``) and closed once none will: a pool
whose slots are all free waits up to its idle time for new tenants on an open queue, then ends
(scales to zero, so an autoscaling cluster gets the devices back); on a closed queue it ends at
once. A sweep knows all its tenants up front and closes its queues when it makes them.

``TenantQueue`` is a plain class, tested without Ray; the sweep runs it as a Ray actor
(``queue_actor``), one per group, owned by the sweep's driver.
"""

from __future__ import annotations

from collections import deque


class TenantQueue:
    """Jobs (``TenantJob`` dicts) waiting for a pool, in the order they should start."""

    def __init__(self, jobs: list[dict], closed: bool = False):
        self.waiting: deque[dict] = deque(jobs)
        self.jobs = {job["tenant"]: job for job in jobs}
        self.closed = closed
        self.taken: dict[str, str] = {}   # tenant -> the pool that took it
        self.done: set[str] = set()
        self.errors: dict[str, str] = {}  # tenant -> why it did not finish
        self.statuses: dict[str, str] = {}  # tenant -> invalid (its data, refused up front) | failed (in training)

    def add(self, jobs: list[dict]) -> None:
        """Tenants that arrive while the pools run (refused once the queue is closed)."""
        if self.closed:
            raise ValueError("the queue is closed: no tenant may be added")
        for job in jobs:
            if job["tenant"] in self.jobs:
                raise ValueError(f"tenant {job['tenant']!r} is already in this queue")
            self.jobs[job["tenant"]] = job
            self.waiting.append(job)

    def close(self) -> None:
        """No more tenants will come: pools end once they have nothing left."""
        self.closed = True

    def is_closed(self) -> bool:
        return self.closed

    def take(self, pool: str, count: int) -> list[dict]:
        """Up to ``count`` waiting jobs for ``pool`` (fewer, or none, when the queue runs dry)."""
        out = []
        while self.waiting and len(out) < count:
            job = self.waiting.popleft()
            self.taken[job["tenant"]] = pool
            out.append(job)
        return out

    def resume(self, pool: str) -> list[dict]:
        """The jobs ``pool`` took and did not finish or fail: a restarted pool trains them first."""
        return [self.jobs[t] for t, owner in self.taken.items()
                if owner == pool and t not in self.done and t not in self.errors]

    def finish(self, tenant: str) -> None:
        self.done.add(tenant)

    def fail(self, tenant: str, error: str, status: str = "failed") -> None:
        self.errors[tenant] = error
        self.statuses[tenant] = status

    def state(self) -> dict:
        """Who took what, what finished and failed, what still waits (for the driver's report)."""
        return {"taken": dict(self.taken), "done": sorted(self.done), "errors": dict(self.errors),
                "statuses": dict(self.statuses), "waiting": [job["tenant"] for job in self.waiting]}


def queue_actor(jobs: list[dict], closed: bool = False):
    """A ``TenantQueue`` as a Ray actor (no CPU: it only hands out names)."""
    import ray

    return ray.remote(num_cpus=0)(TenantQueue).remote(jobs, closed)
