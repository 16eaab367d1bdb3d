"""The full fine-tuning baseline end to end: DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU workers
(gloo) under a real local Ray, through ``jobs/full_ft_baseline.py`` as an operator runs it.

One uninterrupted ZeRO-2 run and one ZeRO-3 run that fails after its step-4 checkpoint (and is
restarted by Ray Train) train the same rows in the same order with the same seed; in fp32,
Adam over the same gradients gives the same curve whatever the sharding, so the resumed
ZeRO-3 curve must continue exactly where the ZeRO-2 one goes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ..conftest import FAST_DEFAULTS, REPO

pytestmark = pytest.mark.slow
STEPS = 8


def _spec(tmp_path: Path, base_model_dir: Path) -> Path:
    defaults = json.loads(json.dumps(FAST_DEFAULTS))
    defaults["train"].update(max_steps=STEPS, checkpoint_every=4, batch_size=4, warmup_steps=2, log_every=4)
    raw = {"name": "full", "base_model": {"name_or_path": str(base_model_dir)},
           "output_dir": str(tmp_path / "runs"), "defaults": defaults,
           "resources": {"workers": 1, "cpus_per_worker": 1, "max_retries": 1},
           "baseline": {"tenants": ["acme"], "workers": 2, "learning_rate": 1.0e-3},
           "tenants": [{"name": "acme", "data": {"path": str(REPO / "jobs/data/acme.jsonl")}}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _baseline(spec: Path, sweep_id: str, stage: int, **env) -> dict:
    command = [sys.executable, str(REPO / "jobs" / "full_ft_baseline.py"), "--config", str(spec),
               "--tenants", "acme", "--zero-stage", str(stage), "--sweep-id", sweep_id]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "RAY_ADDRESS": "local", "RAY_DISABLE_USAGE_STATS": "1",
                               "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **env})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "LoRA vs full fine-tuning" in done.stdout  # the comparison is in the sweep's summary
    return json.loads((spec.parent / "runs" / sweep_id / "report.json").read_text())


def _probe_matches_saved_model(model_dir: Path) -> float:
    """Max |logits| difference between the reloaded model and the trained engine's probe."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    probe = load_file(str(model_dir.parent / "probe.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    inputs = {k: v for k, v in probe.items() if k not in ("labels", "logits")}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    return float((logits - probe["logits"]).abs().max())


def test_zero2_and_zero3_baselines_train_resume_consolidate_and_compare(tmp_path, base_model_dir):
    spec = _spec(tmp_path, base_model_dir)
    zero2 = _baseline(spec, "z2", stage=2)
    zero3 = _baseline(spec, "z3", stage=3, FARM_FAIL_AT_STEP="4")

    for report, stage in ((zero2, 2), (zero3, 3)):
        lora, full = report["comparison"]
        assert lora["run"] == "lora r8" and full["run"] == f"full ZeRO-{stage}" and full["workers"] == 2
        for row in (lora, full):
            assert row["steps"] == STEPS and row["eval_loss_after"] < row["eval_loss_before"]
            assert [step for step, _ in row["losses"]] == list(range(1, STEPS + 1))
            # The planner's per-worker estimate is within 25% of the measured peak RSS.
            assert abs(row["plan_error"]) <= 0.25, row
        assert full["trainable_params"] > 20 * lora["trainable_params"]
        assert full["bytes_on_disk"] > 10 * lora["bytes_on_disk"]
        model_dir = tmp_path / "runs" / ("z2" if stage == 2 else "z3") / "acme" / "full" / "model"
        assert (model_dir / "model.safetensors").is_file() and not list(model_dir.glob("*.bin"))
        assert _probe_matches_saved_model(model_dir) < 1e-5

    full2, full3 = zero2["comparison"][1], zero3["comparison"][1]
    result3 = json.loads((tmp_path / "runs" / "z3" / "acme" / "full" / "result.json").read_text())
    assert result3["resumed_from_step"] == 4  # Ray Train restarted the group from the sharded checkpoint
    for (step2, loss2), (step3, loss3) in zip(full2["losses"], full3["losses"]):
        assert step2 == step3 and abs(loss2 - loss3) < 1e-4, (full2["losses"], full3["losses"])
    assert abs(full2["eval_loss_after"] - full3["eval_loss_after"]) < 1e-4
    assert (tmp_path / "runs" / "z3" / "lora_vs_full.png").stat().st_size > 10_000
