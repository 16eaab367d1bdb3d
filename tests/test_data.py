"""Tenant data: every format loads, every bad input gets a clear error, rows are right."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from farm.data import IGNORE_INDEX, DataError, load_tenant_data, pack_lengths, split_indices
from farm.spec import DataSpec

from .conftest import SAMPLE_DATA


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _spec(path, **kw) -> DataSpec:
    return DataSpec(path=str(path), **{"max_seq_len": 128, **kw})


CHAT = {"messages": [{"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello from Acme support! Hi."}]}


@pytest.mark.parametrize("file, fmt, records", [
    ("acme.jsonl", "chat", 600), ("globex.jsonl", "sharegpt", 500), ("initech.jsonl", "alpaca", 400),
    ("umbrella.parquet", "alpaca", 800), ("hooli.jsonl", "text", 300),
])
def test_every_sample_format_loads(tokenizer, file, fmt, records):
    data = load_tenant_data("t", _spec(SAMPLE_DATA / file), tokenizer)
    assert data.report.format == fmt
    assert data.report.records == records and data.report.skipped == 0
    assert len(data.train) > 0 and len(data.eval) > 0
    assert all(len(row) == 128 for row in data.train.input_ids)


def test_saved_datasets_folder_and_file_uri_load(tokenizer, tmp_path):
    import datasets

    records = [json.loads(line) for line in (SAMPLE_DATA / "initech.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(records[:50]).save_to_disk(str(tmp_path / "saved"))
    saved = load_tenant_data("t", _spec(tmp_path / "saved"), tokenizer)
    assert saved.report.records == 50 and saved.report.format == "alpaca"
    by_uri = load_tenant_data("t", _spec("file://" + str(SAMPLE_DATA / "hooli.jsonl")), tokenizer)
    by_path = load_tenant_data("t", _spec(SAMPLE_DATA / "hooli.jsonl"), tokenizer)
    assert by_uri.report.fingerprint == by_path.report.fingerprint
    assert by_uri.train.input_ids == by_path.train.input_ids


def test_chat_labels_cover_only_the_answers(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [CHAT] * 4)
    data = load_tenant_data("t", _spec(path, packing=False), tokenizer)
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Hello from Acme support! Hi.<|end|>\n"
    everything = load_tenant_data("t", _spec(path, packing=False, train_on="all"), tokenizer)
    n_all = sum(lab != IGNORE_INDEX for lab in everything.train.labels[0])
    # all tokens but the first (nothing predicts it) and the padding
    assert n_all == data.train.lengths[0] - 1


@pytest.mark.parametrize("content, location, reason", [
    (b"", None, "dataset is empty"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"messages": \n',
     "line 2", "invalid JSON"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2", "not valid UTF-8"),
    (b'{"text": "ok"}\n{"text": 5}\n', "line 2", "field 'text': expected a string, got a number"),
    (b'{"text": "ok"}\n{"txt": "x"}\n', "line 2", "field 'text': missing"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}\n', "line 1",
     "field 'messages[1].role': unknown role 'robot'"),
        (b'{"messages": [{"role": "user", "content": "only a question"}]}\n', None,
         "only 0 usable example(s) of 1 records (1 no assistant turn)"),
        (b'{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "b"}]}\n',
         "line 1", "field 'messages[0].content': is null"),
    (b'{"instruction": "do", "output": ["x"]}\n', "line 1", "field 'output': expected a string, got a list"),
    (b'{"colour": "red"}\n', "line 1", "unrecognised schema"),
    (b'[1, 2]\n', "line 1", "unrecognised schema"),
])
def test_bad_jsonl_input_is_named(tokenizer, tmp_path, content, location, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_tenant_data("acme", _spec(path), tokenizer)
    message = str(info.value)
    assert message.startswith(f"tenant 'acme': {path}")
    if location:
        assert f"{path} {location}:" in message
    assert reason in message


def test_missing_file_and_unsupported_type(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"tenant 'acme': .*nope\.jsonl: file not found"):
        load_tenant_data("acme", _spec(tmp_path / "nope.jsonl"), tokenizer)
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match="unsupported file type; expected JSON Lines"):
        load_tenant_data("acme", _spec(tmp_path / "data.xlsx"), tokenizer)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="the folder holds no data file"):
        load_tenant_data("acme", _spec(tmp_path / "folder"), tokenizer)
    (tmp_path / "folder" / "notes.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match="files that are not data: notes.xlsx"):
        load_tenant_data("acme", _spec(tmp_path / "folder"), tokenizer)


def test_declared_format_mismatch_and_parquet_rows_are_named(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [CHAT, CHAT])
    with pytest.raises(DataError, match=r"line 1: field 'instruction': missing"):
        load_tenant_data("t", _spec(path, format="alpaca"), tokenizer)
    table = pa.Table.from_pylist([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ""},
                                  {"instruction": "q", "output": "b"}])
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet row 2: field 'output': is empty"):
        load_tenant_data("t", _spec(tmp_path / "d.parquet"), tokenizer)


def test_skip_policy_counts_and_lists_bad_records(tokenizer, tmp_path):
    good = json.dumps(CHAT).encode()
    lines = [good, b"{broken", good, b'{"messages": []}', b"\xff\xfe", good, b'{"messages": [1]}', good]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = load_tenant_data("t", _spec(path, on_bad_record="skip"), tokenizer)
    report = data.report
    assert report.records == 8 and report.skipped == 4 and report.used == 4
    assert [b.location for b in report.bad] == ["line 2", "line 4", "line 5", "line 7"]
    assert [b.field for b in report.bad] == [None, "messages", None, "messages[0]"]  # the field path, in skip mode too
    assert "expected an object, got a number" in report.bad[3].reason
    assert "4 skipped: bad record" in report.summary()
    assert len(data.train) + len(data.eval) >= 1


def test_too_long_policies(tokenizer, tmp_path):
    long = {"text": " ".join(["release notes"] * 200)}
    path = _jsonl(tmp_path / "long.jsonl", [{"text": "short one"}, long, {"text": "short two"}, long])
    with pytest.raises(DataError, match=r"line 2: longer than max_seq_len=64 tokens"):
        load_tenant_data("t", _spec(path, max_seq_len=64, too_long="error"), tokenizer)
    dropped = load_tenant_data("t", _spec(path, max_seq_len=64, too_long="drop"), tokenizer)
    assert dropped.report.dropped_too_long == 2 and dropped.report.truncated == 0
    cut = load_tenant_data("t", _spec(path, max_seq_len=64, too_long="truncate", packing=False), tokenizer)
    assert cut.report.truncated == 2
    assert max(cut.train.lengths + cut.eval.lengths) == 64


def test_packing_fills_rows_and_keeps_examples_apart(tokenizer, base_model_dir):
    from transformers import AutoModelForCausalLM

    # acme's examples run to ~100 tokens: rows of 512 leave packing room for several per row
    packed = load_tenant_data("t", _spec(SAMPLE_DATA / "acme.jsonl", max_seq_len=512), tokenizer)
    unpacked = load_tenant_data("t", _spec(SAMPLE_DATA / "acme.jsonl", max_seq_len=512, packing=False), tokenizer)
    assert packed.train.padding_share < 0.05
    assert packed.train.real_tokens == unpacked.train.real_tokens
    assert len(packed.train) < len(unpacked.train) / 3
    # Block-diagonal attention: logits of an example inside a packed row equal its logits alone.
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()
    row = 0
    ids = torch.tensor([packed.train.input_ids[row]])
    pos = torch.tensor([packed.train.position_ids[row]])
    starts = [i for i, p in enumerate(packed.train.position_ids[row]) if p == 0]
    assert len(starts) >= 3  # at least two examples plus the padding segment
    with torch.no_grad():
        together = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        second = slice(starts[1], starts[2])
        alone = model(input_ids=ids[:, second], use_cache=False).logits[0]
    torch.testing.assert_close(together[second], alone, atol=1e-4, rtol=1e-4)


def test_pack_lengths_is_a_valid_tight_packing():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 60) for _ in range(500)]
    bins = pack_lengths(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    lower_bound = -(-sum(lengths) // 256)
    assert len(bins) <= lower_bound + 1


def test_split_and_fingerprint_are_deterministic(tokenizer, tmp_path):
    train, evaluation = split_indices(100, 0.1, seed=3)
    again = split_indices(100, 0.1, seed=3)
    assert list(train) == list(again[0]) and list(evaluation) == list(again[1])
    assert not set(train) & set(evaluation) and len(evaluation) == 10
    assert list(split_indices(100, 0.1, seed=4)[1]) != list(evaluation)
    records = [json.loads(x) for x in (SAMPLE_DATA / "hooli.jsonl").read_text().splitlines()][:40]
    a = load_tenant_data("t", _spec(_jsonl(tmp_path / "a.jsonl", records)), tokenizer)
    b = load_tenant_data("t", _spec(_jsonl(tmp_path / "b.jsonl", records)), tokenizer)
    records[5]["text"] += "!"
    c = load_tenant_data("t", _spec(_jsonl(tmp_path / "c.jsonl", records)), tokenizer)
    assert a.report.fingerprint == b.report.fingerprint != c.report.fingerprint
    assert a.eval.input_ids == b.eval.input_ids


def test_shipped_samples_match_the_generator(tmp_path):
    from farm.samples import SAMPLE_TENANTS, build_samples

    written = build_samples(tmp_path)
    for tenant in SAMPLE_TENANTS:
        shipped = SAMPLE_DATA / tenant.filename
        if shipped.suffix == ".parquet":
            assert pq.read_table(shipped).to_pylist() == pq.read_table(written[tenant.name]).to_pylist()
        else:
            assert shipped.read_bytes() == written[tenant.name].read_bytes()
        assert 200 <= tenant.examples <= 2000
    assert sum(p.stat().st_size for p in SAMPLE_DATA.iterdir()) < 5 * 2**20
