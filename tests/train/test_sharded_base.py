"""LoRA on a base sharded across workers (``train.shard_base: fsdp``, PyTorch FSDP2) is exact.

Two workers hold half of the base and of the adapter each (gloo on CPU); every step gathers
one decoder layer at a time. The run fails once after its checkpoint at step 4 (the farm's
fault injection, which stands for a dying worker): Ray Train restarts the pool, which resumes
the tenant from that checkpoint, written whole (adapter and AdamW moments gathered) and
sharded again on load. The adapter it saves must equal unsharded training on one worker with
the global batch, and reload (PEFT, no FSDP) to the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from farm.spec import SpecError, parse_spec
from farm.train.adapter import train_tenant

from ..conftest import REPO
from .pool_runs import fit_pool

pytestmark = pytest.mark.slow


def _sweep(root: Path, base_model_dir: Path, batch: int, shard: str, method: str = "lora"):
    raw = {"name": "s", "base_model": {"name_or_path": str(base_model_dir)}, "output_dir": str(root),
           "defaults": {"lora": {"rank": 8, "dropout": 0.0, "target_modules": "all-linear"},
                        "train": {"max_steps": 6, "batch_size": batch, "learning_rate": 1e-3, "seed": 7,
                                  "checkpoint_every": 2, "log_every": 100, "precision": "fp32",
                                  "shard_base": shard},
                        "data": {"max_seq_len": 128}},
           "tenants": [{"name": "acme", "method": method, "data": {"path": str(REPO / "jobs" / "data" / "acme.jsonl")}}]}
    return parse_spec(raw)


def _failing_once(config: dict) -> dict:
    """The pool's loop with the fault injection on (it fails once, after step 4's checkpoint)."""
    import os

    from farm.train.adapter import ray_pool_loop

    os.environ["FARM_FAIL_AT_STEP"] = "4"
    return ray_pool_loop(config)


def test_lora_on_a_sharded_base_resumes_and_equals_unsharded_training(tmp_path, base_model_dir, local_ray):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sharded = _sweep(tmp_path / "sharded", base_model_dir, batch=2, shard="fsdp")
    returned = fit_pool(_failing_once, [sharded.job("acme")], tmp_path, workers=2, max_failures=1)
    assert returned["errors"] == {}
    final = tmp_path / "pooled" / "acme" / "final"
    pooled = json.loads((final / "result.json").read_text())
    assert pooled["steps"] == 6 and pooled["resumed_from_step"] == 4  # restarted, resumed from its checkpoint

    one = _sweep(tmp_path / "one", base_model_dir, batch=4, shard="none")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = train_tenant(one.job("acme"), progress=type("Quiet", (), {"on_step": lambda self, e: None})(),
                             resume=False)
    finally:
        torch.set_num_threads(threads)
    a = load_file(str(Path(alone.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert max(abs(x - y) for (_, x), (_, y) in zip(pooled["losses"], alone.losses)) < 1e-4

    # The planner's per-worker figure for this layout is within 25% of the measured peak (RSS).
    from farm.plan import load_shape, plan_memory
    from farm.sizing import Capacity, adapter_request

    job = sharded.job("acme")
    planned = plan_memory(load_shape(str(base_model_dir)),
                          adapter_request(job, Capacity("cpu", None, 2, "test"), workers=2)).total_bytes
    assert abs(planned - pooled["peak_memory_bytes"]) / pooled["peak_memory_bytes"] <= 0.25, \
        (planned, pooled["peak_memory_bytes"])

    # The saved adapter is a normal PEFT folder: reloaded on the plain base, the same logits.
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80]])
    logits = []
    for folder in (Path(alone.adapter_dir), final / "adapter"):
        base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(folder)).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert float((logits[0] - logits[1]).abs().max()) < 1e-4


def test_methods_outside_the_base_refuse_a_sharded_base(tmp_path, base_model_dir):
    with pytest.raises(SpecError, match="prompt cannot train with train.shard_base: fsdp"):
        _sweep(tmp_path, base_model_dir, batch=2, shard="fsdp", method="prompt")
