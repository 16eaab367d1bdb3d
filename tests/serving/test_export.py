"""Exports of a registry version: merged model folder, GGUF adapter + Ollama Modelfile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm.registry import open_registry
from farm.serving.export import ExportError, export_gguf, export_merged

from ..registry.conftest import make_lora_adapter


@pytest.fixture
def published(tmp_path, base_model_dir):
    registry = open_registry(str(tmp_path / "registry"))
    adapter = make_lora_adapter(base_model_dir, tmp_path / "adapter", targets=("q_proj", "v_proj", "down_proj"))
    info = registry.publish("acme", "demo", adapter, base_model=str(base_model_dir))
    return registry, info, adapter


def test_merged_export_gives_the_logits_of_base_plus_adapter(published, tmp_path, base_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    registry, info, adapter = published
    _, folder = export_merged(registry, info.serve_name, tmp_path / "merged")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.glob("adapter_*")) and not list(folder.glob("*.bin"))
    ids = torch.tensor([[0, 5, 17, 42, 99, 3]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
        expected = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        actual = merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-4)  # the adapter does change the model
    with pytest.raises(ExportError, match="not empty"):
        export_merged(registry, info.serve_name, folder)


def test_gguf_export_reads_back_with_the_adapters_tensors(published, tmp_path):
    import gguf
    from safetensors.torch import load_file

    registry, info, adapter = published
    # Ollama loads GGUF models: the base's Hugging Face folder, a file that is not GGUF, or a name
    # Ollama could not have are refused before anything is written.
    (tmp_path / "weights.gguf").write_bytes(b"not a gguf file")
    for base, why in ((info.base_model, "not a file"), (str(tmp_path / "weights.gguf"), "not a GGUF file"),
                      ("/etc/passwd", "not a GGUF file"), ("Llama 3; rm -rf", "neither a GGUF file nor an Ollama model name")):
        with pytest.raises(ExportError, match=why):
            export_gguf(registry, "acme.demo@latest", tmp_path / "refused", base)
        assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    _, gguf_path, modelfile = export_gguf(registry, "acme.demo@latest", tmp_path / "ollama", "llama3.2:1b")
    assert modelfile.read_text() == "FROM llama3.2:1b\nADAPTER ./acme.demo.v1.gguf\n"
    reader = gguf.GGUFReader(str(gguf_path))
    fields = {name: reader.fields[name] for name in ("general.type", "adapter.type", "adapter.lora.alpha")}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == 16.0
    source = load_file(str(adapter / "adapter_model.safetensors"))
    read = {t.name: np.array(t.data) for t in reader.tensors}
    assert len(read) == len(source) == 2 * 2 * 3  # 2 layers x (A, B) x 3 modules
    expected = {
        "blk.0.attn_q.weight.lora_a": "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "blk.1.ffn_down.weight.lora_b": "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
    }
    for gguf_name, peft_name in expected.items():
        original = source[peft_name].numpy()
        np.testing.assert_array_equal(read[gguf_name].reshape(original.shape), original)
    for gguf_name, data in read.items():
        assert gguf_name.endswith((".weight.lora_a", ".weight.lora_b")) and np.isfinite(data).all()
