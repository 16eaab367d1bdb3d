"""The contract every PEFT method of ``farm.methods`` keeps, one shared test class for all.

For each method: training on a sample tenant lowers its eval loss; the saved adapter reloads
with the same logits; a run interrupted after a checkpoint and resumed ends on the same
weights as an uninterrupted one (fp32, 1e-5); publishing records the method, its settings and
the right vLLM servability; ``farm export merged`` works for mergeable methods (same logits
as base + adapter) and refuses the others. Methods that need CUDA (QLoRA) run where there is
one and are skipped with the reason elsewhere; that they are refused up front is tested here
too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from farm.methods import METHODS
from farm.spec import load_spec
from farm.train.adapter import AdapterRecipe
from farm.train.common import StepEvent, make_batch

from ..conftest import REPO

pytestmark = pytest.mark.slow

#: Per method: its settings and a learning rate at which it learns in a few steps. Dropout is
#: on where the method has it, so that resuming must also restore the RNG.
LORA_LIKE = {"rank": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"}
CASES = {
    "lora": ({"lora": LORA_LIKE}, 3e-3),
    "dora": ({"dora": LORA_LIKE}, 3e-3),
    "bottleneck": ({"bottleneck": {"placement": "houlsby", "bottleneck_size": 16, "dropout": 0.1}}, 1e-2),
    "ia3": ({}, 1e-1),  # IA3 only rescales activations: on a random base it needs a large step
    # projection: the harder path (its MLP lives only in checkpoints, not in the saved adapter)
    "prefix": ({"prefix": {"num_virtual_tokens": 8, "projection": True, "projection_hidden_size": 64}}, 3e-2),
    "prompt": ({"prompt": {"num_virtual_tokens": 8, "init": "text", "init_text": "Answer the customer:"}}, 3e-2),
    "qlora": ({"qlora": LORA_LIKE}, 3e-3),
}
STEPS, CHECKPOINT_EVERY, STOP_AT = 12, 5, 8
TENANT = "hooli"


def test_every_method_has_a_contract_case():
    assert set(CASES) == set(METHODS)


class Quiet:
    def on_step(self, event: StepEvent) -> None:
        pass


class Interrupt(Exception):
    pass


class StopAt(Quiet):
    """Raises right after step ``step``, as a crash would."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, event: StepEvent) -> None:
        if event.step == self.step:
            raise Interrupt(f"stopped at step {event.step}")


def _job(method: str, root: Path, base_model_dir: Path):
    settings, learning_rate = CASES[method]
    raw = {"name": "contract", "base_model": {"name_or_path": str(base_model_dir)},
           "output_dir": str(root / "runs"),
           "defaults": {"method": method, **settings,
                        "train": {"max_steps": STEPS, "batch_size": 2, "grad_accum": 2, "learning_rate": learning_rate,
                                  "warmup_steps": 2, "checkpoint_every": CHECKPOINT_EVERY, "log_every": 100,
                                  "seed": 3, "precision": "fp32"},
                        "data": {"max_seq_len": 128}},
           "tenants": [{"name": TENANT, "data": {"path": str(REPO / "jobs/data/hooli.jsonl")}}]}
    (root / "spec.yaml").write_text(yaml.safe_dump(raw))
    return load_spec(root / "spec.yaml").job(TENANT)


def _weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def _reload(base_model_dir: Path, adapter_dir: str | Path):
    from transformers import AutoModelForCausalLM

    from farm.models import load_adapter

    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    return load_adapter(base, adapter_dir).eval()


@pytest.fixture(scope="class", params=list(METHODS))
def method(request) -> str:
    info = METHODS[request.param]
    if info.needs_cuda and not torch.cuda.is_available():
        pytest.skip(f"{request.param}: {info.needs_cuda} (this host has none)")
    return request.param


@pytest.fixture(scope="class")
def straight(method, tmp_path_factory, base_model_dir):
    """One uninterrupted run of the method: (recipe, result, job)."""
    root = tmp_path_factory.mktemp(f"contract-{method}")
    job = _job(method, root, base_model_dir)
    recipe = AdapterRecipe(job, progress=Quiet(), resume=False).setup().train()
    return recipe, recipe.save(), job


@pytest.fixture(scope="class")
def registry(tmp_path_factory):
    from farm.registry import open_registry

    return open_registry(str(tmp_path_factory.mktemp("registry")))


@pytest.fixture(scope="class")
def published(method, straight, registry, base_model_dir):
    """The straight run's adapter published as the sweep publishes it (method declared)."""
    _, result, job = straight
    return registry.publish(TENANT, method, Path(result.adapter_dir), base_model=str(base_model_dir),
                            method=method, training={"method": method,
                                                     "method_settings": job.settings.method_settings().model_dump()})


class TestMethodContract:
    def test_training_lowers_eval_loss(self, method, straight):
        _, result, _ = straight
        assert result.method == method and result.steps == STEPS
        assert result.eval_loss_after < 0.95 * result.eval_loss_before, result
        assert 0 < result.trainable_params < result.total_params / 10
        files = sorted(p.name for p in Path(result.adapter_dir).iterdir())
        assert "adapter_model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt"))]

    def test_saved_adapter_reloads_with_the_same_logits(self, straight, base_model_dir):
        recipe, result, _ = straight
        batch = make_batch(recipe.data.eval, [0, 1], torch.device("cpu"))
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        recipe.model.eval()
        with torch.no_grad():
            expected = recipe.model(**inputs, use_cache=False).logits
            actual = _reload(base_model_dir, result.adapter_dir)(**inputs, use_cache=False).logits
        assert expected.shape == actual.shape
        assert torch.allclose(expected, actual, atol=1e-5, rtol=0), float((expected - actual).abs().max())

    def test_resume_gives_the_same_weights_as_an_uninterrupted_run(self, method, straight, tmp_path, base_model_dir):
        _, result, _ = straight
        job = _job(method, tmp_path, base_model_dir)
        with pytest.raises(Interrupt):
            AdapterRecipe(job, progress=StopAt(STOP_AT)).setup().train()
        out = Path(job.output_dir)
        assert [c.name for c in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-0000005"]
        assert not (out / "adapter").exists()  # nothing final after a crash
        resumed = AdapterRecipe(job, progress=Quiet()).setup().train().save()
        assert resumed.resumed_from_step == CHECKPOINT_EVERY and resumed.steps == STEPS
        a, b = _weights(result.adapter_dir), _weights(resumed.adapter_dir)
        assert a.keys() == b.keys() and a
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff <= 1e-5, diff
        assert [s for s, _ in resumed.losses] == [s for s, _ in result.losses]
        assert [x for _, x in resumed.losses] == pytest.approx([x for _, x in result.losses], abs=1e-5)

    def test_publish_records_method_settings_and_servability(self, method, straight, published, registry):
        info = registry.resolve(f"{TENANT}.{method}@latest")
        assert info.method == method == published.method
        assert info.training["method_settings"] == straight[2].settings.method_settings().model_dump()
        assert info.method_settings["peft_type"] == METHODS[method].peft_type
        if method in ("lora", "qlora"):
            assert info.servable_by_vllm, info.not_servable_reason
            assert info.rank == 8
        else:
            assert not info.servable_by_vllm
            assert "vLLM" in info.not_servable_reason
        hits, total = registry.search(method=method)
        assert total == 1 and hits[0].serve_name == info.serve_name
        # Every method is served by the transformers backend; only what vLLM loads is also vLLM's.
        vllm = method in ("lora", "qlora")
        assert info.servable_by == (["vllm", "transformers"] if vllm else ["transformers"])
        assert registry.search(method=method, served_by="transformers")[1] == 1
        assert registry.search(method=method, served_by="vllm")[1] == int(vllm)

    def test_merge_works_or_is_refused(self, method, straight, published, registry, base_model_dir, tmp_path):
        from farm.serving.export import ExportError, export_merged

        out = tmp_path / "merged"
        if not METHODS[method].mergeable:
            with pytest.raises(ExportError, match=f"a {method} adapter cannot be merged.*mergeable methods: lora") as refused:
                export_merged(registry, published.serve_name, out)
            assert METHODS[method].not_mergeable in str(refused.value)  # the reason, e.g. "non-linear"
            assert not out.exists() or not any(out.iterdir())
            return
        from transformers import AutoModelForCausalLM

        export_merged(registry, published.serve_name, out)
        assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
        recipe, result, _ = straight
        batch = make_batch(recipe.data.eval, [0], torch.device("cpu"))
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            expected = _reload(base_model_dir, result.adapter_dir)(**inputs, use_cache=False).logits
            merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            actual = merged(**inputs, use_cache=False).logits
        assert torch.allclose(expected, actual, atol=1e-4, rtol=0), float((expected - actual).abs().max())


def test_a_method_that_needs_cuda_is_refused_up_front_without_one(tmp_path, base_model_dir):
    """QLoRA on a sweep whose workers get no GPU: the whole spec is refused, naming the reason."""
    from farm.sizing import Capacity
    from farm.spec import SpecError
    from farm.sweep import check_methods_can_run

    raw = {"name": "q", "base_model": {"name_or_path": str(base_model_dir)}, "output_dir": str(tmp_path),
           "tenants": [{"name": "acme", "data": {"path": str(REPO / "jobs/data/acme.jsonl")}},
                       {"name": "globex", "method": "qlora", "data": {"path": str(REPO / "jobs/data/globex.jsonl")}}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    sweep = load_spec(tmp_path / "spec.yaml")
    with pytest.raises(SpecError) as refused:
        check_methods_can_run(sweep, ["acme", "globex"], Capacity("cpu", 8 << 30, 2, "ray"))
    assert len(refused.value.problems) == 1  # acme's lora is fine
    assert "tenant 'globex': method qlora" in str(refused.value) and "need a CUDA device" in str(refused.value)
    check_methods_can_run(sweep, ["acme"], Capacity("cpu", 8 << 30, 2, "ray"))  # the others alone are fine
    check_methods_can_run(sweep, ["acme", "globex"], Capacity("gpu", 24 << 30, 1, "spec"))
    if not torch.cuda.is_available():  # and a single-process `farm train` says the same
        with pytest.raises(ValueError, match="method qlora: QLoRA loads the base in 4-bit.*this worker has cpu"):
            AdapterRecipe(sweep.job("globex"), progress=Quiet(), resume=False).setup()


def test_settings_are_validated_per_method(write_spec):
    from farm.spec import SpecError

    bad = [
        ({"method": "ia3", "ia3": {"feedforward_modules": ["gate_proj"]}},
         "feedforward_modules ['gate_proj'] are not among target_modules"),
        ({"method": "prompt", "prompt": {"init": "text"}}, "init 'text' needs init_text"),
        ({"method": "prefix", "prefix": {"num_virtual_tokens": 0}}, "prefix.num_virtual_tokens"),
        ({"method": "prefix", "prefix": {"projection_hidden_size": 64}}, "needs projection: true"),
        ({"method": "qlora", "qlora": {"quant_type": "int3"}}, "qlora.quant_type"),
        ({"method": "dora", "dora": {"rank": "eight"}}, "dora.rank: expected int"),
        ({"method": "adalora"}, "tenants[0].method"),
        ({"method": "prefix", "train": {"gradient_checkpointing": True}},
         "method prefix cannot train with train.gradient_checkpointing"),
    ]
    for overrides, message in bad:
        path = write_spec(tenants=[{"name": "acme", "data": {"path": str(REPO / "jobs/data/acme.jsonl")}, **overrides}])
        with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_spec(path)
    # prompt-learning methods always train on one example per row (PEFT moves position ids)
    path = write_spec(tenants=[{"name": "acme", "method": "prompt", "data": {"path": str(REPO / "jobs/data/acme.jsonl"),
                                                                            "packing": True}}])
    assert load_spec(path).job("acme").settings.data.packing is False


def test_a_declared_method_must_agree_with_the_adapter(tmp_path):
    from farm.registry.validate import PublishError, check_config

    lora = json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "bias": "none"}).encode()
    assert check_config(lora, "base", "LlamaForCausalLM").method == "lora"
    assert check_config(lora, "base", "LlamaForCausalLM", method="qlora").method == "qlora"
    with pytest.raises(PublishError, match="method 'ia3' does not match the adapter's config"):
        check_config(lora, "base", "LlamaForCausalLM", method="ia3")
    dora = json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "use_dora": True}).encode()
    check = check_config(dora, "base", "LlamaForCausalLM")
    assert check.method == "dora" and not check.servable_by_vllm and "DoRA" in check.not_servable_reason
    with pytest.raises(PublishError, match="'num_virtual_tokens' must be an integer"):
        check_config(json.dumps({"peft_type": "PROMPT_TUNING"}).encode(), "base", None)


def test_planner_counts_each_methods_trainable_parameters(base_model_dir):
    """The planner's count (from the model's shape alone) equals what PEFT builds, per method."""
    from transformers import AutoModelForCausalLM

    from farm.methods import planner_fields
    from farm.models import build_peft_model, count_parameters
    from farm.plan import PlanRequest, load_shape, plan_memory
    from farm.spec import JobSettings

    shape = load_shape(str(base_model_dir))
    for method, (settings, _) in CASES.items():
        job = JobSettings.model_validate({"method": method, **settings})
        plan = plan_memory(shape, PlanRequest(**planner_fields(method, job.method_settings(), shape), precision="fp32"))
        if METHODS[method].quantization is not None:  # built on CUDA only; the adapter is LoRA's
            assert plan.trainable_params == plan_memory(shape, PlanRequest(
                **planner_fields("lora", job.lora.model_copy(update=settings[method]), shape),
                precision="fp32")).trainable_params
            continue
        model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
        trainable, _ = count_parameters(build_peft_model(model, job, str(base_model_dir)))
        assert plan.trainable_params == trainable, (method, plan.trainable_params, trainable)
