"""Tenant datasets: read, validate, render, tokenize, mask, pack, split, fingerprint.

The pipeline, for one tenant, streamed in batches of ``BATCH`` records::

    read_records()          farm.data.readers: JSONL, JSON arrays, CSV/TSV, Parquet, compressed,
                            folders and globs of shards, saved Dataset/DatasetDict; local or URI
      -> prepare_batch()    farm.data.prepare, here or on workers (farm.data.parallel):
           parse + normalize_record()   farm.data.records: chat / sharegpt / alpaca / completion / text
           Renderer                     farm.data.render: chat template, cut, tokenize, labels masked
      -> policies           tenant_examples(): bad records, too long, nothing to learn (record order)
      -> ExampleStore       farm.data.rows: examples spilled to disk, lengths kept in memory
      -> split + pack_rows  deterministic train/eval split; rows of max_seq_len, built lazily

Memory depends on ``max_seq_len`` and the batch, not on the file's size or its largest record.
Every problem is a ``DataError`` naming the tenant, the file, the position (1-based line, row
or item), the field and the reason. With ``on_bad_record: skip`` bad records are counted and
the first ``LISTED_BAD`` listed in the ``DataReport`` instead. A record with no assistant turn
is counted (``no_assistant``), never an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from farm.data.readers import SHAPES, DataError, ReadOptions, read_records
from farm.data.records import (ROLE_ALIASES, Chat, JsonText, NothingToLearn, RecordError, detect_format,
                                normalize_record, parse_json)
from farm.data.parallel import MAX_WORKERS, WORKER_BYTES, BatchPreparer, pipeline_workers
from farm.data.prepare import PreparedBatch, canonical_json, prepare_batch
from farm.data.render import Renderer, TokenizerParts, max_token_chars
from farm.data.rows import IGNORE_INDEX, Example, ExampleStore, Rows, pack_lengths, pack_rows, split_indices
from farm.jsonwords import kind
from farm.spec import DataSpec

__all__ = ["BATCH", "IGNORE_INDEX", "ROLE_ALIASES", "SHAPES", "BadRecord", "BatchPreparer", "Chat",
           "DataError", "DataReport", "Example", "ExampleBatch", "ExampleStore", "JsonText", "NothingToLearn",
           "PreparedBatch", "ReadOptions", "RecordError", "Renderer", "Rows", "TenantData", "TokenizerParts",
           "canonical_json", "detect_format", "kind", "load_tenant_data", "max_token_chars", "normalize_record",
           "pack_lengths", "pack_rows", "parse_json", "pipeline_bytes", "pipeline_workers", "prepare_batch",
           "preview_examples", "read_options", "read_records", "split_indices", "tenant_examples"]

BATCH = 512        # records prepared (parsed, rendered, tokenised) per call
LISTED_BAD = 20    # bad records listed by location in a report (all are counted)


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
    records: int = 0            # read from the files
    used: int = 0               # became examples in the rows
    bad_count: int = 0          # skipped as bad (on_bad_record: skip)
    bad: list[BadRecord] = field(default_factory=list)  # the first LISTED_BAD of them
    no_assistant: int = 0       # skipped: no assistant turn to learn from
    truncated: int = 0          # cut to max_seq_len (too_long: truncate)
    dropped_too_long: int = 0   # dropped as longer than max_seq_len (too_long: drop)
    dropped_no_target: int = 0  # dropped: no trainable token within max_seq_len
    tokens: int = 0             # real (non-padding) tokens in the train and eval rows
    train_rows: int = 0
    eval_rows: int = 0
    fingerprint: str = ""

    def skipped_by_reason(self) -> dict[str, int]:
        """Records left out before tokenising, by reason (zero counts left out)."""
        return {reason: count for reason, count in
                (("bad record", self.bad_count), ("no assistant turn", self.no_assistant)) if count}

    def dropped_by_reason(self) -> dict[str, int]:
        """Examples left out after tokenising, by reason (zero counts left out)."""
        return {reason: count for reason, count in
                (("too long", self.dropped_too_long), ("no trainable token", self.dropped_no_target)) if count}

    def not_used(self) -> dict[str, int]:
        """Every reason a record did not become an example, with its count."""
        return {**self.skipped_by_reason(), **self.dropped_by_reason()}

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason().values())

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason().values())

    @property
    def rows(self) -> int:
        return self.train_rows + self.eval_rows

    def summary(self) -> str:
        """One line a person can read: counts of everything that was not used as is."""
        parts = [f"{self.records} records ({self.format})", f"{self.used} used"]
        parts += [f"{count} skipped: {reason}" for reason, count in self.skipped_by_reason().items()]
        parts += [f"{count} dropped: {reason}" for reason, count in self.dropped_by_reason().items()]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_seq_len")
        return f"tenant '{self.tenant}': {', '.join(parts)}"

    #: The columns `farm data check` and the sweep report show, in order.
    COLUMNS = ("records", "used", "skipped", "truncated", "dropped", "tokens", "rows")

    def columns(self) -> dict[str, str]:
        """The table cells of ``COLUMNS``: counts, with the reasons for skipped and dropped."""
        def by_reason(counts: dict[str, int]) -> str:
            return ", ".join(f"{count:,} {reason}" for reason, count in counts.items()) or "0"

        return {"records": f"{self.records:,}", "used": f"{self.used:,}",
                "skipped": by_reason(self.skipped_by_reason()), "truncated": f"{self.truncated:,}",
                "dropped": by_reason(self.dropped_by_reason()), "tokens": f"{self.tokens:,}",
                "rows": f"{self.train_rows:,} + {self.eval_rows:,}"}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "DataReport":
        """A report from ``to_json``'s output (keys this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["bad"] = [BadRecord(**b) for b in values.get("bad", [])]
        return cls(**values)


@dataclass
class TenantData:
    """A tenant's training and eval rows plus the report of how they were made."""

    train: Rows
    eval: Rows
    report: DataReport


def pipeline_bytes(spec: DataSpec, cpus: float = 1.0) -> int:
    """Host memory a tenant's data pipeline may take at its peak, on top of the process itself.

    The batch being prepared (BATCH examples of up to max_seq_len tokens as Python lists of
    ids and flags, about 80 bytes a token with the rendered text), the largest record while it
    is parsed (its bytes, its text and the parsed strings: 4x data.max_record_mb), the read
    buffers, and with ``cpus`` of 2 or more the data workers that many CPUs start (each a
    light process with a batch of its own). Examples are spilled to a file and memory-mapped
    rows are page cache the kernel can reclaim, so neither counts.
    """
    one = BATCH * spec.max_seq_len * 80 + 4 * (spec.max_record_mb << 20) + (8 << 20)
    workers = min(int(cpus), MAX_WORKERS) if cpus >= 2 else 0
    return one + workers * (WORKER_BYTES + one)


def read_options(spec: DataSpec) -> ReadOptions:
    """The reader settings of a tenant's data spec."""
    return ReadOptions(encoding=spec.encoding, split=spec.split, max_record_bytes=spec.max_record_mb << 20)


@dataclass
class ExampleBatch:
    """Usable examples of a batch of records, after the tenant's policies, back to back."""

    locations: list[str]
    ids: np.ndarray       # int32
    trained: np.ndarray   # uint8
    lengths: list[int]
    targets: list[int]    # tokens that carry loss after the next-token shift, per example

    def example(self, k: int) -> Example:
        start = sum(self.lengths[:k])
        ids = self.ids[start: start + self.lengths[k]].tolist()
        trained = self.trained[start: start + self.lengths[k]].tolist()
        return Example(ids, [t if on else IGNORE_INDEX for t, on in zip(ids, trained)])


def tenant_examples(tenant: str, spec: DataSpec, tokenizer, report: DataReport) -> Iterator[ExampleBatch]:
    """Yield the usable examples of a tenant's dataset, batch by batch, counting everything
    else in ``report``.

    Records are prepared (parsed, normalised, rendered, tokenised) ``BATCH`` at a time, on
    worker processes once a dataset is large (``farm.data.parallel``); the policies of ``spec``
    (``on_bad_record``, ``too_long``) are applied here, in record order, so every consumer sees
    the same examples.
    """
    source = report.source
    preparer = BatchPreparer(Renderer(tokenizer, spec.train_on, spec.max_seq_len))
    digest = hashlib.sha256()
    pending: list[tuple[str, Any]] = []
    limit = spec.max_seq_len

    def skip(location: str, error: RecordError) -> None:
        if isinstance(error, NothingToLearn):
            report.no_assistant += 1
            return
        if spec.on_bad_record == "error":
            raise DataError(tenant, source, error.reason, location, error.field)
        report.bad_count += 1
        if len(report.bad) < LISTED_BAD:
            report.bad.append(BadRecord(location, error.field, error.reason))

    def apply_policies(ready) -> Iterator[ExampleBatch]:
        for batch, prepared in ready:
            digest.update(prepared.canonical)
            offsets = prepared.offsets.tolist()
            # trained tokens before each position: targets of any span in O(1)
            before = np.concatenate(([0], np.cumsum(prepared.trained, dtype=np.int64))).tolist()
            kept = ExampleBatch([], prepared.ids, prepared.trained, [], [])
            spans: list[tuple[int, int]] = []
            k = 0
            for (location, _), problem in zip(batch, prepared.problems):
                if problem is not None:
                    skip(location, problem)
                    continue
                start, length = offsets[k], offsets[k + 1] - offsets[k]
                k += 1
                if length > limit:
                    if spec.too_long == "error":
                        raise DataError(tenant, source, f"longer than max_seq_len={limit} tokens "
                                                        "(too_long: error)", location)
                    if spec.too_long == "drop":
                        report.dropped_too_long += 1
                        continue
                    report.truncated += 1
                    length = limit
                targets = before[start + length] - before[start]
                if not targets:
                    report.dropped_no_target += 1  # e.g. the answer was truncated away entirely
                    continue
                kept.locations.append(location)
                kept.lengths.append(length)
                kept.targets.append(targets)
                spans.append((start, length))
            if len(spans) != k or sum(kept.lengths) != len(prepared.ids):  # something was cut or left out
                kept.ids = np.concatenate([prepared.ids[a: a + n] for a, n in spans] or [prepared.ids[:0]])
                kept.trained = np.concatenate([prepared.trained[a: a + n] for a, n in spans] or [prepared.trained[:0]])
            report.used += len(spans)
            if spans:
                yield kept

    fmt = spec.format
    try:
        for location, record in read_records(source, tenant, read_options(spec)):
            report.records += 1
            if fmt == "auto" and not isinstance(record, RecordError):
                # The first record that parses decides the schema of the whole dataset.
                try:
                    record = parse_json(record) if isinstance(record, JsonText) else record
                except RecordError as exc:
                    skip(location, exc)
                    continue
                detected = detect_format(record)
                if detected is None:
                    keys = ", ".join(sorted(record)) if isinstance(record, dict) else kind(record)
                    skip(location, RecordError(None, f"unrecognised schema ({keys}): expected 'messages', "
                                                     "'conversations', 'instruction'+'output', 'prompt'+'completion' or 'text'"))
                    continue
                fmt = report.format = detected
            pending.append((location, record))
            if len(pending) >= BATCH:
                batch = list(pending)
                pending.clear()
                yield from apply_policies(preparer.submit(batch, fmt))
        if pending:
            yield from apply_policies(preparer.submit(list(pending), fmt))
        yield from apply_policies(preparer.drain())
    finally:
        preparer.close()  # also when a policy raised or the consumer stopped early
    report.fingerprint = digest.hexdigest()


def load_tenant_data(tenant: str, spec: DataSpec, tokenizer) -> TenantData:
    """Read, validate and tokenize one tenant's dataset into train and eval rows (streamed)."""
    report = DataReport(tenant=tenant, source=spec.path or "<no path>", format=spec.format)
    store = ExampleStore()
    for batch in tenant_examples(tenant, spec, tokenizer, report):
        store.add(batch.ids, batch.trained, batch.lengths, batch.targets)
    held_out = None
    if spec.eval_path is not None:  # eval examples from their own dataset, after the training ones
        held_out = DataReport(tenant=tenant, source=spec.eval_path, format=spec.format)
        for batch in tenant_examples(tenant, spec, tokenizer, held_out):
            store.add(batch.ids, batch.trained, batch.lengths, batch.targets)
    store.seal()
    if report.records == 0:
        raise DataError(tenant, report.source, "dataset is empty")
    if held_out is not None:
        if report.used < 1 or held_out.used < 1:
            empty = report if report.used < 1 else held_out
            raise DataError(tenant, empty.source, f"no usable example of {empty.records} records")
        train_idx = np.arange(report.used)
        eval_idx = np.arange(report.used, report.used + held_out.used)
        report.fingerprint = hashlib.sha256(f"{report.fingerprint}+{held_out.fingerprint}".encode()).hexdigest()
    elif report.used < 2:
        reasons = "; ".join(f"{count} {reason}" for reason, count in report.not_used().items())
        first = f" (first bad: {report.bad[0].location}: {report.bad[0].reason})" if report.bad else ""
        raise DataError(tenant, report.source, f"only {report.used} usable example(s) of {report.records} "
                                               f"records ({reasons or 'nothing skipped'}){first}; need at least 2 "
                                               "(one to train, one to evaluate)")
    else:
        train_idx, eval_idx = split_indices(report.used, spec.eval_fraction, spec.split_seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = pack_rows(store, train_idx, spec.max_seq_len, pad_id, spec.packing)
    evaluation = pack_rows(store, eval_idx, spec.max_seq_len, pad_id, spec.packing)
    report.train_rows, report.eval_rows = len(train), len(evaluation)
    report.tokens = train.real_tokens + evaluation.real_tokens
    return TenantData(train=train, eval=evaluation, report=report)


def preview_examples(tenant: str, spec: DataSpec, tokenizer, count: int) -> list[tuple[str, Example]]:
    """The first ``count`` usable examples, exactly as training sees them (for `farm data preview`)."""
    report = DataReport(tenant=tenant, source=spec.path or "<no path>", format=spec.format)
    out: list[tuple[str, Example]] = []
    examples = tenant_examples(tenant, spec, tokenizer, report)
    try:
        for batch in examples:
            out += [(batch.locations[k], batch.example(k)) for k in range(min(len(batch.locations), count - len(out)))]
            if len(out) >= count:
                break
    finally:
        examples.close()  # stops any workers at once
    return out
