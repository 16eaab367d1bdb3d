"""Co-training: several tenants' adapters on one frozen base, one forward/backward per step.

The exactness contract: in fp32, with dropout off and the same data order, every co-trained
adapter equals the adapter isolated training (``farm train``'s recipe) produces after the same
steps. Checked for K = 1, 2 and 4 slots over tenants of different sizes (steps), ranks and
target modules, so slots are refilled as tenants finish.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from farm.spec import parse_spec
from farm.train.cotrain import CoTrainer, cotrain
from farm.train.adapter import train_tenant

from ..conftest import REPO
from .pool_runs import Vanishing

pytestmark = pytest.mark.slow  # every test trains tenants

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


def test_the_batched_path_for_tenants_of_one_shape_stays_within_rounding(tmp_path, base_model_dir, isolated):
    """Same rank, targets and rows per step: with ``batched`` (what bf16 runs use) every layer
    adds all tenants' updates with one bmm pair. bmm sums in another order, so the contract
    here is float rounding amplified by Adam over a few steps (1e-4), not the fp32 path's 1e-5."""
    from farm.train import cotrain as module

    calls = {"bmm": 0}
    real_bmm = module.torch.bmm

    def counting_bmm(*args, **kwargs):
        calls["bmm"] += 1
        return real_bmm(*args, **kwargs)

    sweep = _sweep(tmp_path, base_model_dir)
    same = [sweep.jobs["acme"], sweep.jobs["hooli"]]  # both r=8 on all linear layers
    module.torch.bmm = counting_bmm
    try:
        results = CoTrainer(same, 2, resume=False, batched=True).setup().run()  # as bf16 runs do
    finally:
        module.torch.bmm = real_bmm
    assert calls["bmm"] > 0
    for job in same:
        assert results[job.tenant].steps == {"acme": 4, "hooli": 5}[job.tenant]
        assert _max_difference(_adapter(isolated, job.tenant), _adapter(tmp_path, job.tenant)) < 1e-4


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


def test_early_stop_ends_one_tenant_and_its_slot_goes_on(tmp_path, base_model_dir):
    """A tenant whose eval stops improving (here: a min_delta no step can beat) stops after
    ``early_stop_patience`` evals, alone, exactly where isolated training stops it too."""
    stop = {"eval_every": 1, "early_stop_patience": 1, "early_stop_min_delta": 10.0}
    sweep = _sweep(tmp_path / "co", base_model_dir)
    acme = sweep.jobs["acme"]
    acme = acme.model_copy(update={"settings": acme.settings.model_copy(update={
        "train": acme.settings.train.model_copy(update=stop)})})
    results = cotrain([acme, sweep.jobs["globex"], sweep.jobs["hooli"]], slots=2, resume=False)
    assert results["acme"].stopped_early and results["acme"].steps == 2  # best at step 1, no better at 2
    assert not results["globex"].stopped_early and results["globex"].steps == 6
    assert "hooli" in json.loads((tmp_path / "co" / "c" / "globex" / "result.json").read_text())["packed_with"]
    alone = train_tenant(acme.model_copy(update={"output_dir": str(tmp_path / "alone")}), resume=False)
    assert alone.stopped_early and alone.steps == 2
    a = load_file(str(tmp_path / "alone" / "adapter" / "adapter_model.safetensors"))
    assert _max_difference(a, _adapter(tmp_path / "co", "acme")) < 1e-5


def test_a_tenant_whose_data_fails_mid_training_ends_alone(tmp_path, base_model_dir, isolated):
    """hooli's rows become unreadable at its third step (as if its spilled data vanished): hooli
    ends with that error, and the tenants it shared steps with finish exactly as alone."""
    from farm.train import cotrain as module

    class FailingHooli(module.CoTrainer):
        def _admit(self, job):
            slot = super()._admit(job)
            if job.tenant == "hooli":
                slot.data.train = Vanishing(slot.data.train, good=2)
            return slot

    sweep = _sweep(tmp_path, base_model_dir)
    jobs = [sweep.jobs[name] for name in ("acme", "hooli", "globex")]
    results = FailingHooli(jobs, 3, resume=False).setup().run()
    assert isinstance(results["hooli"], str)
    assert results["hooli"].startswith("tenant 'hooli': step 3: OSError: No such file or directory")
    for name in ("acme", "globex"):
        assert _max_difference(_adapter(isolated, name), _adapter(tmp_path, name)) < 1e-5
    assert not (tmp_path / "c" / "hooli" / "adapter").exists()


def test_a_pool_takes_tenants_that_arrive_while_it_runs_and_ends_when_idle(tmp_path, base_model_dir, isolated,
                                                                           local_ray):
    """A pool on an open queue (farm.pools): hooli arrives only once acme has finished, while the
    pool waits with every slot free; the pool trains it, then ends after its idle time with
    nothing more to take. Both adapters equal isolated training."""
    import threading

    import ray

    from farm.pools import queue_actor
    from farm.pools import QueueSource

    sweep = _sweep(tmp_path, base_model_dir)
    acme, hooli = sweep.jobs["acme"], sweep.jobs["hooli"]
    queue = queue_actor([acme.model_dump()])  # open: tenants may arrive
    local = tmp_path / "local"

    def arrive() -> None:
        while "acme" not in ray.get(queue.state.remote())["done"]:
            time.sleep(0.1)
        ray.get(queue.add.remote([hooli.model_dump()]))

    thread = threading.Thread(target=arrive, daemon=True)
    thread.start()
    source = QueueSource(queue, "pool-1", str(tmp_path / "pooled"), str(local), idle_s=5.0, poll_s=0.1)
    results = CoTrainer([acme], 2, resume=False, source=source).setup().run()
    thread.join(timeout=60)
    assert results["acme"].steps == 4 and results["hooli"].steps == 5
    assert results["hooli"].resumed_from_step is None  # a fresh tenant, not a restart
    state = ray.get(queue.state.remote())
    assert state["done"] == ["acme", "hooli"] and state["taken"] == {"acme": "pool-1", "hooli": "pool-1"}
    for name in ("acme", "hooli"):
        adapter = load_file(str(local / name / "adapter" / "adapter_model.safetensors"))
        assert _max_difference(_adapter(isolated, name), adapter) < 1e-5
