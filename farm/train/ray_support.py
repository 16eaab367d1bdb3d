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

        on_storage = newest_on_storage(self.run_dir) if self.run_dir else None
        registered = ray.train.get_checkpoint()
        if on_storage is None and registered is None:
            yield None
            return
        if on_storage is not None and (registered is None or
                                       Path(on_storage[1]).name >= Path(registered.path).name):
            fs, path = on_storage
            yield from local_copy(fs, path)
            return
        with registered.as_directory() as folder:
            yield Path(folder)


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


def storage_fs(uri: str):
    """(pyarrow file system, path) of a local folder or a URI such as ``s3://bucket/prefix``."""
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri


def newest_on_storage(root: str):
    """(fs, path) of the newest complete checkpoint directly under ``root``, or None."""
    from farm.train.common import newest_complete_checkpoint

    fs, path = storage_fs(root)
    found = newest_complete_checkpoint(fs, path)
    return (fs, found) if found else None


def checkpoint_folders(root: str) -> list[str]:
    """The names of the checkpoint folders directly under ``root``, oldest step first."""
    import pyarrow.fs as pafs

    fs, path = storage_fs(root)
    return sorted(e.base_name for e in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                  if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint-"))


def local_copy(fs, path: str) -> Iterator[Path]:
    """Yield a local folder with the contents of ``path`` (the folder itself when it is local)."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(path)
        return
    folder = Path(tempfile.mkdtemp(prefix="farm-resume-"))
    try:
        pafs.copy_files(path, str(folder), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def upload(folder: Path, destination: str) -> None:
    """Copy a local folder to ``destination`` (a folder or a URI) and replace what was there."""
    import pyarrow.fs as pafs

    fs, path = storage_fs(destination)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(folder), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


FINAL_DIR = "final"


def final_checkpoint(root: str):
    """The tenant's final folder under ``root`` (``<root>/final``) as a Ray ``Checkpoint`` once
    every file of it is on storage, else None: a pack's driver hands a tenant off the moment
    this appears, while the pack trains on, and an upload cut short never counts."""
    from ray.train import Checkpoint

    from farm.train.common import checkpoint_is_complete

    fs, path = storage_fs(f"{root.rstrip('/')}/{FINAL_DIR}")
    return Checkpoint(path=path, filesystem=fs) if checkpoint_is_complete(fs, path) else None


class StorageCheckpoints:
    """One tenant's checkpoints written straight to shared storage (``root`` = a folder or URI).

    A co-training pack is one Ray Train run carrying many tenants, each with its own
    checkpoint stream, which ``ray.train.report`` (one stream per run) cannot hold. Each
    checkpoint is complete only once every file its ``state.json`` lists is there at the listed
    size, so an upload cut short is never resumed from; the final adapter and result land in
    ``<root>/final/``, where the sweep's driver picks them up.
    """

    def __init__(self, root: str, keep: int, rank: int = 0, gather: bool = False):
        #: rank: with several workers every rank reads checkpoints, rank 0 uploads them
        self.root, self.keep, self.rank = root.rstrip("/"), keep, rank
        #: gather: the state is sharded (FSDP), so writing it gathers from every worker: every
        #: rank writes (a collective), rank 0 uploads; otherwise only rank 0 writes at all
        self.gather = gather

    @contextmanager
    def latest(self) -> Iterator[Path | None]:
        found = newest_on_storage(self.root)
        if found is None:
            yield None
            return
        yield from local_copy(*found)

    def save(self, write: Callable[[Path], None], step: int, metrics: dict) -> Path | None:
        if self.rank != 0 and not self.gather:
            return None
        folder = Path(tempfile.mkdtemp(prefix="farm-ckpt-"))
        try:
            write(folder)
            if self.rank == 0:
                upload(folder, f"{self.root}/{checkpoint_name(step)}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if self.rank == 0:
            self._prune()
        return None

    def _prune(self) -> None:
        fs, path = storage_fs(self.root)
        for name in checkpoint_folders(self.root)[:-self.keep]:
            fs.delete_dir(f"{path}/{name}")

    def finish(self, out: Path, write: Callable[[Path], None], step: int, metrics: dict) -> None:
        """Upload the final adapter and result (resumable state too) to ``<root>/final``."""
        if self.rank != 0 and not self.gather:
            return
        folder = Path(tempfile.mkdtemp(prefix="farm-final-"))
        try:
            if self.rank == 0:  # the adapter and result are rank 0's
                shutil.copytree(out / FINAL_ADAPTER, folder / FINAL_ADAPTER)
                shutil.copy2(out / FINAL_RESULT, folder / FINAL_RESULT)
            write(folder)  # state.json last; every rank when gathering (a collective)
            if self.rank == 0:
                upload(folder, f"{self.root}/{FINAL_DIR}")
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
