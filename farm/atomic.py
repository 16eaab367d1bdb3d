"""Atomic writes: a reader, or a crash, sees the old content or the new, never a partial one.

    replace_file(path, write)          write(tmp) fills a temporary file next to ``path``; fsynced, renamed over it
    with replacing_folder(final) as tmp:   fill ``tmp`` (a fresh folder next to ``final``); on leaving the
        ...                               block it replaces ``final``; on an error it is removed

Both work in the destination's own folder, so the rename never crosses file systems, and
their temporary names start with a dot, which the farm's listings (checkpoints, adapters,
store versions) never take for content. Publishing into the registry's store is different on
purpose (a version's folder appears once and is never replaced: ``farm.registry.store``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def replace_file(path: Path, write: Callable[[Path], object]) -> Path | None:
    """Have ``write`` fill a temporary file next to ``path``, flush it to disk and rename it over
    ``path``. Returns ``path``, or None when ``write`` wrote nothing (``path`` is then left as it was)."""
    # the real suffix, so writers that pick a format from the name (matplotlib) still do
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        if not tmp.exists():
            return None
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def replacing_folder(final: Path) -> Iterator[Path]:
    """A fresh, empty temporary folder next to ``final`` to fill; when the block ends without an
    error it takes ``final``'s place (an existing ``final`` is moved aside first and then
    removed, so ``final`` is only ever absent between two renames), else it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it became `final`
