"""Tenant data in every shape users hand over, trained side by side in one real sweep.

Issue 16's verification: "good ones train in a sweep next to bad ones; bad ones fail alone
with file, line or row, field and reason". Each tenant's files are built on the fly in a
different shape (a JSONL with a byte-order mark, a JSON array, CSV, gzip, zstd, a folder of
mixed shards, a saved DatasetDict, OpenAI chat with tool calls, ShareGPT and Gemini role
aliases) next to four broken ones (undeclared cp1252, a JSON array broken after its second
item, a CSV row missing a cell, a tool call whose arguments are not JSON).
``jobs/tenant_sweep.py`` runs them all with its own local Ray, as an operator would: the good
tenants are trained and published, each broken one is refused alone before anything starts,
and the report says what every good tenant's data became.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ..conftest import REPO, SAMPLE_DATA

pytestmark = pytest.mark.slow
SWEEP = [sys.executable, str(REPO / "jobs" / "tenant_sweep.py")]
ALPACA = ["instruction", "input", "output"]


def _sample(name: str, count: int) -> list[dict]:
    """The first ``count`` records of a sample tenant (each has a style an adapter learns)."""
    if name.endswith(".parquet"):
        return pq.read_table(SAMPLE_DATA / name).slice(0, count).to_pylist()
    with open(SAMPLE_DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(count), f)]


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _csv(records: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=ALPACA)
    writer.writeheader()
    writer.writerows(records)  # multi-line outputs become quoted cells spanning lines
    return out.getvalue().encode()


def _zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


def _tool_chat(i: int) -> dict:
    """OpenAI tool calling: a null content with tool calls (arguments as a JSON string), a
    ``tool`` turn with the result, then the answer in Acme's voice."""
    status = ("shipped", "packed", "delayed")[i % 3]
    return {"tools": [{"type": "function", "function": {"name": "get_order", "parameters": {"type": "object"}}}],
            "messages": [
                {"role": "user", "content": f"Where is order {i}?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": f"c{i}", "type": "function",
                     "function": {"name": "get_order", "arguments": json.dumps({"id": i})}}]},
                {"role": "tool", "tool_call_id": f"c{i}", "content": json.dumps({"status": status})},
                {"role": "assistant", "content": f"Hello from Acme! Order {i} is {status}."}]}


def _good_tenants(root: Path) -> dict[str, tuple[dict, int, int]]:
    """Write every good shape; returns tenant -> (its data settings, records read, records used)."""
    initech = _sample("initech.jsonl", 40)   # alpaca: numbered steps
    hooli = _sample("hooli.jsonl", 40)       # text: release notes
    acme = _sample("acme.jsonl", 40)         # chat: Acme's help desk
    umbrella = _sample("umbrella.parquet", 20)
    globex = _sample("globex.jsonl", 40)     # ShareGPT human/gpt: shouted news
    root.mkdir()
    tenants: dict[str, tuple[dict, int, int]] = {}

    (root / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + _jsonl(initech))
    tenants["bom"] = ({"path": str(root / "bom.jsonl")}, 40, 40)

    (root / "array.json").write_bytes(("[\n" + ",\n".join(json.dumps(r) for r in initech[:30]) + "\n]\n").encode())
    tenants["array"] = ({"path": str(root / "array.json")}, 30, 30)

    (root / "sheet.csv").write_bytes(_csv(initech[10:]))
    tenants["sheet"] = ({"path": str(root / "sheet.csv")}, 30, 30)

    (root / "notes.jsonl.gz").write_bytes(gzip.compress(_jsonl(hooli)))
    tenants["gz"] = ({"path": str(root / "notes.jsonl.gz")}, 40, 40)

    (root / "desk.jsonl.zst").write_bytes(_zstd(_jsonl(acme)))
    tenants["zst"] = ({"path": str(root / "desk.jsonl.zst")}, 40, 40)

    shards = root / "shards"
    shards.mkdir()
    (shards / "part-0.jsonl.gz").write_bytes(gzip.compress(_jsonl(umbrella[:12])))
    pq.write_table(pa.Table.from_pylist(umbrella[12:]), shards / "part-1.parquet")
    tenants["shards"] = ({"path": str(shards)}, 20, 20)

    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(initech[:3]),
                          "validation": datasets.Dataset.from_list(initech[:25])}).save_to_disk(str(root / "dd"))
    tenants["dsdict"] = ({"path": str(root / "dd"), "split": "validation"}, 25, 25)

    # A question nobody answered is counted (no assistant turn), not an error.
    unanswered = {"messages": [{"role": "user", "content": "Is anyone there?"}]}
    (root / "tools.jsonl").write_bytes(_jsonl([_tool_chat(i) for i in range(12)] + [unanswered]
                                              + [_tool_chat(i) for i in range(12, 24)]))
    tenants["tools"] = ({"path": str(root / "tools.jsonl")}, 25, 24)

    sharegpt = [{"conversations": [{"from": "human" if t["from"] == "human" else "bot", "value": t["value"]}
                                   for t in r["conversations"]]} for r in globex]
    (root / "sharegpt.jsonl").write_bytes(_jsonl(sharegpt))
    tenants["sharegpt"] = ({"path": str(root / "sharegpt.jsonl")}, 40, 40)

    gemini = [{"messages": [{"role": "user" if t["from"] == "human" else "model", "content": t["value"]}
                            for t in r["conversations"]]} for r in globex[:30]]
    (root / "gemini.jsonl").write_bytes(_jsonl(gemini))
    tenants["gemini"] = ({"path": str(root / "gemini.jsonl")}, 30, 30)
    return tenants


def _bad_tenants(root: Path) -> dict[str, tuple[dict, list[str]]]:
    """Write the broken shapes; returns tenant -> (its data settings, what its error must say)."""
    initech = _sample("initech.jsonl", 6)
    root.mkdir()
    tenants: dict[str, tuple[dict, list[str]]] = {}

    # Exported from Windows: line 4 is cp1252, and no data.encoding says so.
    win = _jsonl(initech[:3]) + (json.dumps({"instruction": "Name the café.", "output": "Café crème brûlée"},
                                            ensure_ascii=False) + "\n").encode("cp1252") + _jsonl(initech[3:])
    (root / "win.jsonl").write_bytes(win)
    tenants["cp1252"] = ({"path": str(root / "win.jsonl")},
                         ["tenant 'cp1252'", "win.jsonl line 4: not valid UTF-8 (byte 0xe9", "it looks like",
                          "cp1252", "declare it with data.encoding"])

    (root / "cut.json").write_text("[" + json.dumps(initech[0]) + ", " + json.dumps(initech[1]) + ", {oops}]")
    tenants["brokenarray"] = ({"path": str(root / "cut.json")},
                              ["tenant 'brokenarray'", "cut.json after item 2: invalid JSON array"])

    # Row 3 of the data is missing its output cell. Each earlier record spans lines (quoted
    # multi-line outputs), so its row number and its line number differ.
    short = _csv(initech[:2]) + b"Explain how to fold a map.,Keep it short.\n" + _csv(initech[2:4]).split(b"\r\n", 1)[1]
    lines_before = _csv(initech[:2]).count(b"\n")
    (root / "short.csv").write_bytes(short)
    tenants["shortrow"] = ({"path": str(root / "short.csv")},
                           ["tenant 'shortrow'", f"short.csv row 3 (line {lines_before + 1}): 2 cells, "
                            "but the header has 3 columns"])
    # A tool call whose arguments are not JSON: the record's field path says which one.
    broken = _tool_chat(2)
    broken["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{id: 2"
    (root / "calls.jsonl").write_bytes(_jsonl([_tool_chat(0), _tool_chat(1), broken, _tool_chat(3)]))
    tenants["badargs"] = ({"path": str(root / "calls.jsonl")},
                          ["tenant 'badargs'", "calls.jsonl line 3: field "
                           "'messages[1].tool_calls[0].function.arguments': not valid JSON"])
    return tenants


def _env() -> dict:
    return {**os.environ, "RAY_ADDRESS": "local", "RAY_DISABLE_USAGE_STATS": "1",
            "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


STEPS = 5


def test_every_shape_trains_next_to_broken_ones_that_fail_alone(tmp_path, write_spec):
    from farm.data import DataReport

    from ..conftest import FAST_DEFAULTS

    good = _good_tenants(tmp_path / "good")
    bad = _bad_tenants(tmp_path / "bad")
    # The tool-calling chats render to about 200 tokens (the tools' schema opens each one):
    # that tenant's rows are longer, so nothing is truncated (and it trains in its own pack).
    good["tools"][0]["max_seq_len"] = 256
    names = list(good)
    order = (names[:3] + ["cp1252"] + names[3:6] + ["brokenarray"] + names[6:8] + ["badargs"] + names[8:]
             + ["shortrow"])  # the broken ones between good ones
    settings = {**{n: d for n, (d, _, _) in good.items()}, **{n: d for n, (d, _) in bad.items()}}
    defaults = json.loads(json.dumps(FAST_DEFAULTS))
    defaults["train"].update(max_steps=STEPS, batch_size=2, warmup_steps=1, checkpoint_every=STEPS, log_every=STEPS)
    spec = write_spec([{"name": n, "data": settings[n]} for n in order], defaults,
                      resources={"workers": 1, "cpus_per_worker": 1, "max_retries": 1},
                      registry={"store": str(tmp_path / "registry")})

    run = subprocess.run(SWEEP + ["--config", str(spec), "--sweep-id", "shapes"], capture_output=True,
                         text=True, timeout=900, env=_env(), cwd=REPO)
    output = run.stdout + run.stderr
    (tmp_path / "sweep.log").write_text(output)
    assert run.returncode == 1, output[-5000:]  # some tenants this run was asked for are invalid
    out = tmp_path / "runs" / "shapes"
    report = json.loads((out / "report.json").read_text())
    by_name = {t["tenant"]: t for t in report["tenants"]}
    assert report["ok"] is False and set(by_name) == set(order)

    # Each broken tenant is refused alone, before anything starts, saying where and why.
    for name, (_, needles) in bad.items():
        outcome = by_name[name]
        assert outcome["status"] == "invalid", outcome
        for needle in needles:
            assert needle in outcome["error"], (needle, outcome["error"])
        assert f"{name}: invalid, not started: tenant '{name}'" in run.stdout
        assert outcome["data"] is None and outcome["steps"] == 0 and outcome["serve_name"] is None
        assert not (out / name / "result.json").exists()

    # The record without an answer was counted and said, not hidden.
    assert "tenant 'tools': 25 records (chat), 24 used, 1 skipped: no assistant turn" in run.stdout

    from farm.registry import open_registry

    registry = open_registry(str(tmp_path / "registry"))
    formats = {"bom": "alpaca", "array": "alpaca", "sheet": "alpaca", "gz": "text", "zst": "chat",
               "shards": "alpaca", "dsdict": "alpaca", "tools": "chat", "sharegpt": "sharegpt", "gemini": "chat"}
    for name, (_, records, used) in good.items():
        outcome = by_name[name]
        assert outcome["status"] == "trained" and outcome["error"] is None, outcome
        assert outcome["steps"] == STEPS and outcome["tokens"] > 0
        assert outcome["eval_loss_after"] < outcome["eval_loss_before"], outcome  # it learned its style
        assert (out / name / "adapter" / "adapter_model.safetensors").is_file()
        data = outcome["data"]
        assert data, outcome  # what its data became, as `farm data check` shows it
        assert (data["records"], data["used"], data["format"]) == (records, used, formats[name]), data
        assert data["bad_count"] == 0 and data["truncated"] == 0 and data["dropped_too_long"] == 0
        assert data["no_assistant"] == (1 if name == "tools" else 0)
        assert data["train_rows"] >= 1 and data["eval_rows"] >= 1 and len(data["fingerprint"]) == 64
        assert outcome["serve_name"] == f"{name}.test.v1"
        info = registry.resolve(f"{name}.test@latest")
        assert info.servable_by_vllm, info.not_servable_reason
        assert info.lineage["dataset_fingerprint"] == data["fingerprint"]
    assert registry.search()[1] == len(good)  # nothing published for the broken ones

    summary = (out / "report.md").read_text()
    assert f"{len(good)} of {len(order)} tenants succeeded" in summary
    assert summary.count("| trained |") == len(good) and summary.count("| invalid |") == len(bad)
    table = summary.split("## Tenant data", 1)[1].split("\n## ", 1)[0]  # this section only
    assert "| tenant | " + " | ".join(DataReport.COLUMNS) + " |" in table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"tenant", *good}  # the good tenants, and no row for a broken one
    assert rows["tools"].startswith("| tools | 25 | 24 | 1 no assistant turn | 0 | 0 |"), rows["tools"]
    assert rows["dsdict"].startswith("| dsdict | 25 | 25 | 0 | 0 | 0 |"), rows["dsdict"]
