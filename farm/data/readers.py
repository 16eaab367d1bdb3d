"""Tenant files -> records, streamed, in the shapes users export.

``read_records(uri, tenant, options)`` yields ``(location, record)`` for every record of (a
JSON Lines line comes as ``JsonText``, parsed later with the rest of its batch):

==========================  ===============================================================
a path or URI to            read as
==========================  ===============================================================
``*.jsonl``, ``*.ndjson``   JSON Lines, one object per line (location: ``line N``)
``*.json``                  JSON Lines, or one JSON array of objects (``item N``), streamed
``*.csv``, ``*.tsv``        a header row, then one record per row (``row N (line L)``)
``*.parquet``               Parquet, in row batches (``row N``)
``+ .gz .bz2 .zst``         any of the text files above, compressed
a folder or a glob          every data file in it, in name order (``part-0001.jsonl line N``)
a saved ``datasets`` folder ``Dataset`` or ``DatasetDict`` (``data.split``, default ``train``)
==========================  ===============================================================

Paths are local or any URI pyarrow opens (``s3://...``). Text is UTF-8 with or without a
byte-order mark; another encoding only when declared (``data.encoding``), and undeclared
non-UTF-8 bytes are an error that names the likely encoding. Positions are 1-based.

Memory is bounded: files are read in chunks, a line or JSON item at a time, and a single record
larger than ``data.max_record_mb`` is refused without being held in memory. A record that
cannot be parsed is yielded as a ``RecordError`` in place of the record, so the caller's
bad-record policy applies to it; a problem that makes the rest of a file unreadable is a
``DataError``.
"""

from __future__ import annotations

import csv
import fnmatch
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from farm.data.records import JsonText, RecordError

CHUNK = 1 << 20  # bytes read at a time
_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
_TEXT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
_DATA_SUFFIXES = (*_TEXT_SUFFIXES, ".parquet")
_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
SHAPES = ("JSON Lines (.jsonl/.ndjson/.json), a JSON array (.json), CSV/TSV, Parquet, any text shape "
          "compressed (.gz/.bz2/.zst), a folder or glob of such files, or a saved `datasets` folder")


class DataError(ValueError):
    """A tenant dataset problem, with where it is and why."""

    def __init__(self, tenant: str, source: str, reason: str, location: str | None = None,
                 field_name: str | None = None):
        self.tenant, self.source, self.reason = tenant, source, reason
        self.location, self.field = location, field_name
        where = f"{source} {location}" if location else source
        what = f"field '{field_name}': " if field_name else ""
        super().__init__(f"tenant '{tenant}': {where}: {what}{reason}")


@dataclass(frozen=True)
class ReadOptions:
    """How to read a tenant's files (from ``DataSpec``)."""

    encoding: str | None = None      # None: UTF-8, with or without a byte-order mark
    split: str = "train"             # the split of a saved DatasetDict
    max_record_bytes: int = 16 << 20


def read_records(uri: str, tenant: str, options: ReadOptions = ReadOptions()) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record or RecordError)`` for every record of a dataset (see module doc)."""
    import pyarrow.fs as pafs

    try:
        fs, path = _open_fs(uri)
    except Exception as exc:  # bad URI, unknown scheme, unreachable endpoint
        raise DataError(tenant, uri, f"cannot open: {exc}") from None
    root = None  # files of a folder or glob are labelled by their path under it
    if any(c in path.rsplit("/", 1)[-1] for c in "*?["):
        files, root = _glob(fs, path, uri, tenant), path.rsplit("/", 1)[0] if "/" in path else "."
    else:
        try:
            info = fs.get_file_info(path)
        except Exception as exc:
            raise DataError(tenant, uri, f"cannot open: {exc}") from None
        if info.type == pafs.FileType.NotFound:
            raise DataError(tenant, uri, "file not found")
        if info.type == pafs.FileType.Directory:
            if _is_saved_dataset(fs, path):
                yield from _read_saved_dataset(uri, path, tenant, options)
                return
            files, root = _folder(fs, path, uri, tenant), path
        else:
            files = [path]
    for file in files:
        label = file[len(root):].lstrip("/") if root is not None else ""
        for location, record in _read_file(fs, file, uri, tenant, options, label):
            yield (f"{label} {location}" if label else location), record


# -- finding files ---------------------------------------------------------------------------


def _open_fs(uri: str):
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri


def _is_saved_dataset(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    base = path.rstrip("/")
    return any(fs.get_file_info(f"{base}/{marker}").type != pafs.FileType.NotFound
               for marker in ("state.json", "dataset_dict.json"))


def _data_suffix(name: str) -> tuple[str, str | None]:
    """(data suffix, compression codec) of a file name; ('', None) when it is not a data file."""
    lower = name.lower()
    codec = None
    for suffix, name_of_codec in _COMPRESSION.items():
        if lower.endswith(suffix):
            lower, codec = lower[: -len(suffix)], name_of_codec
            break
    for suffix in _DATA_SUFFIXES:
        if lower.endswith(suffix) and not (codec and suffix == ".parquet"):
            return suffix, codec
    return "", codec


def _ignored(name: str) -> bool:
    # What dataset repositories carry next to their data: never records, never an error.
    upper = name.upper()
    return name.startswith((".", "_")) or upper.startswith(("README", "LICENSE")) or upper.endswith(".MD")


def _folder(fs, path: str, uri: str, tenant: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files, unknown = [], []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(path.rstrip("/")):].lstrip("/")
        if any(_ignored(part) for part in relative.split("/")):
            continue
        (files if _data_suffix(info.base_name)[0] else unknown).append(info.path)
    if unknown:
        names = ", ".join(sorted(u.rsplit("/", 1)[-1] for u in unknown)[:5])
        raise DataError(tenant, uri, f"the folder holds files that are not data: {names}; expected {SHAPES}")
    if not files:
        raise DataError(tenant, uri, f"the folder holds no data file; expected {SHAPES}")
    return sorted(files)


def _glob(fs, path: str, uri: str, tenant: str) -> list[str]:
    import pyarrow.fs as pafs

    folder, pattern = path.rsplit("/", 1) if "/" in path else (".", path)
    if any(c in folder for c in "*?["):
        raise DataError(tenant, uri, "a glob may only use wildcards in the file name, not in folders")
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except Exception as exc:
        raise DataError(tenant, uri, f"cannot list {folder}: {exc}") from None
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.base_name, pattern))
    if not files:
        raise DataError(tenant, uri, "no file matches the pattern")
    bad = [f.rsplit("/", 1)[-1] for f in files if not _data_suffix(f)[0]]
    if bad:
        raise DataError(tenant, uri, f"the pattern matches files that are not data: {', '.join(bad[:5])}; expected {SHAPES}")
    return files


# -- one file --------------------------------------------------------------------------------


def _read_file(fs, path: str, uri: str, tenant: str, options: ReadOptions, label: str) -> Iterator[tuple[str, Any]]:
    suffix, codec = _data_suffix(path)
    source = f"{uri} ({label})" if label else uri
    if not suffix:
        raise DataError(tenant, uri, f"unsupported file type; expected {SHAPES}")
    if suffix == ".parquet":
        yield from _read_parquet(fs, path, source, tenant)
        return
    try:
        stream = fs.open_input_stream(path, compression=codec)
    except Exception as exc:
        raise DataError(tenant, source, f"cannot open: {exc}") from None
    with stream:
        reader = _Reader(stream, source, tenant)
        if suffix in (".csv", ".tsv"):
            yield from _read_csv(reader, "\t" if suffix == ".tsv" else ",", options, source, tenant)
        elif suffix == ".json" and reader.first_byte() == b"[":
            yield from _read_json_array(reader, options, source, tenant)
        else:
            yield from _read_json_lines(reader, options, source, tenant, suffix)


class _Reader:
    """A byte stream read in chunks, whose first chunk can be looked at before it is consumed."""

    def __init__(self, stream, source: str, tenant: str):
        self.stream, self.source, self.tenant = stream, source, tenant
        self._head = self._read_stream(CHUNK)  # what read() returns first

    def _read_stream(self, size: int) -> bytes:
        try:
            return self.stream.read(size)
        except OSError as exc:  # a truncated or corrupt compressed file
            raise DataError(self.tenant, self.source, f"cannot read (corrupt or truncated file?): {exc}") from None

    def read(self, size: int = CHUNK) -> bytes:
        if self._head:
            head, self._head = self._head[:size], self._head[size:]
            return head
        return self._read_stream(size)

    def first_byte(self) -> bytes:
        """The first byte that is not a BOM or whitespace (without consuming anything)."""
        head = self._head[3:] if self._head.startswith(_BOM) else self._head
        return head.lstrip()[:1]

    def drop_bom(self) -> None:
        """Skip a UTF-8 byte-order mark at the start, if there is one."""
        if self._head.startswith(_BOM):
            self._head = self._head[3:]


def _byte_lines(read: Callable[[int], bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, bytes)`` of each line; ``None`` for a line longer than ``limit``, which is
    skipped over without being held in memory."""
    buffer = bytearray()
    number, skipping = 1, False
    while True:
        block = read(CHUNK)
        if not block:
            break
        buffer += block
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            if skipping:
                skipping = False
            else:
                yield number, bytes(buffer[start:end])
            number += 1
            start = end + 1
        del buffer[:start]
        if len(buffer) > limit and not skipping:
            yield number, None
            skipping = True
        if skipping:
            buffer.clear()
    if buffer and not skipping:
        yield number, bytes(buffer)


def _decode_error(raw: bytes, exc: UnicodeDecodeError) -> str:
    return (f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            f"{_likely_encoding(raw)}")


def _likely_encoding(raw: bytes) -> str:
    """A hint naming the encodings ``raw`` most likely is in (charset-normalizer's guess)."""
    from charset_normalizer import from_bytes

    names = []
    for match in from_bytes(raw[:65536]):
        if match.encoding not in names and match.encoding not in ("utf_8", "ascii"):
            names.append(match.encoding)
    # One line is little to go on and the Windows code pages decode each other's bytes; the one
    # spreadsheets on Windows write (Western European) goes first when it fits at all.
    names.sort(key=lambda name: name != "cp1252")
    if not names:
        return "declare the file's encoding with data.encoding"
    return f"it looks like {' or '.join(names[:3])}: declare it with data.encoding (for example '{names[0]}')"


def _text_lines(reader: _Reader, options: ReadOptions, source: str, tenant: str) -> Iterator[tuple[int, str | RecordError]]:
    """Decoded lines (without their newline); a line that does not decode becomes a RecordError."""
    if options.encoding is not None:
        # A declared encoding may be multi-byte (UTF-16): let Python's codec find the lines.
        text = io.TextIOWrapper(_RawAdapter(reader), encoding=options.encoding, newline="")
        number = 0
        try:
            for number, line in enumerate(text, start=1):
                yield number, line.rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise DataError(tenant, source, f"not valid {options.encoding} ({exc.reason})", f"line {number + 1}") from None
        return
    for number, raw in _byte_lines(reader.read, options.max_record_bytes):
        if raw is None:
            yield number, RecordError(None, f"longer than data.max_record_mb ({options.max_record_bytes >> 20} MiB); not read")
            continue
        if number == 1:
            if raw.startswith(_UTF16_BOMS):
                raise DataError(tenant, source, "the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                                                "declare it with data.encoding: utf-16")
            if raw.startswith(_BOM):
                raw = raw[3:]
        try:
            yield number, raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            yield number, RecordError(None, _decode_error(raw, exc))


class _RawAdapter(io.RawIOBase):
    """``_Reader`` as a raw stream for ``io.TextIOWrapper``."""

    def __init__(self, reader: _Reader):
        self.reader = reader

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.reader.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_json_lines(reader: _Reader, options: ReadOptions, source: str, tenant: str, suffix: str) -> Iterator[tuple[str, Any]]:
    for number, line in _text_lines(reader, options, source, tenant):
        location = f"line {number}"
        if isinstance(line, RecordError):
            yield location, line
            continue
        if not line.strip():
            continue
        hint = ""
        if suffix == ".json" and number == 1:
            hint = "; a .json file must hold one JSON object per line (JSON Lines) or one JSON array of objects"
        yield location, JsonText(line, hint)


class _Utf8:
    """A stream of UTF-8 bytes for ijson, from a file in another declared encoding."""

    def __init__(self, text: io.TextIOBase):
        self.text = text

    def read(self, size: int) -> bytes:
        return self.text.read(size).encode("utf-8")


def _read_json_array(reader: _Reader, options: ReadOptions, source: str, tenant: str) -> Iterator[tuple[str, Any]]:
    import ijson

    if options.encoding is not None:
        stream: Any = _Utf8(io.TextIOWrapper(_RawAdapter(reader), encoding=options.encoding))
    else:
        reader.drop_bom()
        stream = reader
    number = 0
    try:
        for number, item in enumerate(ijson.items(stream, "item", use_float=True), start=1):
            yield f"item {number}", item
    except UnicodeDecodeError as exc:
        raise DataError(tenant, source, f"not valid {options.encoding or 'UTF-8'}: {exc.reason}",
                        f"after item {number}") from None
    except ijson.JSONError as exc:
        # The parser's first line only: the rest quotes the tenant's bytes with an ASCII pointer.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(tenant, source, f"invalid JSON array ({reason}); the rest of the file cannot be read",
                        f"after item {number}") from None


def _read_csv(reader: _Reader, delimiter: str, options: ReadOptions, source: str, tenant: str) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(options.max_record_bytes)

    def lines() -> Iterator[str]:
        for number, line in _text_lines(reader, options, source, tenant):
            if isinstance(line, RecordError):  # a quoted cell may span lines: cannot resync
                raise DataError(tenant, source, line.reason, f"line {number}")
            yield line + "\n"

    rows = csv.reader(lines(), delimiter=delimiter)
    try:
        header = next(rows)
    except StopIteration:
        return
    except csv.Error as exc:
        raise DataError(tenant, source, f"unreadable header: {exc}", "line 1") from None
    names = [name.strip() for name in header]
    if not all(names) or len(set(names)) != len(names):
        raise DataError(tenant, source, f"the header row must name every column once, got {header}", "line 1")
    number = 0
    while True:
        try:
            cells = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            number += 1
            yield f"row {number} (line {rows.line_num})", RecordError(None, f"malformed CSV: {exc}")
            continue
        if not any(cell.strip() for cell in cells):
            continue
        number += 1
        location = f"row {number} (line {rows.line_num})"
        if len(cells) != len(names):
            yield location, RecordError(None, f"{len(cells)} cells, but the header has {len(names)} columns")
            continue
        yield location, dict(zip(names, cells))


def _read_parquet(fs, path: str, source: str, tenant: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        # No pre-buffering: pages are read as the batches need them, not a whole row group.
        parquet = pq.ParquetFile(fs.open_input_file(path), pre_buffer=False, buffer_size=CHUNK)
    except Exception as exc:
        raise DataError(tenant, source, f"not a readable Parquet file: {exc}") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"row {row}", record


def _read_saved_dataset(uri: str, path: str, tenant: str, options: ReadOptions) -> Iterator[tuple[str, Any]]:
    if "://" in uri:
        raise DataError(tenant, uri, "saved `datasets` folders are read from local paths only; "
                                     "export the dataset to Parquet for object storage")
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except Exception as exc:
        raise DataError(tenant, uri, f"cannot load saved dataset: {exc}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if options.split not in dataset:
            raise DataError(tenant, uri, f"the DatasetDict has splits {', '.join(dataset)}, not "
                                         f"'{options.split}'; choose one with data.split", field_name="split")
        dataset = dataset[options.split]
    row = 0
    for batch in dataset.with_format("arrow").iter(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"row {row}", record
