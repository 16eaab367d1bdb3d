"""The tiny offline base model: built by the CLI, loaded through the same path as real bases."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from farm.models import load_base_model, load_tokenizer, select_placement
from farm.spec import BaseModelSpec


@pytest.mark.slow  # pretrains a base
def test_cli_builds_a_servable_llama_that_loads_like_a_hub_model(tmp_path):
    out = tmp_path / "base"
    proc = subprocess.run([sys.executable, "-m", "farm.cli", "base-model", "build", "--out", str(out),
                           "--layers", "1", "--hidden", "128", "--heads", "2", "--vocab", "600",
                           "--steps", "20"],  # pretrained, briefly: this test is about the format
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 64 == config["head_dim"]
    assert config["num_hidden_layers"] == 1 and config["vocab_size"] == 600
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))

    spec = BaseModelSpec(name_or_path=str(out))
    tokenizer = load_tokenizer(spec)
    model = load_base_model(spec, select_placement("fp32"))
    assert len(tokenizer) == 600 and model.dtype == torch.float32
    text = tokenizer.apply_chat_template([{"role": "user", "content": "My printer is slow."}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|begin|><|user|>\nMy printer is slow.<|end|>\n<|assistant|>\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids) == text
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 600)


def test_cli_refuses_dims_vllm_cannot_serve(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "farm.cli", "base-model", "build", "--out",
                           str(tmp_path / "x"), "--hidden", "200", "--heads", "4"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2  # a flag the builder refuses: bad input
    assert "head_dim is 64" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_bf16_is_refused_without_a_gpu_that_has_it():
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert select_placement("bf16").dtype == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="bf16 needs a GPU"):
            select_placement("bf16")
        assert select_placement("auto").dtype == torch.float32


@pytest.mark.slow  # pretrains a base
def test_pretraining_is_deterministic_and_learns_language_the_random_base_lacks(tmp_path):
    """A short pretraining (the build's full budget is for make demo) run twice gives the same
    weights, and its loss on held-out prose is far below the random base's."""
    import io

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from farm.base_corpus import heldout_prose
    from farm.base_model import PretrainConfig, TinyModelConfig, build_base_model, prose_loss

    config = TinyModelConfig(layers=1, hidden=128, heads=2, kv_heads=2, intermediate=256, vocab=600)
    short = PretrainConfig(steps=60, batch_size=8, seq_len=64, warmup_steps=10, log_every=20)
    log = io.StringIO()
    first = build_base_model(tmp_path / "a", config, short, log=log)
    second = build_base_model(tmp_path / "b", config, short)
    random = build_base_model(tmp_path / "r", config)
    assert "step    60/60" in log.getvalue()  # progress lines as it goes
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], load_file(random / "model.safetensors")["model.embed_tokens.weight"])
    recorded = json.loads((first / "farm_base_model.json").read_text())
    assert recorded["pretrain"]["steps"] == 60 and recorded["pretrain"]["final_loss"] > 0

    tokenizer = AutoTokenizer.from_pretrained(first)
    prose = heldout_prose(24)
    losses = {name: prose_loss(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tokenizer, prose)
              for name, folder in (("pretrained", first), ("random", random))}
    assert losses["pretrained"] < 0.6 * losses["random"], losses


def test_an_interrupted_build_leaves_no_folder_behind(tmp_path, monkeypatch):
    from farm import base_model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    import transformers

    out = tmp_path / "base"
    monkeypatch.setattr(transformers.LlamaForCausalLM, "save_pretrained", interrupted)  # dies mid-write
    with pytest.raises(KeyboardInterrupt):
        base_model.build_base_model(out, base_model.TinyModelConfig(layers=1, hidden=128, heads=2, kv_heads=2,
                                                                    intermediate=256, vocab=600))
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging leftover
