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
    """Checkpoints through Ray Train: every worker reports, rank 0 attaches the files.

    Resuming reads the run folder on storage, not only ``ray.train.get_checkpoint()``: Ray
    registers a reported checkpoint only when its controller next polls the worker, so a
    worker killed right after an upload restarts from an older checkpoint, or from scratch.
    The newest *complete* checkpoint on storage (every file its state.json lists, at the
    listed size) is what a restart resumes from.
    """

    def __init__(self, keep: int, rank: int, run_dir: str | None = None, sharded: bool = False,
                 artifacts: tuple[str, ...] = (FINAL_ADAPTER, FINAL_RESULT)):
        self.keep, self.rank, self.run_dir = keep, rank, run_dir
        #: sharded: every rank writes part of each checkpoint (DeepSpeed ZeRO) and Ray Train
        #: merges the parts into one folder; otherwise only rank 0 writes.
        self.sharded = sharded
        #: what the final checkpoint carries besides the resumable state (files or folders of ``out``)
        self.artifacts = artifacts

    @contextmanager
    def latest(self) -> Iterator[Path | None]:
        import ray.train

        on_storage = self._newest_on_storage()
        registered = ray.train.get_checkpoint()
        if on_storage is None and registered is None:
            yield None
            return
        if on_storage is not None and (registered is None or
                                       Path(on_storage[1]).name >= Path(registered.path).name):
            fs, path = on_storage
            yield from self._local_copy(fs, path)
            return
        with registered.as_directory() as folder:
            yield Path(folder)

    def _newest_on_storage(self):
        import pyarrow.fs as pafs

        from farm.train.common import newest_complete_checkpoint

        if not self.run_dir:
            return None
        if "://" in self.run_dir:
            fs, root = pafs.FileSystem.from_uri(self.run_dir)
        else:
            fs, root = pafs.LocalFileSystem(), self.run_dir
        found = newest_complete_checkpoint(fs, root)
        return (fs, found) if found else None

    @staticmethod
    def _local_copy(fs, path: str) -> Iterator[Path]:
        import pyarrow.fs as pafs

        if isinstance(fs, pafs.LocalFileSystem):
            yield Path(path)
            return
        folder = Path(tempfile.mkdtemp(prefix="farm-resume-"))
        try:
            pafs.copy_files(path, str(folder), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def save(self, write: Callable[[Path], None], step: int, metrics: dict) -> Path | None:
        self._report(write, step, metrics)
        return None

    def finish(self, out: Path, write: Callable[[Path], None], step: int, metrics: dict) -> None:
        """Report the final checkpoint: resumable state plus the artifacts (``adapter/`` and
        ``result.json`` by default) that the writing rank has in ``out``."""

        def write_final(folder: Path) -> None:
            for name in self.artifacts:
                source = out / name
                if source.is_dir():
                    shutil.copytree(source, folder / name)
                elif source.is_file():
                    shutil.copy2(source, folder / name)
            write(folder)  # state.json last, as for every checkpoint

        self._report(write_final, step, {**metrics, "final": True})

    def _report(self, write: Callable[[Path], None], step: int, metrics: dict) -> None:
        import ray.train

        # Every worker must call report the same number of times (it is a barrier);
        # only rank 0 hands over files, unless every rank holds a shard.
        if self.rank != 0 and not self.sharded:
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
