"""Tokenised examples -> fixed-length training rows, with memory that does not grow with the data.

``ExampleStore`` spills each example's token ids and loss mask to two flat files as they are
made (memory keeps 12 bytes per example: its offset and target count), ``pack_lengths`` groups
examples into rows from their lengths alone, and ``Rows`` builds a row's tensors only when a
batch asks for it, reading the spilled tokens through a memory map.
"""

from __future__ import annotations

import tempfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE_INDEX = -100  # label value that cross-entropy skips


@dataclass(frozen=True)
class Example:
    """One rendered example: token ids and labels (IGNORE_INDEX where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


class ExampleStore:
    """Examples appended in batches to a private temporary folder; read back memory-mapped."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="farm-examples-")  # removed when collected
        root = Path(self._folder.name)
        self._paths = (root / "ids.i32", root / "trained.u8")
        self._files = [open(p, "wb") for p in self._paths]
        self._offsets = array("q", [0])
        self._targets = array("i")
        self._ids: np.ndarray | None = None
        self._trained: np.ndarray | None = None

    def add(self, ids: np.ndarray, trained: np.ndarray, lengths: Sequence[int], targets: Sequence[int]) -> None:
        """Append examples given back to back: int32 ``ids``, uint8 ``trained`` flags, and each
        example's length and count of targets (one write per file for the whole batch)."""
        if not len(lengths):
            return
        self._files[0].write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
        self._files[1].write(np.ascontiguousarray(trained, dtype=np.uint8).tobytes())
        end = self._offsets[-1]
        for length in lengths:
            end += length
            self._offsets.append(end)
        self._targets.extend(targets)

    def seal(self) -> None:
        """Finish writing; the examples become readable."""
        for file in self._files:
            file.close()
        total = self._offsets[-1]
        if total:
            self._ids = np.memmap(self._paths[0], dtype=np.int32, mode="r", shape=(total,))
            self._trained = np.memmap(self._paths[1], dtype=np.uint8, mode="r", shape=(total,))

    def __len__(self) -> int:
        return len(self._targets)

    def lengths(self) -> np.ndarray:
        offsets = np.frombuffer(self._offsets, dtype=np.int64)
        return np.diff(offsets)

    def targets(self, index: int) -> int:
        return self._targets[index]

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, trained mask) of example ``index``."""
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._ids[start:end], self._trained[start:end]


class _Column(Sequence):
    """``rows.input_ids[i]`` and friends: one row as a list, built on demand."""

    def __init__(self, rows: "Rows", part: int):
        self.rows, self.part = rows, part

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.rows.row(index)[self.part].tolist()

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # mutable-looking and compared by value


class Rows:
    """Fixed-length training rows of ``max_seq_len`` tokens, made from groups of examples.

    Packed rows hold several examples whose position ids restart at 0 each, which makes
    transformers' attention block-diagonal (no token attends across examples) when no
    attention mask is passed; their ``attention_mask`` is None. Unpacked rows hold one
    example each, right-padded, with an attention mask.
    """

    def __init__(self, store: ExampleStore, groups: list[np.ndarray], max_seq_len: int, pad_id: int, packed: bool):
        self.store, self.groups, self.max_seq_len, self.pad_id = store, groups, max_seq_len, pad_id
        self.packed = packed
        lengths = store.lengths() if len(store) else np.zeros(0, dtype=np.int64)
        self.lengths: list[int] = [int(lengths[g].sum()) for g in groups]  # real tokens of each row
        self.targets: list[int] = [sum(store.targets(int(i)) for i in g) for g in groups]
        self.real_tokens = sum(self.lengths)
        self.pad_tokens = len(groups) * max_seq_len - self.real_tokens
        self.input_ids, self.labels, self.position_ids = _Column(self, 0), _Column(self, 1), _Column(self, 2)
        self.attention_mask = None if packed else _Column(self, 3)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def padding_share(self) -> float:
        total = self.real_tokens + self.pad_tokens
        return self.pad_tokens / total if total else 0.0

    def examples_in(self, index: int) -> list[int]:
        """Example indices (in the store) packed into row ``index``, in order."""
        return [int(i) for i in self.groups[index]]

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(input ids, labels, position ids, attention mask) of one row, each ``max_seq_len`` long."""
        size = self.max_seq_len
        ids = np.full(size, self.pad_id, dtype=np.int64)
        labels = np.full(size, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(size, dtype=np.int64)
        at = 0
        for example in self.groups[index]:
            tokens, trained = self.store.example(int(example))
            end = at + len(tokens)
            ids[at:end] = tokens
            labels[at:end] = np.where(trained.astype(bool), tokens, IGNORE_INDEX)
            positions[at:end] = np.arange(len(tokens))
            at = end
        mask = np.zeros(size, dtype=np.int64)
        mask[:at] = 1
        if self.packed:
            positions[at:] = np.arange(size - at)  # the padding is one more "example" nobody attends to
        return ids, labels, positions, mask

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The rows ``indices`` stacked: input_ids, labels, position_ids, attention_mask."""
        parts = [self.row(i) for i in indices]
        return {name: np.stack([p[k] for p in parts]) for k, name in
                enumerate(("input_ids", "labels", "position_ids", "attention_mask"))}


def pack_rows(store: ExampleStore, indices: np.ndarray, max_seq_len: int, pad_id: int, packing: bool) -> Rows:
    """Rows from the store's examples ``indices``: packed (see ``pack_lengths``) or one per row."""
    indices = np.asarray(indices, dtype=np.int64)
    if packing and len(indices):
        lengths = store.lengths()[indices]
        groups = [indices[g] for g in pack_lengths(lengths, max_seq_len)]
    else:
        groups = [indices[i: i + 1] for i in range(len(indices))]
    return Rows(store, groups, max_seq_len, pad_id, packing)


def pack_lengths(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[np.ndarray]:
    """Group item indices into bins whose lengths sum to at most ``capacity``.

    Minimum-bin-slack packing: each bin takes the largest item left, then the subset of the
    remaining items that fills it best (a bounded subset-sum, solved exactly with a bitset).
    Sample-like data, where items are of similar size, is where first-fit-decreasing wastes
    a slice of every row; this fills rows to within a token or two. Memory is a few arrays
    of the item count; items of one length are taken lowest index first.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")  # by length, then by index
    distinct, starts, counts = np.unique(lengths[order], return_index=True, return_counts=True)
    cursor = {int(n): int(s) for n, s in zip(distinct, starts)}
    left = {int(n): int(c) for n, c in zip(distinct, counts)}
    present = sorted(left)  # distinct lengths with items left, ascending

    def take(length: int) -> int:
        item = int(order[cursor[length]])
        cursor[length] += 1
        left[length] -= 1
        if not left[length]:
            present.remove(length)
        return item

    bins: list[np.ndarray] = []
    while present:
        largest = present[-1]
        group = [take(largest)]
        room = capacity - largest
        for length in _best_fill(room, {n: left[n] for n in present if n <= room}):
            group.append(take(length))
        bins.append(np.asarray(group, dtype=np.int64))
    return bins


def _best_fill(room: int, counts: dict[int, int]) -> list[int]:
    """Lengths (with repeats, within ``counts``) whose sum is the largest possible <= room.

    The reachable sums are the bits of one Python integer, so each added item is a shift and
    an or over ``room`` bits.
    """
    if room <= 0 or not counts:
        return []
    full = (1 << (room + 1)) - 1
    reach = 1  # bit s set: sum s is reachable
    via: dict[int, int] = {}  # the item length that first reached each sum
    for length in sorted(counts, reverse=True):
        for _ in range(min(counts[length], room // length)):
            new = (reach << length) & full & ~reach
            if not new:
                break
            bits = new
            while bits:
                low = bits & -bits
                via[low.bit_length() - 1] = length
                bits ^= low
            reach |= new
        if reach >> room & 1:
            break
    total = reach.bit_length() - 1
    picked: list[int] = []
    while total > 0:
        picked.append(via[total])
        total -= via[total]
    return picked


def split_indices(count: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/eval split of ``count`` items: same inputs, same split, anywhere.

    numpy's PCG64 stream for a given seed is fixed across platforms and releases.
    """
    order = np.random.default_rng(seed).permutation(count)
    n_eval = min(count - 1, max(1, round(count * eval_fraction)))
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])
