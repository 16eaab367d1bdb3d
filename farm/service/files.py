"""Tenants' training files (``POST /v1/files``): checked record by record, then stored.

An upload is spooled to a local folder, checked with the farm's data readers and record
checks (the same ones a sweep applies: JSON Lines or Parquet, every record parsed and read as
the schema of the first one, chat / sharegpt / alpaca / completion / text), and only then
written to the registry's store under ``files/<tenant>/<file-id>.<jsonl|parquet>`` and
recorded in the catalog. The first bad record refuses the whole file with its line (or row),
field and reason. What needs the base model's tokenizer (lengths, the train/eval split) is
checked when a job uses the file, by the service (``validating_files``).

The caller's filename is kept for display only; what the bytes are is decided from the bytes
(Parquet's magic number), never from the name.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from farm.data import DataError, JsonText, NothingToLearn, ReadOptions, RecordError, detect_format, normalize_record, \
    parse_json, read_records
from farm.jsonwords import kind

PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class CheckedFile:
    """An upload that passed the checks: where it waits, what it holds."""

    path: Path          # in the spool folder, named by its detected type
    suffix: str         # .jsonl | .parquet
    size: int
    sha256: str
    records: int
    format: str


def spool_upload(chunks, folder: Path, limit: int) -> tuple[Path, int, str]:
    """Write an upload's byte ``chunks`` to ``folder``; returns (path, size, sha256).
    ``ValueError`` once it is over ``limit`` bytes."""
    digest, size = hashlib.sha256(), 0
    path = folder / "upload"
    with path.open("wb") as out:
        for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise ValueError(f"file: over the limit of {limit:,} bytes")
            digest.update(chunk)
            out.write(chunk)
    return path, size, digest.hexdigest()


def check_upload(path: Path, size: int, sha256: str, tenant: str, filename: str) -> CheckedFile:
    """Check a spooled upload record by record; ``DataError`` names the file (as the tenant
    called it), the line or row, the field and the reason."""
    with path.open("rb") as handle:
        suffix = ".parquet" if handle.read(4) == PARQUET_MAGIC else ".jsonl"
    typed = path.with_name(f"training{suffix}")  # the readers pick their format by suffix
    shutil.move(path, typed)
    records, fmt = 0, None
    try:
        for location, record in read_records(str(typed), tenant, ReadOptions()):
            records += 1
            try:
                if isinstance(record, RecordError):
                    raise record
                record = parse_json(record) if isinstance(record, JsonText) else record
                if fmt is None:
                    fmt = detect_format(record)
                    if fmt is None:
                        keys = ", ".join(sorted(record)) if isinstance(record, dict) else kind(record)
                        raise RecordError(None, f"unrecognised schema ({keys}): expected 'messages', 'conversations', "
                                                "'instruction'+'output', 'prompt'+'completion' or 'text'")
                normalize_record(record, fmt)
            except NothingToLearn:
                continue  # counted when the job reads the file, as a sweep counts it
            except RecordError as exc:
                raise DataError(tenant, filename, exc.reason, location, exc.field) from None
    except DataError as exc:  # the reader's own errors name the spool path: name the upload instead
        if exc.source != filename:
            raise DataError(tenant, filename, exc.reason, exc.location, exc.field) from None
        raise
    if records == 0 or fmt is None:
        raise DataError(tenant, filename, "holds no records")
    return CheckedFile(typed, suffix, size, sha256, records, fmt)
