"""Tenant data as users hand it over: every file shape, chat shape and encoding, read the same way.

Each shape is built on the fly from the same records, so a shape that loses, reorders or alters
a record changes the fingerprint (a hash of the records in order) and fails.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farm.data import IGNORE_INDEX, DataError, load_tenant_data, preview_examples
from farm.spec import DataSpec

RECORDS = [{"instruction": f"Summarise ticket {i}: the printer on floor {i % 7} is jammed, café ☕",
            "input": "" if i % 3 else f"priority {i % 4}", "output": f"Ticket {i}: jammed printer; send a technician."}
           for i in range(60)]


def _spec(path, **kw) -> DataSpec:
    return DataSpec(path=str(path), **{"max_seq_len": 128, **kw})


def _jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _csv_bytes(records, delimiter=",", encoding="utf-8") -> bytes:
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["instruction", "input", "output"], delimiter=delimiter)
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue().encode(encoding)


def _zstd(data: bytes) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


def _write_shape(root: Path, shape: str) -> tuple[Path, dict]:
    """Write RECORDS in ``shape``; returns the path to give the farm and extra data settings."""
    root.mkdir()
    if shape == "jsonl with BOM":
        (root / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + _jsonl_bytes(RECORDS))
        return root / "d.jsonl", {}
    if shape == "json array":
        (root / "d.json").write_bytes(b"\xef\xbb\xbf  [\n" + ",\n".join(json.dumps(r) for r in RECORDS).encode() + b"\n]\n")
        return root / "d.json", {}
    if shape == "csv":
        (root / "d.csv").write_bytes(b"\xef\xbb\xbf" + _csv_bytes(RECORDS).replace(b"\n", b"\r\n"))
        return root / "d.csv", {}
    if shape == "tsv cp1252":
        # Declared encoding: the café survives; the emoji does not exist in cp1252.
        (root / "d.tsv").write_bytes(_csv_bytes(_no_emoji(RECORDS), "\t", "cp1252"))
        return root / "d.tsv", {"encoding": "cp1252"}
    if shape == "jsonl.gz":
        (root / "d.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(RECORDS)))
        return root / "d.jsonl.gz", {}
    if shape == "jsonl.zst":
        (root / "d.jsonl.zst").write_bytes(_zstd(_jsonl_bytes(RECORDS)))
        return root / "d.jsonl.zst", {}
    if shape == "csv.bz2":
        (root / "d.csv.bz2").write_bytes(bz2.compress(_csv_bytes(RECORDS)))
        return root / "d.csv.bz2", {}
    if shape == "shards folder":
        # Mixed shard formats, a README and a hidden file next to them, read in name order.
        (root / "part-0.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(RECORDS[:20])))
        pq.write_table(pa.Table.from_pylist(RECORDS[20:45]), root / "part-1.parquet")
        (root / "part-2.json").write_bytes(json.dumps(RECORDS[45:]).encode())
        (root / "README.md").write_text("# tickets\n")
        (root / ".DS_Store").write_bytes(b"\x00\x01")
        return root, {}
    if shape == "glob":
        for k in range(3):
            (root / f"train-{k}.jsonl").write_bytes(_jsonl_bytes(RECORDS[k * 20:(k + 1) * 20]))
        (root / "test-0.jsonl").write_bytes(_jsonl_bytes(RECORDS[:5]))
        return root / "train-*.jsonl", {}
    if shape == "DatasetDict":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:5]),
                              "validation": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(root / "dd"))
        return root / "dd", {"split": "validation"}
    raise AssertionError(shape)


def _no_emoji(records):
    return [{k: v.replace(" ☕", "") for k, v in r.items()} for r in records]


SHAPES = ["jsonl with BOM", "json array", "csv", "tsv cp1252", "jsonl.gz", "jsonl.zst", "csv.bz2",
          "shards folder", "glob", "DatasetDict"]


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
    """The plain-JSONL load of RECORDS (and of the cp1252-safe copy) every shape must match."""
    root = tmp_path_factory.mktemp("reference")
    (root / "a.jsonl").write_bytes(_jsonl_bytes(RECORDS))
    (root / "b.jsonl").write_bytes(_jsonl_bytes(_no_emoji(RECORDS)))
    return {"plain": load_tenant_data("t", _spec(root / "a.jsonl"), tokenizer),
            "no emoji": load_tenant_data("t", _spec(root / "b.jsonl"), tokenizer)}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_reads_the_same_records(tokenizer, tmp_path, reference, shape):
    path, extra = _write_shape(tmp_path / "data", shape)
    data = load_tenant_data("t", _spec(path, **extra), tokenizer)
    expected = reference["no emoji" if shape == "tsv cp1252" else "plain"]
    assert data.report.records == len(RECORDS) and data.report.used == len(RECORDS)
    assert data.report.format == "alpaca"
    assert data.report.fingerprint == expected.report.fingerprint  # same records, same order
    assert list(data.train.input_ids) == list(expected.train.input_ids)


def _load_error(tokenizer, path, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_tenant_data("acme", _spec(path, **kw), tokenizer)
    return str(info.value)


def test_bad_shapes_name_file_position_and_reason(tokenizer, tmp_path):
    # Undeclared cp1252: the error names the line and the likely encoding.
    (tmp_path / "win.jsonl").write_bytes(_jsonl_bytes(RECORDS[:3]) + '{"text": "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e"}\n'.encode("cp1252"))
    message = _load_error(tokenizer, tmp_path / "win.jsonl")
    assert "win.jsonl line 4: not valid UTF-8 (byte 0xe9 at column 14)" in message
    assert "declare it with data.encoding" in message and "it looks like" in message
    # UTF-16 without a declaration.
    (tmp_path / "u16.jsonl").write_bytes(_jsonl_bytes(RECORDS[:3]).decode().encode("utf-16"))
    assert "the file is UTF-16" in _load_error(tokenizer, tmp_path / "u16.jsonl")
    assert load_tenant_data("t", _spec(tmp_path / "u16.jsonl", encoding="utf-16"), tokenizer).report.used == 3
    # CSV: a row with a missing cell, by row and physical line (a quoted cell spans two lines).
    two = [{**RECORDS[0], "output": 'Send a "technician",\nthen close it.'}, RECORDS[1]]
    (tmp_path / "d.csv").write_bytes(_csv_bytes(two) + b"only,two\n")
    message = _load_error(tokenizer, tmp_path / "d.csv")
    assert "d.csv row 3 (line 5): 2 cells, but the header has 3 columns" in message
    # A JSON array broken after its second item: the rest cannot be read, the error says where.
    (tmp_path / "a.json").write_text("[" + json.dumps(RECORDS[0]) + "," + json.dumps(RECORDS[1]) + ", {oops}]")
    assert "a.json after item 2: invalid JSON array" in _load_error(tokenizer, tmp_path / "a.json")
    # A .json file that is neither JSON Lines nor an array says what is expected.
    (tmp_path / "p.json").write_text(json.dumps(RECORDS[0], indent=2))
    assert "one JSON object per line (JSON Lines) or one JSON array" in _load_error(tokenizer, tmp_path / "p.json")
    # A truncated gzip file.
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(RECORDS))[:200])
    assert "cannot read (corrupt or truncated file?)" in _load_error(tokenizer, tmp_path / "t.jsonl.gz")
    # A DatasetDict without the split asked for; a glob that matches nothing.
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:4])}).save_to_disk(str(tmp_path / "dd"))
    assert "has splits train, not 'test'; choose one with data.split" in _load_error(tokenizer, tmp_path / "dd", split="test")
    assert "no file matches the pattern" in _load_error(tokenizer, tmp_path / "none-*.jsonl")
    # In a folder of shards, the error names the shard and its line.
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.jsonl").write_bytes(_jsonl_bytes(RECORDS[:3]))
    (tmp_path / "shards" / "b.jsonl").write_bytes(_jsonl_bytes(RECORDS[:1]) + b'{"instruction": "x", "output": null}\n')
    message = _load_error(tokenizer, tmp_path / "shards")
    assert "shards b.jsonl line 2: field 'output': expected a string, got null" in message
    # An undecodable name of an encoding is refused by the spec itself.
    with pytest.raises(ValueError, match="unknown text encoding 'klingon'"):
        _spec(tmp_path / "d.csv", encoding="klingon")


def test_a_record_over_max_record_mb_is_refused_without_reading_it(tokenizer, tmp_path):
    big = json.dumps({"text": "x" * (3 << 20)})
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a b"}) + "\n" + big + "\n" + json.dumps({"text": "c d"}) + "\n")
    message = _load_error(tokenizer, tmp_path / "d.jsonl", max_record_mb=1)
    assert "d.jsonl line 2: longer than data.max_record_mb (1 MiB); not read" in message
    skipped = load_tenant_data("t", _spec(tmp_path / "d.jsonl", max_record_mb=1, on_bad_record="skip"), tokenizer)
    assert skipped.report.used == 2 and skipped.report.bad[0].location == "line 2"


CHAT_WITH_TOOLS = {
    "tools": [{"type": "function", "function": {"name": "get_order", "parameters": {"type": "object"}}}],
    "messages": [
        {"role": "developer", "content": "You are Acme's support bot."},
        {"role": "user", "content": "Where is order 42?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_order", "arguments": "{\"id\": 42}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"status\": \"shipped\"}"},
        {"role": "assistant", "content": [{"type": "text", "text": "Order 42 has shipped."}]},
    ]}


def test_chat_shapes_tool_calls_aliases_and_records_without_answers(tokenizer, tmp_path):
    aliases = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello from Acme!"}]}
    gemini = {"messages": [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello from Acme!"}]}
    question_only = {"messages": [{"role": "user", "content": "Anyone there?"}]}
    path = tmp_path / "chat.jsonl"
    path.write_bytes(_jsonl_bytes([CHAT_WITH_TOOLS, question_only, CHAT_WITH_TOOLS, question_only, CHAT_WITH_TOOLS]))
    data = load_tenant_data("t", _spec(path, max_seq_len=256), tokenizer)  # on_bad_record: error
    assert data.report.used == 3 and data.report.no_assistant == 2
    assert data.report.skipped_by_reason() == {"no assistant turn": 2}
    # What trains: the tool call (rendered by the template) and the final answer, nothing else.
    (_, example), = preview_examples("t", _spec(path, max_seq_len=256), tokenizer, 1)
    trained = _trained_spans(tokenizer, example)
    assert trained == ['<tool_call>{"name": "get_order", "arguments": {"id": 42}}</tool_call><|end|>\n',
                       "Order 42 has shipped.<|end|>\n"]
    text = tokenizer.decode(example.input_ids)
    assert text.startswith('<|begin|><|system|>\nTools: [{"type": "function"') and "<|tool|>\n{\"status\"" in text
    for record in (aliases, gemini):
        one = tmp_path / "one.jsonl"
        one.write_bytes(_jsonl_bytes([record, record]))
        (_, example), = preview_examples("t", _spec(one), tokenizer, 1)
        assert tokenizer.decode(example.input_ids).startswith("<|begin|><|user|>\nHi<|end|>\n<|assistant|>\nHello")
    # A base whose chat template has no tool support refuses tool calls by name.
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    with pytest.raises(DataError, match=r"line 1: field 'messages': uses tool calls, but the base model's chat "
                                        r"template has no tool support"):
        load_tenant_data("t", _spec(path), plain)
    # Bad tool calls are named by their field path.
    broken = json.loads(json.dumps(CHAT_WITH_TOOLS))
    broken["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{id: 42"
    path.write_bytes(_jsonl_bytes([broken]))
    message = _load_error(tokenizer, path)
    assert "line 1: field 'messages[2].tool_calls[0].function.arguments': not valid JSON" in message


def _trained_spans(tokenizer, example) -> list[str]:
    spans, current = [], []
    for token, label in zip(example.input_ids + [None], example.labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans


def test_cut_before_tokenising_keeps_the_first_max_seq_len_tokens(tokenizer, tmp_path):
    import random

    rng = random.Random(0)
    words = ["printer", "jammed", "café", "ticket", "42", "réseau", "—", "ok", "\n", "  "]
    text = " ".join(rng.choice(words) for _ in range(40_000))  # far past any budget of 64 tokens
    (tmp_path / "d.jsonl").write_bytes(_jsonl_bytes([{"text": text}, {"text": "short"}]))
    data = load_tenant_data("t", _spec(tmp_path / "d.jsonl", max_seq_len=64, packing=False), tokenizer)
    assert data.report.truncated == 1
    whole = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [data.train.input_ids[i] for i in range(len(data.train))] + [data.eval.input_ids[0]]
    assert whole[:64] in rows


@pytest.mark.slow  # starts data worker processes
def test_worker_processes_give_the_same_examples_and_errors(tokenizer, tmp_path, monkeypatch):
    """Batches prepared on worker processes (farm.data.parallel) come back in order: the same
    rows, fingerprint and counts as in this process, and a bad record after the workers started
    is named by its own line."""
    import psutil

    import farm.data.parallel as parallel

    lines = [json.dumps({"messages": [{"role": "user", "content": f"Where is order {i}?"},
                                      {"role": "assistant", "content": f"Order {i} ships today."}]}) for i in range(3000)]
    lines[2500] = '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}'
    lines[2700] = '{"messages": [{"role": "user", "content": "no answer"}]}'
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    spec = _spec(tmp_path / "d.jsonl", on_bad_record="skip")
    monkeypatch.setenv("FARM_DATA_WORKERS", "1")
    alone = load_tenant_data("t", spec, tokenizer)
    monkeypatch.setattr(parallel, "POOL_AFTER_BATCHES", 2)  # workers from the third batch of 512 on
    monkeypatch.setenv("FARM_DATA_WORKERS", "2")
    started: list[int] = []
    original = parallel._Worker.__init__

    def spy(self, *args):
        original(self, *args)
        started.append(self.process.pid)

    monkeypatch.setattr(parallel._Worker, "__init__", spy)
    pooled = load_tenant_data("t", spec, tokenizer)
    assert len(started) == 2
    assert pooled.report.to_json() == alone.report.to_json()
    assert pooled.report.bad[0].location == "line 2501" and pooled.report.no_assistant == 1
    assert list(pooled.train.input_ids) == list(alone.train.input_ids)
    with pytest.raises(DataError, match=r"d\.jsonl line 2501: field 'messages\[0\]\.content': expected a string, got a number"):
        load_tenant_data("t", _spec(tmp_path / "d.jsonl"), tokenizer)
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in started)
