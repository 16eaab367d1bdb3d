"""Co-training: several tenants' adapters on one frozen base, one forward/backward per step.

The exactness contract: in fp32, with dropout off and the same data order, every co-trained
adapter equals the adapter isolated training (``farm train``'s recipe) produces after the same
steps. Checked for K = 1, 2 and 4 slots over tenants of different sizes (steps), ranks and
target modules, so slots are refilled as tenants finish.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from farm.spec import parse_spec
from farm.train.cotrain import CoTrainer, cotrain
from farm.train.lora import train_tenant

from ..conftest import REPO

# (tenant, steps, rank, targets): different sizes, ranks and target modules
TENANTS = [("acme", 4, 8, "all-linear"), ("globex", 6, 4, ["q_proj", "v_proj"]),
           ("initech", 3, 16, "all-linear"), ("hooli", 5, 8, "all-linear")]


def _sweep(root: Path, base_model_dir: Path, extra: list[dict] | None = None, **train):
    raw = {"name": "c", "base_model": {"name_or_path": str(base_model_dir)}, "output_dir": str(root),
           "defaults": {"lora": {"rank": 8, "dropout": 0.0},
                        "train": {"batch_size": 4, "learning_rate": 3e-3, "seed": 7, "checkpoint_every": 100,
                                  "log_every": 100, "precision": "fp32", **train},
                        "data": {"max_seq_len": 128}},
           "tenants": [{"name": name, "data": {"path": str(REPO / "jobs" / "data" / f"{name}.jsonl")},
                        "lora": {"rank": rank, "target_modules": targets}, "train": {"max_steps": steps}}
                       for name, steps, rank, targets in TENANTS] + (extra or [])}
    return parse_spec(raw)


def _adapter(root: Path, tenant: str) -> dict:
    return load_file(str(root / "c" / tenant / "adapter" / "adapter_model.safetensors"))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def isolated(tmp_path_factory, base_model_dir) -> Path:
    """Every tenant trained alone, as `farm train` trains it."""
    root = tmp_path_factory.mktemp("isolated")
    sweep = _sweep(root, base_model_dir)
    for job in sweep.jobs.values():
        train_tenant(job, resume=False)
    return root


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_co_trained_adapters_equal_isolated_ones(tmp_path, base_model_dir, isolated, slots):
    sweep = _sweep(tmp_path, base_model_dir)
    results = cotrain(list(sweep.jobs.values()), slots, resume=False)
    for name, steps, rank, _ in TENANTS:
        result = results[name]
        assert result.steps == steps and result.eval_loss_after < result.eval_loss_before
        assert _max_difference(_adapter(isolated, name), _adapter(tmp_path, name)) < 1e-5
        config = json.loads((tmp_path / "c" / name / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == rank and config["peft_type"] == "LORA"  # a normal PEFT adapter
    packed = {name: json.loads((tmp_path / "c" / name / "result.json").read_text())["packed_with"]
              for name, *_ in TENANTS}
    if slots == 1:
        assert all(partners == [] for partners in packed.values())
    if slots == 4:  # everyone trained side by side
        assert all(len(partners) == 3 for partners in packed.values())
    if slots == 2:  # acme (4 steps) and globex share first; initech takes acme's slot when it ends
        assert packed["acme"] == ["globex"] and "initech" in packed["globex"]


def test_a_bad_tenant_stops_alone_and_an_interrupted_pack_resumes_exactly(tmp_path, base_model_dir, isolated):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 7}\n')
    sweep = _sweep(tmp_path / "runs", base_model_dir, extra=[{"name": "broken", "data": {"path": str(bad)}}],
                   checkpoint_every=2)
    jobs = [sweep.jobs["broken"], *(sweep.jobs[name] for name, *_ in TENANTS)]

    class Interrupt(Exception):
        pass

    class StopAfter:
        """Progress sink that interrupts the whole process after a number of tenant-steps."""

        def __init__(self, limit: int):
            self.seen, self.limit = 0, limit

        def on_step(self, event) -> None:
            self.seen += 1
            if self.seen == self.limit:
                raise Interrupt

    with pytest.raises(Interrupt):
        CoTrainer(jobs, 2, progress=StopAfter(9)).setup().run()
    results = CoTrainer(jobs, 2).setup().run()
    assert "line 2" in results["broken"] and "field 'text'" in results["broken"]
    resumed = [results[name].resumed_from_step for name, *_ in TENANTS]
    assert any(step for step in resumed), resumed  # at least one tenant continued from a checkpoint
    for name, *_ in TENANTS:
        assert _max_difference(_adapter(isolated, name), _adapter(tmp_path / "runs", name)) < 1e-5
