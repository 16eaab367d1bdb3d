"""One tenant's LoRA training: it learns, it learns its own tenant, it resumes exactly, it reloads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from farm.spec import load_spec
from farm.train.common import StepEvent, evaluate
from farm.train.adapter import AdapterRecipe, train_tenant

from ..conftest import FAST_DEFAULTS, REPO, SAMPLE_FILES

pytestmark = pytest.mark.slow


class Quiet:
    def on_step(self, event: StepEvent) -> None:
        pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_model_dir):
    """Every sample tenant trained once with the fast test settings."""
    import yaml

    root = tmp_path_factory.mktemp("trained")
    raw = {"name": "pairs", "base_model": {"name_or_path": str(base_model_dir)},
           "output_dir": str(root / "runs"), "defaults": FAST_DEFAULTS,
           "tenants": [{"name": n, "data": {"path": str(REPO / "jobs" / "data" / f)}}
                       for n, f in SAMPLE_FILES.items()]}
    (root / "spec.yaml").write_text(yaml.safe_dump(raw))
    sweep = load_spec(root / "spec.yaml")
    recipes = {}
    for name, job in sweep.jobs.items():
        recipe = AdapterRecipe(job, progress=Quiet(), resume=False).setup().train()
        recipes[name] = (recipe, recipe.save())
    return recipes


def test_each_tenant_lowers_its_eval_loss(trained):
    for name, (_, result) in trained.items():
        assert result.eval_loss_after < 0.8 * result.eval_loss_before, (name, result)
        assert result.steps == FAST_DEFAULTS["train"]["max_steps"]
        assert result.tokens > 0 and result.trainable_params < result.total_params / 10
        assert Path(result.adapter_dir, "adapter_model.safetensors").is_file()
        assert not list(Path(result.adapter_dir).glob("*.bin"))


def test_each_adapter_learned_its_own_tenant(trained, base_model_dir):
    """For every pair (A, B): A's adapter fits A's held-out data better than B's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(trained)
    losses: dict[str, dict[str, float]] = {}
    for a in names:
        base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, trained[a][1].adapter_dir).eval()
        losses[a] = {b: evaluate(model, trained[b][0].data.eval, 8, torch.device("cpu"), None)
                     for b in names}
    for a in names:
        for b in names:
            if a != b:
                assert losses[a][a] < losses[a][b], (a, b, losses[a])


def test_saved_adapter_reloads_with_the_same_logits(trained, base_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, result = trained["acme"]
    recipe.model.eval()
    batch = {"input_ids": torch.tensor([recipe.data.eval.input_ids[0]]),
             "position_ids": torch.tensor([recipe.data.eval.position_ids[0]])}
    with torch.no_grad():
        expected = recipe.model(**batch, use_cache=False).logits
        base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
        actual = reloaded(**batch, use_cache=False).logits
    assert torch.equal(expected, actual) or torch.allclose(expected, actual, atol=1e-6, rtol=0)
    config = json.loads(Path(result.adapter_dir, "adapter_config.json").read_text())
    assert config["r"] == 8 and config["bias"] == "none" and config["peft_type"] == "LORA"


class Interrupt(Exception):
    pass


class StopAt:
    """Progress sink that kills the run right after step ``step``, like a crash would."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, event: StepEvent) -> None:
        if event.step == self.step:
            raise Interrupt(f"stopped at step {event.step}")


def _adapter_tensors(adapter_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def test_resume_from_checkpoint_gives_the_same_adapter(write_spec, tmp_path):
    defaults = json.loads(json.dumps(FAST_DEFAULTS))
    defaults["train"].update(max_steps=12, checkpoint_every=5, batch_size=2, grad_accum=2, warmup_steps=3)
    defaults["lora"]["dropout"] = 0.1  # dropout makes the RNG state part of what must be restored
    sweep = load_spec(write_spec(tenants=[{"name": "hooli", "data": {"path": str(REPO / "jobs/data/hooli.jsonl")}}],
                                 defaults=defaults))
    job = sweep.job("hooli")
    straight = train_tenant(job.model_copy(update={"output_dir": str(tmp_path / "straight")}), Quiet())

    interrupted = job.model_copy(update={"output_dir": str(tmp_path / "interrupted")})
    with pytest.raises(Interrupt):
        train_tenant(interrupted, StopAt(8))
    checkpoints = sorted((tmp_path / "interrupted" / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-0000005"]
    assert not (tmp_path / "interrupted" / "adapter").exists()  # nothing final after a crash
    resumed = train_tenant(interrupted, Quiet())
    assert resumed.resumed_from_step == 5 and resumed.steps == 12

    a, b = _adapter_tensors(straight.adapter_dir), _adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys() and len(a) > 0
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff
    assert resumed.losses == straight.losses
    assert resumed.eval_loss_before == straight.eval_loss_before


def test_farm_train_command_prints_eval_before_and_after(write_spec, tmp_path):
    defaults = json.loads(json.dumps(FAST_DEFAULTS))
    defaults["train"].update(max_steps=10, log_every=5)
    spec = write_spec(tenants=[{"name": "globex", "data": {"path": str(REPO / "jobs/data/globex.jsonl")}}],
                      defaults=defaults)
    proc = subprocess.run([sys.executable, "-m", "farm.cli", "train", "--spec", str(spec), "--tenant", "globex"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[globex] step     5/10" in proc.stdout and "tok/s" in proc.stdout
    assert "eval loss" in proc.stdout and "->" in proc.stdout
    result = json.loads((tmp_path / "runs" / "test" / "globex" / "result.json").read_text())
    assert result["eval_loss_after"] < result["eval_loss_before"]
    unknown = subprocess.run([sys.executable, "-m", "farm.cli", "train", "--spec", str(spec), "--tenant", "nobody"],
                             capture_output=True, text=True, timeout=600)
    assert unknown.returncode == 2 and "tenant 'nobody' is not in" in unknown.stderr
