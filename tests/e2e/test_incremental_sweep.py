"""Incremental sweeps end to end: after a first sweep publishes every tenant, a nightly re-run
with --changed-only trains exactly the tenants whose dataset or settings changed, warm-starts
them from their newest version (train.init_from), refuses a warm start that cannot fit, and
leaves the unchanged tenant's version as it was."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from rich.console import Console

from farm.incremental import select_changed
from farm.registry import open_registry
from farm.registry.core import NotFound
from farm.spec import load_spec

from ..conftest import SAMPLE_DATA
from .test_sweep import FARM_SWEEP, _run, _spec

pytestmark = pytest.mark.slow


def test_changed_only_trains_exactly_the_changed_tenants_from_their_newest_version(tmp_path, base_model_dir):
    changing = tmp_path / "globex.jsonl"
    shutil.copy(SAMPLE_DATA / "globex.jsonl", changing)
    tenants = [
        {"name": "same", "data": {"path": str(SAMPLE_DATA / "acme.jsonl")}},
        {"name": "newdata", "data": {"path": str(changing)}},
        {"name": "newlr", "data": {"path": str(SAMPLE_DATA / "initech.jsonl"), "format": "alpaca"}},
        {"name": "newrank", "data": {"path": str(SAMPLE_DATA / "hooli.jsonl")}},
    ]
    # 4 steps, no warm-up: a warm-up from 0 (transformers' schedule) would leave them half-trained
    spec = _spec(tmp_path, base_model_dir, tenants, max_steps=4, checkpoint_every=4, warmup_steps=0)
    raw = yaml.safe_load(spec.read_text())
    raw["quality"] = {"matrix_rows": 2}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    first = _run(["--config", str(spec), "--sweep-id", "n1"], command=FARM_SWEEP)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = {t["tenant"]: t for t in json.loads((tmp_path / "runs" / "n1" / "report.json").read_text())["tenants"]}

    # The next night: one tenant's data grew, one asks another learning rate, one another rank;
    # everyone warm-starts from its newest version, and logs more often (which changes nothing learned).
    lines = changing.read_text().splitlines()
    changing.write_text("\n".join(lines + [lines[0].replace("WIDGET", "GADGET")]) + "\n")
    raw["defaults"]["train"].update(init_from="latest", log_every=1)
    raw["tenants"][2]["train"] = {"learning_rate": 1e-2}
    raw["tenants"][3]["lora"] = {**raw["defaults"]["lora"], "rank": 4}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    second = _run(["--config", str(spec), "--sweep-id", "n2", "--changed-only"], command=FARM_SWEEP)
    assert second.returncode != 0  # newrank's refused warm start fails it, and only it
    report = {t["tenant"]: t for t in json.loads((tmp_path / "runs" / "n2" / "report.json").read_text())["tenants"]}
    assert {name: t["status"] for name, t in report.items()} == {
        "same": "unchanged", "newdata": "trained", "newlr": "trained", "newrank": "invalid"}, second.stdout[-3000:]
    assert report["same"]["serve_name"] == "same.e2e.v1"
    assert "unchanged since same.e2e.v1" in second.stdout
    assert "newdata: changed since newdata.e2e.v1: dataset changed" in second.stdout
    assert "newlr: changed since newlr.e2e.v1: train settings changed (learning_rate)" in second.stdout
    assert "other lora settings" in report["newrank"]["error"], report["newrank"]

    registry = open_registry(str(tmp_path / "registry"))
    with pytest.raises(NotFound):
        registry.get("same", "e2e", 2)  # nothing new for the unchanged tenant
    with pytest.raises(NotFound):
        registry.get("newrank", "e2e", 2)
    for name in ("newdata", "newlr"):
        v2 = registry.get(name, "e2e", alias="latest")
        assert v2.version == 2 and v2.lineage["init_from"] == f"{name}.e2e.v1"
        # really warm: v2 starts where v1 ended (v1 started from a fresh adapter on the random base)
        assert report[name]["eval_loss_before"] < before[name]["eval_loss_before"] - 0.5, (report[name], before[name])
    assert registry.get("newdata", "e2e", 2).lineage["dataset_fingerprint"] != \
        registry.get("newdata", "e2e", 1).lineage["dataset_fingerprint"]

    # The night after, nothing changed: the versions just published are what the spec asks for.
    sweep = load_spec(spec)
    changed, unchanged = select_changed(sweep, ["same", "newdata", "newlr"], registry, Console(quiet=True))
    assert changed == [] and {o.serve_name for o in unchanged.values()} == {"same.e2e.v1", "newdata.e2e.v2",
                                                                            "newlr.e2e.v2"}
