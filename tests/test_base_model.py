"""The tiny offline base model: built by the CLI, loaded through the same path as real bases."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from farm.models import load_base_model, load_tokenizer, select_placement
from farm.spec import BaseModelSpec


def test_cli_builds_a_servable_llama_that_loads_like_a_hub_model(tmp_path):
    out = tmp_path / "base"
    proc = subprocess.run([sys.executable, "-m", "farm.cli", "base-model", "build", "--out", str(out),
                           "--layers", "1", "--hidden", "128", "--heads", "2", "--vocab", "600"],
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
    assert proc.returncode == 1
    assert "head_dim is 64" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_bf16_is_refused_without_a_gpu_that_has_it():
    import pytest

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert select_placement("bf16").dtype == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="bf16 needs a GPU"):
            select_placement("bf16")
        assert select_placement("auto").dtype == torch.float32
