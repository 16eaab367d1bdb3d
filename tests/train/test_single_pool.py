"""A single-tenant pool (``farm.train.adapter.ray_pool_loop``): every method, one base.

The pool's loop runs here in-process (one worker, as Ray Train would run it on one worker) on
a real Ray queue actor. It trains tenants of five different methods one after another on one
base it loads once; each adapter must equal the one ``farm train`` produces alone on a fresh
base (fp32, same seeds), which proves that lending the base from tenant to tenant leaves
nothing behind. A tenant whose rows become unreadable mid-training ends alone, with its error
in the queue, and the pool goes on with the next.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from farm.spec import parse_spec
from farm.train.adapter import train_tenant

from ..conftest import REPO
from .pool_runs import Vanishing

pytestmark = pytest.mark.slow

# tenant -> (method, data file, its method section)
TENANTS = {
    "acme": ("lora", "acme.jsonl", {}),
    "vanish": ("lora", "hooli.jsonl", {}),  # fails at its third step (see below)
    "globex": ("dora", "globex.jsonl", {"dora": {"rank": 4}}),
    "initech": ("ia3", "initech.jsonl", {}),
    "umbrella": ("prefix", "umbrella.parquet", {"prefix": {"num_virtual_tokens": 8}}),
    "hooli": ("prompt", "hooli.jsonl", {"prompt": {"num_virtual_tokens": 8, "init": "sample_vocab"}}),
}


def _sweep(root: Path, base_model_dir: Path):
    raw = {"name": "p", "base_model": {"name_or_path": str(base_model_dir)}, "output_dir": str(root),
           "defaults": {"train": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "seed": 7,
                                  "checkpoint_every": 2, "log_every": 100, "precision": "fp32"},
                        "data": {"max_seq_len": 128}},
           "tenants": [{"name": name, "adapter": method, "method": method,
                        "data": {"path": str(REPO / "jobs" / "data" / data),
                                 **({"format": "alpaca"} if name == "initech" else {})}, **section}
                       for name, (method, data, section) in TENANTS.items()]}
    return parse_spec(raw)


def test_a_single_tenant_pool_trains_every_method_on_one_base_exactly(tmp_path, base_model_dir, local_ray,
                                                                      monkeypatch):
    import ray
    import torch

    from farm.pools import queue_actor
    from farm.train import adapter as module

    class FailingVanish(module.AdapterRecipe):
        def setup(self):
            super().setup()
            if self.job.tenant == "vanish":
                self.data.train = Vanishing(self.data.train, good=2)
            return self

    sweep = _sweep(tmp_path / "pool", base_model_dir)
    queue = queue_actor([job.model_dump() for job in sweep.jobs.values()], closed=True)
    monkeypatch.setattr(module, "AdapterRecipe", FailingVanish)  # the loop looks it up when it runs
    threads = torch.get_num_threads()
    try:
        returned = module.ray_pool_loop({"queue": queue, "pool": "pool-1", "board": None, "threads": 1,
                                         "tenants_dir": str(tmp_path / "pooled")})
    finally:
        torch.set_num_threads(threads)
    monkeypatch.undo()

    assert returned["base_loads"] == 1, "the pool read its base more than once"
    assert list(returned["errors"]) == ["vanish"] and "OSError: No such file or directory" in returned["errors"]["vanish"]
    state = ray.get(queue.state.remote())
    assert state["done"] == sorted(set(TENANTS) - {"vanish"})
    assert state["statuses"] == {"vanish": "failed"} and not (tmp_path / "pooled" / "vanish" / "final").exists()

    alone = _sweep(tmp_path / "alone", base_model_dir)
    torch.set_num_threads(1)
    try:
        for name in sorted(set(TENANTS) - {"vanish"}):
            result = train_tenant(alone.job(name), progress=type("Quiet", (), {"on_step": lambda self, e: None})(),
                                  resume=False)
            a = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
            b = load_file(str(tmp_path / "pooled" / name / "final" / "adapter" / "adapter_model.safetensors"))
            assert a.keys() == b.keys(), name
            assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, name
    finally:
        torch.set_num_threads(threads)
