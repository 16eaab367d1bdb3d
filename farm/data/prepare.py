"""One batch of raw records -> examples: the unit of work of the data pipeline.

Parse (JSON Lines text), normalise to a schema, write the canonical form the fingerprint hashes,
render through the chat template and tokenise, for a whole batch at once, returning compact
arrays. It runs in this process or in a worker (``farm.data.parallel``) with the same result,
so the parent only applies the tenant's policies and stores what is kept.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from farm.data.records import JsonText, RecordError, normalize_record, parse_json
from farm.data.render import Renderer


@dataclass
class PreparedBatch:
    """What a batch of records became, in record order."""

    problems: list[RecordError | None]  # per record: why it made no example, or None
    ids: np.ndarray        # int32: the examples' tokens, back to back
    trained: np.ndarray    # uint8: 1 where a token carries loss
    offsets: np.ndarray    # int64: example k is ids[offsets[k]:offsets[k + 1]]
    canonical: bytes       # the usable records' canonical JSON, one per line: the fingerprint's input


def canonical_json(record: Any) -> bytes:
    """The form of a record the dataset fingerprint hashes (key order and spacing do not count)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n"


def prepare_batch(items: Sequence[Any], fmt: str, renderer: Renderer) -> PreparedBatch:
    """Turn raw records (parsed, ``JsonText`` or a ``RecordError`` from the reader) of schema
    ``fmt`` into examples."""
    problems: list[RecordError | None] = []
    normalised = []
    canonical = bytearray()
    for item in items:
        try:
            if isinstance(item, RecordError):
                raise item
            record = parse_json(item) if isinstance(item, JsonText) else item
            normalised.append(normalize_record(record, fmt))
        except RecordError as exc:
            problems.append(exc)
            continue
        canonical += canonical_json(record)
        problems.append(None)
    rendered = renderer.render_batch(normalised)
    # Records that rendered badly join the others' problems, in record order.
    late = iter(rendered.problems)
    problems = [problem if problem is not None else next(late) for problem in problems]
    return PreparedBatch(problems, np.array(rendered.ids, dtype=np.int32), np.array(rendered.trained, dtype=np.uint8),
                         np.array(rendered.offsets, dtype=np.int64), bytes(canonical))
