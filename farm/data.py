"""Tenant datasets: read, validate, render, tokenize, mask, pack, split, fingerprint.

The pipeline, for one tenant::

    read_records(path)          JSONL / Parquet / saved `datasets` folder, local or any URI
      -> normalize_record()     one of the schemas below -> a list of (role, content) turns
      -> render_example()       chat template, tokenize, labels masked outside the answers
      -> split / too_long       deterministic train/eval split; truncate, drop or refuse
      -> pack_rows()            first-fit-decreasing packing into rows of max_seq_len

Accepted record schemas (``format``; ``auto`` detects it from the first record)::

    chat      {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
    sharegpt  {"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}
    alpaca    {"instruction": "...", "input": "... (optional)", "output": "..."}
    text      {"text": "..."}                       (every token is trained on)

Every problem is a ``DataError`` naming the tenant, the file, the line (JSONL, 1-based) or
row (Parquet and saved datasets, 0-based), the field and the reason. With
``on_bad_record: skip`` bad records are counted and listed in the ``DataReport`` instead.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from farm.spec import DataSpec

IGNORE_INDEX = -100  # label value that cross-entropy skips

_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "bot": "assistant"}
_CHAT_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A tenant dataset problem, with where it is and why."""

    def __init__(self, tenant: str, source: str, reason: str, location: str | None = None,
                 field_name: str | None = None):
        self.tenant, self.source, self.reason = tenant, source, reason
        self.location, self.field = location, field_name
        where = f"{source} {location}" if location else source
        what = f"field '{field_name}': " if field_name else ""
        super().__init__(f"tenant '{tenant}': {where}: {what}{reason}")


class RecordError(ValueError):
    """A problem inside one record (the caller adds tenant, file and line)."""

    def __init__(self, field_name: str | None, reason: str):
        self.field, self.reason = field_name, reason
        super().__init__(reason)


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One rendered example: token ids and labels (IGNORE_INDEX where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class BadRecord:
    location: str
    field: str | None
    reason: str


@dataclass
class DataReport:
    """What happened to a tenant's records on the way to training rows."""

    tenant: str
    source: str
    format: str
    records: int = 0
    bad: list[BadRecord] = field(default_factory=list)
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    fingerprint: str = ""

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def summary(self) -> str:
        """One line a person can read: counts of everything that was not used as is."""
        parts = [f"{self.records} records ({self.format})"]
        if self.bad:
            parts.append(f"{len(self.bad)} skipped as bad")
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped as too long")
        if self.dropped_no_target:
            parts.append(f"{self.dropped_no_target} dropped with no trainable token")
        return f"tenant '{self.tenant}': {', '.join(parts)}"


@dataclass
class Rows:
    """Fixed-length training rows (one tensor row each) and how much of them is padding."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]
    attention_mask: list[list[int]] | None  # None for packed rows: position_ids separate examples
    real_tokens: int
    pad_tokens: int
    lengths: list[int] = field(default_factory=list)  # real (non-pad) tokens of each row
    targets: list[int] = field(default_factory=list)  # tokens that carry loss in each row

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def padding_share(self) -> float:
        total = self.real_tokens + self.pad_tokens
        return self.pad_tokens / total if total else 0.0


@dataclass
class TenantData:
    """A tenant's training and eval rows plus the report of how they were made."""

    train: Rows
    eval: Rows
    report: DataReport


# -- reading ---------------------------------------------------------------------------------


def _open_fs(uri: str):
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri


def read_records(uri: str, tenant: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record)`` for every record of a dataset file or folder.

    A record that cannot even be parsed (bad UTF-8, bad JSON) is yielded as a
    ``RecordError`` in place of the record, so the caller's bad-record policy applies to it.
    """
    import pyarrow.fs as pafs

    try:
        fs, path = _open_fs(uri)
        info = fs.get_file_info(path)
    except Exception as exc:  # bad URI, unknown scheme, unreachable endpoint
        raise DataError(tenant, uri, f"cannot open: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(tenant, uri, "file not found")
    if info.type == pafs.FileType.Directory:
        yield from _read_saved_dataset(uri, path, fs, tenant)
        return
    lower = path.lower()
    if lower.endswith(".parquet"):
        yield from _read_parquet(uri, path, fs, tenant)
    elif lower.endswith((".jsonl", ".json", ".ndjson")):
        yield from _read_jsonl(uri, path, fs, tenant)
    else:
        raise DataError(tenant, uri, "unsupported file type: expected .jsonl, .parquet or a saved "
                                     "`datasets` folder")


def _read_jsonl(uri: str, path: str, fs, tenant: str) -> Iterator[tuple[str, Any]]:
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        location = f"line {number}"
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield location, RecordError(None, f"not valid UTF-8 (byte {exc.start} of the line)")
            continue
        try:
            yield location, json.loads(text)
        except json.JSONDecodeError as exc:
            yield location, RecordError(None, f"invalid JSON: {exc.msg} at column {exc.colno}")


def _read_parquet(uri: str, path: str, fs, tenant: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
    except Exception as exc:
        raise DataError(tenant, uri, f"not a readable Parquet file: {exc}") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield f"row {row}", record
            row += 1


def _read_saved_dataset(uri: str, path: str, fs, tenant: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.fs as pafs

    marker = fs.get_file_info(f"{path.rstrip('/')}/state.json")
    if marker.type == pafs.FileType.NotFound:
        raise DataError(tenant, uri, "a folder must be a dataset saved with `datasets` "
                                     "save_to_disk (no state.json found)")
    if "://" in uri:
        raise DataError(tenant, uri, "saved `datasets` folders are read from local paths only; "
                                     "export the dataset to Parquet for object storage")
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except Exception as exc:
        raise DataError(tenant, uri, f"cannot load saved dataset: {exc}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(tenant, uri, f"dataset has splits {list(dataset)}, expected a 'train' split")
        dataset = dataset["train"]
    for row, record in enumerate(dataset):
        yield f"row {row}", record


# -- schemas ---------------------------------------------------------------------------------


def detect_format(record: Any) -> str | None:
    """The schema a record looks like, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def _string(value: Any, field_name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(field_name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(field_name, "is empty")
    return value


def normalize_record(record: Any, fmt: str) -> list[Turn] | str:
    """Turn one record of schema ``fmt`` into chat turns (or plain text for ``text``)."""
    if not isinstance(record, dict):
        raise RecordError(None, f"expected a JSON object, got {type(record).__name__}")
    if fmt == "text":
        if "text" not in record:
            raise RecordError("text", "missing")
        return _string(record["text"], "text")
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if key not in record:
                raise RecordError(key, "missing")
        instruction = _string(record["instruction"], "instruction")
        extra = record.get("input")
        if extra is not None:
            extra = _string(extra, "input", allow_empty=True)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return [Turn("user", prompt), Turn("assistant", _string(record["output"], "output"))]
    if fmt == "chat":
        key, role_key, content_key, roles = "messages", "role", "content", {r: r for r in _CHAT_ROLES}
    elif fmt == "sharegpt":
        key, role_key, content_key, roles = "conversations", "from", "value", _SHAREGPT_ROLES
    else:
        raise RecordError(None, f"unknown format {fmt!r}")
    if key not in record:
        raise RecordError(key, "missing")
    turns_raw = record[key]
    if not isinstance(turns_raw, list) or not turns_raw:
        raise RecordError(key, "expected a non-empty list of turns")
    turns: list[Turn] = []
    for index, turn in enumerate(turns_raw):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"expected an object, got {type(turn).__name__}")
        if role_key not in turn:
            raise RecordError(f"{where}.{role_key}", "missing")
        if content_key not in turn:
            raise RecordError(f"{where}.{content_key}", "missing")
        role = turn[role_key]
        if role not in roles:
            raise RecordError(f"{where}.{role_key}", f"unknown role {role!r}; expected one of {sorted(roles)}")
        turns.append(Turn(roles[role], _string(turn[content_key], f"{where}.{content_key}")))
    if not any(t.role == "assistant" for t in turns):
        raise RecordError(key, "has no assistant turn to learn from")
    return turns


# -- rendering -------------------------------------------------------------------------------


def render_example(item: list[Turn] | str, tokenizer, train_on: str) -> Example:
    """Tokenize one normalized record; labels are masked outside the trained tokens.

    Chat turns go through the tokenizer's own chat template. The tokens of each assistant
    answer are found by rendering the conversation up to that answer (with the generation
    prompt) and up to its end: the difference is the answer, whatever the template looks like.
    """
    if isinstance(item, str):
        ids = _encode(tokenizer, item)
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        ids = ids + [tokenizer.eos_token_id]
        return _first_unlabelled(Example(ids, list(ids)))
    messages = [{"role": t.role, "content": t.content} for t in item]
    segments: list[tuple[str, bool]] = []  # (text, trained)
    rendered = ""
    for index, turn in enumerate(item):
        if turn.role != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise RecordError(None, "the tokenizer's chat template does not render conversations "
                                    "as growing prefixes; cannot locate the answers")
        segments.append((prompt[len(rendered):], train_on == "all"))
        segments.append((full[len(prompt):], True))
        rendered = full
    tail = tokenizer.apply_chat_template(messages, tokenize=False)
    if len(tail) > len(rendered):
        segments.append((tail[len(rendered):], train_on == "all"))
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        piece = _encode(tokenizer, text)
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
    return _first_unlabelled(Example(ids, labels))


def _first_unlabelled(example: Example) -> Example:
    # The first token of an example has nothing before it in its own example; in a packed row
    # the token before it belongs to another example, so it must not be a target.
    if example.labels:
        example.labels[0] = IGNORE_INDEX
    return example


def _encode(tokenizer, text: str) -> list[int]:
    # Special tokens written by the template (bos, eos, role markers) are parsed as specials.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- rows ------------------------------------------------------------------------------------


def pack_rows(examples: list[Example], max_seq_len: int, pad_id: int, packing: bool) -> Rows:
    """Turn examples into rows of exactly ``max_seq_len`` tokens.

    With packing, examples are placed first-fit-decreasing into rows; each example's
    position ids restart at 0, which makes transformers' attention block-diagonal (no token
    attends across examples) when no attention mask is passed. Without packing each example
    is its own row, right-padded, with an attention mask.
    """
    if packing:
        bins = [[examples[i] for i in group] for group in
                pack_lengths([len(e.input_ids) for e in examples], max_seq_len)]
    else:
        bins = [[e] for e in examples]
    rows = Rows([], [], [], None if packing else [], 0, 0)
    for group in bins:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for example in group:
            ids += example.input_ids
            labels += example.labels
            positions += list(range(len(example.input_ids)))
        pad = max_seq_len - len(ids)
        rows.lengths.append(len(ids))
        rows.targets.append(sum(1 for label in labels[1:] if label != IGNORE_INDEX))
        rows.real_tokens += len(ids)
        rows.pad_tokens += pad
        if rows.attention_mask is not None:
            rows.attention_mask.append([1] * len(ids) + [0] * pad)
            positions += [0] * pad
        else:
            positions += list(range(pad))  # the padding is one more "example" nobody attends to
        rows.input_ids.append(ids + [pad_id] * pad)
        rows.labels.append(labels + [IGNORE_INDEX] * pad)
        rows.position_ids.append(positions)
    return rows


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins whose lengths sum to at most ``capacity``.

    Minimum-bin-slack packing: each bin takes the largest item left, then the subset of the
    remaining items that fills it best (a bounded subset-sum, solved exactly with a bitset).
    Sample-like data, where items are of similar size, is where first-fit-decreasing wastes
    a slice of every row; this fills rows to within a token or two.
    """
    stacks: dict[int, list[int]] = {}
    for index in sorted(range(len(lengths)), key=lambda i: (lengths[i], -i)):
        stacks.setdefault(lengths[index], []).append(index)  # pop() yields the lowest index
    for stack in stacks.values():
        stack.reverse()
    bins: list[list[int]] = []
    while stacks:
        largest = max(stacks)
        group = [_take(stacks, largest)]
        room = capacity - largest
        for length in _best_fill(room, {n: len(s) for n, s in stacks.items() if n <= room}):
            group.append(_take(stacks, length))
        bins.append(group)
    return bins


def _take(stacks: dict[int, list[int]], length: int) -> int:
    index = stacks[length].pop()
    if not stacks[length]:
        del stacks[length]
    return index


def _best_fill(room: int, counts: dict[int, int]) -> list[int]:
    """Lengths (with repeats, within ``counts``) whose sum is the largest possible <= room."""
    import numpy as np

    if room <= 0 or not counts:
        return []
    reach = np.zeros(room + 1, dtype=bool)
    reach[0] = True
    via = np.zeros(room + 1, dtype=np.int64)  # the item length that first reached each sum
    for length in sorted(counts, reverse=True):
        for _ in range(min(counts[length], room // length)):
            grown = np.zeros_like(reach)
            grown[length:] = reach[:-length]
            new = grown & ~reach
            if not new.any():
                break
            via[new] = length
            reach |= new
        if reach[room]:
            break
    total = int(np.flatnonzero(reach)[-1])
    picked: list[int] = []
    while total > 0:
        picked.append(int(via[total]))
        total -= int(via[total])
    return picked


def split_indices(count: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/eval split of ``count`` items: same inputs, same split, anywhere."""
    order = list(range(count))
    random.Random(f"split:{seed}").shuffle(order)
    n_eval = min(count - 1, max(1, round(count * eval_fraction)))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def load_tenant_data(tenant: str, spec: DataSpec, tokenizer) -> TenantData:
    """Read, validate and tokenize one tenant's dataset into train and eval rows."""
    source = spec.path or "<no path>"
    fmt = spec.format
    report = DataReport(tenant=tenant, source=source, format=fmt)
    digest = hashlib.sha256()
    items: list[tuple[str, list[Turn] | str]] = []

    def bad(location: str, error: RecordError) -> None:
        if spec.on_bad_record == "error":
            raise DataError(tenant, source, error.reason, location, error.field)
        report.bad.append(BadRecord(location, error.field, error.reason))

    for location, record in read_records(source, tenant):
        report.records += 1
        if isinstance(record, RecordError):
            bad(location, record)
            continue
        if fmt == "auto":
            detected = detect_format(record)
            if detected is None:
                bad(location, RecordError(None, "unrecognised schema: expected 'messages', "
                                                "'conversations', 'instruction'+'output' or 'text'"))
                continue
            fmt = report.format = detected
        try:
            items.append((location, normalize_record(record, fmt)))
        except RecordError as exc:
            bad(location, exc)
            continue
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    if report.records == 0:
        raise DataError(tenant, source, "dataset is empty")
    if not items:
        raise DataError(tenant, source, f"no usable record: all {report.records} records are bad "
                                        f"(first: {report.bad[0].location}: {report.bad[0].reason})")
    report.fingerprint = digest.hexdigest()

    examples: list[Example] = []
    for location, item in items:
        try:
            example = render_example(item, tokenizer, spec.train_on)
        except RecordError as exc:
            bad(location, exc)
            continue
        if len(example.input_ids) > spec.max_seq_len:
            if spec.too_long == "error":
                raise DataError(tenant, source, f"{len(example.input_ids)} tokens, more than "
                                                f"max_seq_len={spec.max_seq_len}", location)
            if spec.too_long == "drop":
                report.dropped_too_long += 1
                continue
            report.truncated += 1
            example = Example(example.input_ids[: spec.max_seq_len], example.labels[: spec.max_seq_len])
        if all(label == IGNORE_INDEX for label in example.labels):
            report.dropped_no_target += 1  # e.g. the answer was truncated away entirely
            continue
        examples.append(example)
    if len(examples) < 2:
        raise DataError(tenant, source, f"only {len(examples)} usable example(s) after filtering; "
                                        "need at least 2 (one to train, one to evaluate)")
    train_idx, eval_idx = split_indices(len(examples), spec.eval_fraction, spec.split_seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = pack_rows([examples[i] for i in train_idx], spec.max_seq_len, pad_id, spec.packing)
    evaluation = pack_rows([examples[i] for i in eval_idx], spec.max_seq_len, pad_id, spec.packing)
    return TenantData(train=train, eval=evaluation, report=report)
