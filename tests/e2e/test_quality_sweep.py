"""Quality evals and eval-gated promotion end to end: a real sweep on a local Ray scores every
adapter, publishes it with the figures and the gate's decision in its lineage, moves
@production only for the versions that pass, and computes the cross-tenant matrix; then
`farm registry promote --if-better` makes the same decision by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from farm.registry import open_registry
from farm.registry.core import NotFound

from ..conftest import REPO, SAMPLE_DATA
from .test_sweep import FARM_SWEEP, _env, _run, _spec

pytestmark = pytest.mark.slow


def _farm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "farm.cli", *args], capture_output=True, text=True,
                          timeout=600, env=_env(), cwd=REPO)


def test_the_sweep_promotes_only_versions_that_pass_the_gate_and_the_cli_agrees(tmp_path, base_model_dir):
    tenants = [
        # passes: every answer of at most 10,000 words
        {"name": "good", "data": {"path": str(SAMPLE_DATA / "acme.jsonl")}, "eval": {"checks": [{"max_words": 10000}]}},
        # fails: a random base trained 4 steps never opens with acme's greeting
        {"name": "bad", "data": {"path": str(SAMPLE_DATA / "globex.jsonl")},
         "eval": {"checks": [{"name": "greeting", "starts_with": "Hello from Acme support!"}]}},
        {"name": "plain", "data": {"path": str(SAMPLE_DATA / "initech.jsonl"), "format": "alpaca"}},
    ]
    spec = _spec(tmp_path, base_model_dir, tenants, max_steps=4, checkpoint_every=4)
    raw = yaml.safe_load(spec.read_text())
    raw["defaults"]["eval"] = {"prompts": 4, "max_new_tokens": 8,
                               "promote": {"alias": "production", "min_pass_rate": 0.9}}
    raw["quality"] = {"matrix_rows": 4}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))

    first = _run(["--config", str(spec), "--sweep-id", "q1"], command=FARM_SWEEP)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "q1" / "report.json").read_text())
    quality = {t["tenant"]: t["quality"] for t in report["tenants"]}
    assert quality["good"]["checks"][0]["adapter"] == 1.0 and quality["good"]["decision"]["decision"] == "promoted"
    assert quality["bad"]["checks"][0] == {"check": "greeting", "base": 0.0, "adapter": 0.0, "incumbent": None}
    assert quality["bad"]["decision"]["decision"] == "held"
    assert quality["plain"]["checks"] == [] and quality["plain"]["decision"]["decision"] == "promoted"
    assert "behaviour checks on held-out prompts" in first.stdout and "cross-tenant eval loss" in first.stdout
    matrix = report["matrix"]
    assert sorted(matrix["tenants"]) == ["bad", "good", "plain"] and matrix["rows"] == 4
    assert all(loss > 0 for row in matrix["loss"].values() for loss in row.values())
    assert set(matrix["own_best"]) == {"bad", "good", "plain"}

    registry = open_registry(str(tmp_path / "registry"))
    assert registry.get("good", "e2e", alias="production").version == 1
    assert registry.get("plain", "e2e", alias="production").version == 1
    with pytest.raises(NotFound):  # published, not promoted
        registry.get("bad", "e2e", alias="production")
    held = registry.get("bad", "e2e", 1).lineage["promotion"]
    assert held["decision"] == "held" and "greeting passed 0%" in held["reason"]
    assert held["candidate"]["pass_rates"] == {"greeting": 0.0} and held["gate"]["min_pass_rate"] == 0.9
    assert registry.get("bad", "e2e", 1).lineage["quality"]["checks"][0]["base"] == 0.0

    # A second sweep of `good` with a stricter gate: scored against good.e2e.v1, which holds @production
    raw["tenants"][0]["eval"]["promote"] = {"alias": "production", "min_improvement": 0.5}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    second = _run(["--config", str(spec), "--sweep-id", "q2", "--tenants", "good"], command=FARM_SWEEP)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    decision = registry.get("good", "e2e", 2).lineage["promotion"]
    assert decision["decision"] == "held" and "does not beat good.e2e.v1's" in decision["reason"]
    assert decision["incumbent"] == "good.e2e.v1" and decision["current"]["eval_loss"] > 0
    assert registry.get("good", "e2e", alias="production").version == 1

    # By hand, with no margin: promoted exactly when v2 scores no worse than v1 on v2's data
    # (v1 trained in a pack, v2 alone, so their losses may differ), and the alias follows
    by_hand = _farm("registry", "promote", "good.e2e.v2", "--if-better", "--min-improvement", "0",
                    "--store", str(tmp_path / "registry"), "--json")
    answer = json.loads(by_hand.stdout[by_hand.stdout.index("{"):])
    not_worse = answer["eval_loss"]["adapter"] <= answer["eval_loss"]["incumbent"]
    assert answer["decision"] == ("promoted" if not_worse else "held"), answer
    assert by_hand.returncode == (0 if not_worse else 1)
    assert registry.get("good", "e2e", alias="production").version == (2 if not_worse else 1)
    # why @production moved, each time: the alias history keeps the gate's decision with its figures
    moves = json.loads(_farm("registry", "history", "good.e2e", "--alias", "production",
                             "--store", str(tmp_path / "registry"), "--json").stdout)
    assert [(m["version"], m["note"]["by"], m["note"]["decision"]) for m in moves] == [
        (1, "farm sweep", "promoted"), *([(2, "farm registry promote --if-better", "promoted")] if not_worse else [])]
    assert moves[0]["note"]["candidate"]["pass_rates"] == {"max_words 10000": 1.0}, moves[0]["note"]
    refused = _farm("registry", "promote", "bad.e2e.v1", "--if-better", "--store", str(tmp_path / "registry"))
    assert refused.returncode == 1 and "held" in refused.stdout and "greeting passed 0%" in refused.stdout
    with pytest.raises(NotFound):
        registry.get("bad", "e2e", alias="production")
