"""Data-parallel adapter training is exact: N workers x batch b equal 1 worker x batch N*b.

The recipe's contract (``farm.train.common.StepLoop``): every optimizer step takes its rows
from one shared, seeded stream; rank r of N takes its slice of each micro-batch; the loss is
normalised by the target tokens of the whole step over all workers; DDP sums the gradients.
So two workers with per-worker batch 4 must give the adapter, and the loss curve, of one
worker with batch 8 on the same rows (fp32, dropout 0), with and without gradient
accumulation. Both 2-worker tenants train in one single-tenant pool (the sweep's
``ray_pool_loop``) under a real Ray Train ``TorchTrainer`` over gloo.

Not bit for bit: the two runs add the same per-row gradients in another order (per worker,
then all-reduce), and AdamW's per-element normalisation turns those rounding differences into
weight differences proportional to the learning rate. At 1e-3 (the usual LoRA rate) they stay
under 1e-5 after 6 steps; at 3e-3 they reached 1.1e-5 on this machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from farm.spec import parse_spec
from farm.train.adapter import train_tenant

from ..conftest import REPO
from .pool_runs import fit_pool

pytestmark = pytest.mark.slow

#: tenant -> (per-worker batch, grad_accum) on 2 workers; alone: batch x 2, the same accumulation
CASES = {"dp": (4, 1), "dp-accum": (2, 2)}


def _sweep(root: Path, base_model_dir: Path, world: int):
    raw = {"name": "d", "base_model": {"name_or_path": str(base_model_dir)}, "output_dir": str(root),
           "defaults": {"lora": {"rank": 8, "dropout": 0.0, "target_modules": "all-linear"},
                        "train": {"max_steps": 6, "learning_rate": 1e-3, "seed": 7, "warmup_steps": 2,
                                  "grad_clip": 1.0, "checkpoint_every": 100, "log_every": 100, "precision": "fp32"},
                        "data": {"max_seq_len": 128}},
           "tenants": [{"name": name, "data": {"path": str(REPO / "jobs" / "data" / "hooli.jsonl")},
                        "train": {"batch_size": batch * (2 // world), "grad_accum": accum}}
                       for name, (batch, accum) in CASES.items()]}
    return parse_spec(raw)


def test_two_workers_equal_one_worker_with_the_global_batch(tmp_path, base_model_dir, local_ray):
    import torch
    from farm.train.adapter import ray_pool_loop

    two = _sweep(tmp_path / "two", base_model_dir, world=2)
    returned = fit_pool(ray_pool_loop, list(two.jobs.values()), tmp_path, workers=2)
    assert returned["errors"] == {}
    assert returned["base_loads"] == 1  # both tenants on one base

    one = _sweep(tmp_path / "one", base_model_dir, world=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in CASES:
            alone = train_tenant(one.job(name), progress=type("Quiet", (), {"on_step": lambda self, e: None})(),
                                 resume=False)
            final = tmp_path / "pooled" / name / "final"
            pooled = json.loads((final / "result.json").read_text())
            assert pooled["steps"] == alone.steps == 6
            assert pooled["tokens"] == alone.tokens  # the same rows, counted over both workers
            # the same loss curve (each step's loss is summed over the workers)
            assert [s for s, _ in pooled["losses"]] == [s for s, _ in alone.losses]
            assert max(abs(a - b) for (_, a), (_, b) in zip(pooled["losses"], alone.losses)) < 1e-5, name
            a = load_file(str(Path(alone.adapter_dir) / "adapter_model.safetensors"))
            b = load_file(str(final / "adapter" / "adapter_model.safetensors"))
            assert a.keys() == b.keys()
            assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, name
    finally:
        torch.set_num_threads(threads)
