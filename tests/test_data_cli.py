"""`farm data check` and `farm data preview` as a user runs them, and what they cost in memory."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

#: Runs a command and prints the peak resident memory of its process tree's largest process.
_PEAK_RSS = ("import resource, subprocess, sys\n"
             "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "sys.stderr.write(done.stdout + done.stderr)\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
             "sys.exit(done.returncode)\n")
_FARM = [sys.executable, "-c", "from farm.cli import app; app()"]


def _farm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_FARM, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "250"})


def _peak_rss_kib(*args: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, *_FARM, *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1])


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Where is my order {i}?"},
                         {"role": "assistant", "content": f"Hello from Acme support! Order {i} ships today."}]}


@pytest.mark.slow  # the farm command in subprocesses over whole datasets
def test_data_check_reports_every_count_and_fails_on_a_bad_tenant(write_spec, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    lines = [json.dumps(_chat(i)) for i in range(20)]
    lines[3] = '{"messages": [{"role": "user", "content": "only a question"}]}'
    lines[5] = "{broken"
    lines[7] = json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y " * 400}]})
    mixed.write_text("\n".join(lines) + "\n")
    spec = write_spec([
        {"name": "good", "data": {"path": str(mixed), "on_bad_record": "skip", "too_long": "drop"}},
        {"name": "bad", "data": {"path": str(mixed)}},
    ])
    done = _farm("data", "check", str(spec), "--json")
    assert done.returncode == 1, done.stderr
    good, bad = json.loads(done.stdout)
    assert (good["records"], good["used"], good["bad_count"], good["no_assistant"], good["dropped_too_long"]) == (20, 17, 1, 1, 1)
    assert good["bad"] == [{"location": "line 6", "field": None, "reason": "invalid JSON: Expecting property name "
                                                                          "enclosed in double quotes at column 2"}]
    assert bad["error"].startswith(f"tenant 'bad': {mixed} line 6: invalid JSON")
    table = _farm("data", "check", str(spec), "--tenant", "good").stdout
    for cell in ("20", "17", "1 bad record, 1 no assistant turn", "1 too long"):
        assert cell in table


@pytest.mark.slow  # the farm command in subprocesses over whole datasets
def test_preview_marks_exactly_the_assistant_spans(write_spec, tmp_path):
    path = tmp_path / "two-turns.jsonl"
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello from Acme!"}, {"role": "user", "content": "Bye"},
                           {"role": "assistant", "content": "Goodbye from Acme!"}]}
    path.write_text(json.dumps(record) + "\n" + json.dumps(_chat(1)) + "\n")
    spec = write_spec([{"name": "acme", "data": {"path": str(path)}}])
    done = _farm("data", "preview", str(spec), "--tenant", "acme", "-n", "2", "--json")
    assert done.returncode == 0, done.stderr
    first, second = json.loads(done.stdout)
    assert first["location"] == "line 1" and second["location"] == "line 2"
    assert first["trained_spans"] == ["Hello from Acme!<|end|>\n", "Goodbye from Acme!<|end|>\n"]
    assert second["trained_spans"] == ["Hello from Acme support! Order 1 ships today.<|end|>\n"]
    assert len(first["input_ids"]) == len(first["trained"]) == first["tokens"]
    text = _farm("data", "preview", str(spec), "--tenant", "acme", "-n", "1").stdout
    assert "⟦Hello from Acme!<|end|>\n⟧" in text and "<|user|>\nBye<|end|>\n<|assistant|>\n⟦Goodbye" in text
    missing = _farm("data", "preview", str(spec), "--tenant", "nobody")
    assert missing.returncode == 2 and "tenant 'nobody' is not in" in missing.stderr


@pytest.mark.slow  # builds a large file and measures a subprocess
def test_data_check_memory_does_not_grow_with_the_largest_record_or_the_file(write_spec, tmp_path):
    """Peak RSS of `farm data check` on a 10 MB record of millions of tokens and on 200,000
    records stays within 1.2x of its peak on a 300-record file."""
    rng = random.Random(0)
    normal = [json.dumps(_chat(i)) for i in range(300)]
    (tmp_path / "small.jsonl").write_text("\n".join(normal) + "\n")
    alphabet = "abcdefghijklmnopqrstuvwxyz      .,"
    huge_answer = "".join(rng.choices(alphabet, k=10_000_000))
    huge = {"messages": [{"role": "user", "content": "Tell me everything."}, {"role": "assistant", "content": huge_answer}]}
    (tmp_path / "huge.jsonl").write_text("\n".join(normal[:299] + [json.dumps(huge)]) + "\n")
    with open(tmp_path / "many.jsonl", "w") as out:
        for i in range(200_000):
            out.write(json.dumps(_chat(i)) + "\n")
    spec = write_spec([{"name": name, "data": {"path": str(tmp_path / f"{name}.jsonl"), "max_seq_len": 256}}
                       for name in ("small", "huge", "many")])
    peaks = {name: _peak_rss_kib("data", "check", str(spec), "--tenant", name) for name in ("small", "huge", "many")}
    assert peaks["huge"] <= 1.2 * peaks["small"], peaks
    assert peaks["many"] <= 1.2 * peaks["small"], peaks
    truncated = json.loads(_farm("data", "check", str(spec), "--tenant", "huge", "--json").stdout)[0]
    assert truncated["truncated"] == 1 and truncated["used"] == 300


def test_sample_tenants_check_clean(write_spec):
    done = _farm("data", "check", str(write_spec()), "--json")
    assert done.returncode == 0, done.stderr
    reports = {r["tenant"]: r for r in json.loads(done.stdout)}
    assert set(reports) == {"acme", "globex", "initech", "umbrella", "hooli"}
    assert all(r["used"] == r["records"] and r["tokens"] > 0 for r in reports.values())
