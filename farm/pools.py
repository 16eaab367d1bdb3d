"""Warm pools' shared queues: tenants wait here until a pool takes them.

A pool is a long-running Ray Train ``TorchTrainer`` whose workers load the base once and take
tenants as their slots free up: a co-training pool (``farm.train.cotrain``: several LoRA tenants
share each step) or a single-tenant pool (``farm.train.adapter.ray_pool_loop``: any method, one
tenant at a time, on one worker or data parallel on several). Every pool of a group (pools
that can train the same tenants: same base, row layout, method and precision for co-training;
the same resource shape for single-tenant pools) takes from the group's one ``TenantQueue``, so
a pool whose tenants finish early takes the next waiting tenant instead of idling while another
pool still has a list. The queue
remembers which pool took which tenant: a pool that Ray Train restarts after its worker died
resumes exactly those (from their checkpoints on storage) before it takes more.

A queue is open while tenants may still arrive (``add``) and closed once none will: a pool
whose slots are all free waits up to its idle time for new tenants on an open queue, then ends
(scales to zero, so an autoscaling cluster gets the devices back); on a closed queue it ends at
once. A sweep starts its pools before it has read any tenant's data, adds each tenant to its
queue as its data passes the checks, and closes the queues once every tenant is checked: its
pools wait for that (no idle limit) and end when their queue is closed and empty.

``TenantQueue`` is a plain class, tested without Ray; the sweep runs it as a Ray actor
(``queue_actor``), one per group, owned by the sweep's driver.
"""

from __future__ import annotations

import time
from collections import deque

from farm.spec import TenantJob


def run_key(job: dict) -> str:
    """A queued ``TenantJob`` dict's name: its ``run_id`` (a service's job id) or its tenant."""
    return job.get("run_id") or job["tenant"]


class TenantQueue:
    """Jobs (``TenantJob`` dicts) waiting for a pool, in the order they should start.

    Jobs are named by ``run_key``: the tenant in a sweep, the job id in the fine-tuning service
    (where one tenant may have several jobs). The method arguments called ``tenant`` are that key.
    """

    def __init__(self, jobs: list[dict], closed: bool = False):
        self.waiting: deque[dict] = deque(jobs)
        self.jobs = {run_key(job): job for job in jobs}
        self.closed = closed
        self.taken: dict[str, str] = {}   # tenant -> the pool that took it
        self.taken_at: dict[str, float] = {}  # tenant -> when (time.time()) its pool took it
        self.done: set[str] = set()
        self.errors: dict[str, str] = {}  # tenant -> why it did not finish
        self.statuses: dict[str, str] = {}  # tenant -> invalid (its data, refused up front) | failed (in training)
        self.cancelled: set[str] = set()  # asked to stop (the service's cancel): its pool stops it at its next step

    def add(self, jobs: list[dict]) -> None:
        """Tenants that arrive while the pools run (refused once the queue is closed)."""
        if self.closed:
            raise ValueError("the queue is closed: no tenant may be added")
        for job in jobs:
            if run_key(job) in self.jobs:
                raise ValueError(f"{run_key(job)!r} is already in this queue")
            self.jobs[run_key(job)] = job
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
            self.taken[run_key(job)] = pool
            self.taken_at[run_key(job)] = time.time()
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

    def cancel(self, tenant: str) -> None:
        """Stop a job: one still waiting leaves the queue at once, one being trained stops at
        its pool's next step (its pool then reports it with ``fail(..., "cancelled")``)."""
        if tenant not in self.jobs or tenant in self.done or tenant in self.errors:
            return
        self.cancelled.add(tenant)
        if tenant not in self.taken:
            self.waiting = deque(job for job in self.waiting if run_key(job) != tenant)
            self.fail(tenant, "cancelled", "cancelled")

    def is_cancelled(self, tenant: str) -> bool:
        return tenant in self.cancelled

    def forget(self, tenant: str) -> None:
        """Drop a finished or failed job from every record (a long-running service's queue
        would otherwise grow with every job it ever ran, and so would each ``state()``)."""
        if tenant not in self.done and tenant not in self.errors:
            return  # still waiting or training: its records are needed
        for record in (self.jobs, self.taken, self.taken_at, self.errors, self.statuses):
            record.pop(tenant, None)
        self.done.discard(tenant)
        self.cancelled.discard(tenant)

    def state(self) -> dict:
        """Who took what, what finished and failed, what still waits (for the driver's report)."""
        return {"taken": dict(self.taken), "taken_at": dict(self.taken_at), "done": sorted(self.done), "errors": dict(self.errors),
                "statuses": dict(self.statuses), "waiting": [run_key(job) for job in self.waiting]}


def queue_actor(jobs: list[dict], closed: bool = False):
    """A ``TenantQueue`` as a Ray actor (no CPU: it only hands out names)."""
    import ray

    return ray.remote(num_cpus=0)(TenantQueue).remote(jobs, closed)


class QueueSource:
    """A pool's tenants, from its group's ``TenantQueue`` actor, as its worker sees them.

    First the tenants this pool took before a restart (they resume from their checkpoints),
    then new ones. A tenant whose final adapter is already on storage finished before the
    restart: it is marked done and skipped.
    """

    def __init__(self, queue, pool: str, tenants_dir: str, local: str, idle_s: float | None = 0.0,
                 poll_s: float = 0.5):
        self.queue, self.pool, self.tenants_dir, self.local = queue, pool, tenants_dir, local
        self.idle_s, self.poll_s = idle_s, poll_s
        self._resumed = False

    def wait_for_work(self) -> bool:
        """With every slot free: wait up to the idle time (``idle_s``; None: until the queue is
        closed) for tenants to arrive on an open queue; True when some did (the caller takes
        them), False when the pool should end."""
        import ray

        deadline = None if self.idle_s is None else time.monotonic() + self.idle_s
        while True:
            state = ray.get(self.queue.state.remote())
            if state["waiting"]:
                return True
            if ray.get(self.queue.is_closed.remote()) or (deadline is not None and time.monotonic() >= deadline):
                return False
            time.sleep(self.poll_s)

    def take(self, count: int) -> list[TenantJob]:
        import ray

        from farm.train.ray_support import final_checkpoint

        out: list[TenantJob] = []
        while len(out) < count:
            if not self._resumed:
                self._resumed = True
                raw = ray.get(self.queue.resume.remote(self.pool))
                if not raw:
                    continue  # nothing to resume: take new ones
            else:
                raw = ray.get(self.queue.take.remote(self.pool, count - len(out)))
                if not raw:
                    return out
            for job in raw:
                key = run_key(job)
                if final_checkpoint(f"{self.tenants_dir}/{key}") is not None:
                    self.queue.finish.remote(key)
                    continue
                out.append(TenantJob.model_validate(job).model_copy(update={"output_dir": f"{self.local}/{key}"}))
        return out

    def finished(self, tenant: str) -> None:
        self.queue.finish.remote(tenant)

    def failed(self, tenant: str, error: str, status: str = "failed") -> None:
        self.queue.fail.remote(tenant, error, status)

    def is_cancelled(self, tenant: str) -> bool:
        import ray

        return ray.get(self.queue.is_cancelled.remote(tenant))

    def next_job(self) -> TenantJob | None:
        """One tenant for a single-tenant pool: the next one to resume or take, waiting for
        arrivals as ``wait_for_work`` does; None when the pool should end."""
        while True:
            jobs = self.take(1)
            if jobs:
                return jobs[0]
            if not self.wait_for_work():
                return None
