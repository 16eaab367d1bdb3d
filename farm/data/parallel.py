"""Preparing batches on several processes, for datasets large enough to pay for them.

Parsing, the chat template (Python) and the tokenizer are most of the pipeline's CPU
(``farm.data.prepare``). ``BatchPreparer`` prepares the first ``POOL_AFTER_BATCHES`` batches in
this process, which is all a typical tenant has, and hands later batches round-robin to worker
processes. Results are read back in
submission order, so every policy downstream (bad records, too long, the split) sees the same
examples in the same order whether or not workers ran. At most ``IN_FLIGHT_PER_WORKER`` batches
per worker are outstanding, which bounds memory.

Workers are plain ``python -m farm.data.render_worker`` subprocesses talking length-prefixed pickles
over private pipes, not ``multiprocessing``: spawning with ``multiprocessing`` re-imports the
parent's ``__main__`` (a user's script, or Ray's worker entry point), and forking copies a
process that holds Ray, torch or tokenizer threads. A worker exits when its input closes, so
none outlives its parent.
"""

from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from farm.data.prepare import PreparedBatch, prepare_batch
from farm.data.render import Renderer, TokenizerParts

POOL_AFTER_BATCHES = 32   # batches prepared here before workers start (about a second of start-up each)
IN_FLIGHT_PER_WORKER = 2  # batches outstanding per worker: enough to keep it busy, few enough to bound memory
MAX_WORKERS = 8
WORKER_BYTES = 96 << 20  # a worker's resident memory before its batch (measured: about 80 MB)
RESULT_FD = "FARM_DATA_RESULT_FD"

Batch = Sequence[tuple[str, Any]]  # (location, raw record) pairs


def pipeline_workers() -> int:
    """Processes the data pipeline may use: the CPUs this process may run on, or fewer where the
    host says so (Ray sets OMP_NUM_THREADS to a worker's CPUs; FARM_DATA_WORKERS overrides)."""
    given = os.environ.get("FARM_DATA_WORKERS") or os.environ.get("OMP_NUM_THREADS")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        wanted = int(given) if given else cpus
    except ValueError:
        wanted = cpus
    return max(1, min(wanted, cpus, MAX_WORKERS))


def frame(obj: Any) -> bytes:
    """``obj`` pickled, after its length (8 bytes, little-endian)."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return len(payload).to_bytes(8, "little") + payload


def read_frame(stream) -> Any:
    """The next ``frame`` of ``stream``; ``EOFError`` at its end."""
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError
    size = int.from_bytes(header, "little")
    return pickle.loads(stream.read(size))


class _Worker:
    """One worker process; a thread writes its input so that a full pipe never blocks the reader."""

    def __init__(self, renderer: Renderer, parts: TokenizerParts):
        read_end, write_end = os.pipe()
        env = {**os.environ, RESULT_FD: str(write_end),
               # one thread per worker: the workers are the parallelism
               "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "farm.data.render_worker"], stdin=subprocess.PIPE,
                                        pass_fds=(write_end,), env=env)
        os.close(write_end)
        self.results = os.fdopen(read_end, "rb")
        self.outbox: queue.Queue[bytes | None] = queue.Queue()
        self.writer = threading.Thread(target=self._write, daemon=True)
        self.writer.start()
        self.outbox.put(frame(("init", parts, renderer.train_on, renderer.max_seq_len)))

    def _write(self) -> None:
        stdin = self.process.stdin
        while (payload := self.outbox.get()) is not None:
            try:
                stdin.write(payload)
                stdin.flush()
            except (BrokenPipeError, OSError):
                break  # the worker died; receive() reports it
        try:
            stdin.close()
        except OSError:
            pass

    def send(self, items: list, fmt: str) -> None:
        self.outbox.put(frame(("prepare", items, fmt)))

    def receive(self) -> PreparedBatch:
        try:
            status, value = read_frame(self.results)
        except EOFError:
            raise RuntimeError(f"a data pipeline worker exited (code {self.process.wait()})") from None
        if status != "ok":
            raise RuntimeError(f"a data pipeline worker failed: {value}")
        return value

    def stop(self) -> None:
        self.outbox.put(None)  # closes its input: the worker exits
        self.writer.join(timeout=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.results.close()


class BatchPreparer:
    """Prepares batches of records, in order, here or on worker processes (see module doc)."""

    def __init__(self, renderer: Renderer, workers: int | None = None):
        self.renderer = renderer
        self.workers = pipeline_workers() if workers is None else workers
        self.pool: list[_Worker] = []
        self.queue: deque[tuple[Batch, _Worker]] = deque()
        self.submitted = 0

    def submit(self, batch: Batch, fmt: str) -> Iterator[tuple[Batch, PreparedBatch]]:
        """Queue ``batch`` (records of schema ``fmt``); yield ``(batch, prepared)`` for every
        batch that is ready, oldest first."""
        self.submitted += 1
        items = [item for _, item in batch]
        if not self.pool and self.workers > 1 and self.submitted == POOL_AFTER_BATCHES + 1:
            # Workers rebuild a fast tokenizer from its parts; a slow (Python) one stays here.
            parts = self.renderer.parts()
            if parts is not None:
                self.pool = [_Worker(self.renderer, parts) for _ in range(self.workers)]
        if not self.pool:
            yield batch, prepare_batch(items, fmt, self.renderer)
            return
        worker = self.pool[self.submitted % len(self.pool)]
        worker.send(items, fmt)
        self.queue.append((batch, worker))
        while len(self.queue) > len(self.pool) * IN_FLIGHT_PER_WORKER:
            done, owner = self.queue.popleft()
            yield done, owner.receive()  # each worker answers its batches in the order it got them

    def drain(self) -> Iterator[tuple[Batch, PreparedBatch]]:
        """Yield what is still outstanding, oldest first, then stop the workers."""
        while self.queue:
            done, owner = self.queue.popleft()
            yield done, owner.receive()
        self.close()

    def close(self) -> None:
        """Stop the workers (outstanding batches are dropped); safe to call twice."""
        for worker in self.pool:
            worker.stop()
        self.pool = []
        self.queue.clear()
