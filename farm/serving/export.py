"""Export a registry version: merged into a standalone model, or as a GGUF adapter for Ollama.

    farm export merged acme.demo.v3 --out exported/acme-merged
    farm export ollama acme.demo.v3 --out exported/acme-ollama   # adapter.gguf + Modelfile

Both read the version from the registry (sha256-checked download) and its base model from
the version's manifest (the exact name the adapter was trained and registered against).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from farm.methods import METHODS, mergeable_methods
from farm.registry.core import Registry, VersionInfo

GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}


class ExportError(ValueError):
    """A version that cannot be exported the way that was asked, and why."""


def _atomic_folder(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"


def _finish(tmp: Path, out: Path) -> Path:
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    return out


def export_merged(registry: Registry, reference: str, out: Path) -> tuple[VersionInfo, Path]:
    """Write base + adapter merged into a standalone transformers model folder (safetensors)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = registry.resolve(reference)
    if info.method not in METHODS or not METHODS[info.method].mergeable:
        why = METHODS[info.method].not_mergeable if info.method in METHODS else "the farm does not know the method"
        raise ExportError(f"{info.serve_name}: a {info.method} adapter cannot be merged into the base "
                          f"weights ({why}); mergeable methods: {', '.join(mergeable_methods())}")
    tmp = _atomic_folder(out)
    with tempfile.TemporaryDirectory(prefix="farm-export-") as work:
        registry.download(info.serve_name, Path(work) / "adapter")
        base = AutoModelForCausalLM.from_pretrained(info.base_model, dtype=torch.float32,
                                                    trust_remote_code=False, use_safetensors=True)
        merged = PeftModel.from_pretrained(base, str(Path(work) / "adapter")).merge_and_unload()
        merged.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(info.base_model, trust_remote_code=False).save_pretrained(str(tmp))
    return info, _finish(tmp, out)


def _gguf_tensor_name(peft_key: str, name_map) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` -> ``blk.0.attn_q.weight.lora_a``."""
    module, _, rest = peft_key.removeprefix("base_model.model.").rpartition(".lora_")
    kind = rest.split(".", 1)[0].lower()  # "a" or "b"
    mapped = name_map.get_name(module)
    if mapped is None:
        raise ExportError(f"no GGUF name for module {module!r}")
    return f"{mapped}.weight.lora_{kind}"


def export_gguf(registry: Registry, reference: str, out: Path) -> tuple[VersionInfo, Path, Path]:
    """Write the adapter as a GGUF LoRA (llama.cpp's layout) plus an Ollama ``Modelfile``."""
    import gguf
    from safetensors.torch import load_file

    info = registry.resolve(reference)
    if info.method != "lora":
        raise ExportError(f"{info.serve_name}: only plain LoRA adapters export to GGUF, not {info.method}")
    architecture = registry.store.read_manifest(info.tenant, info.adapter, info.version).get("base_architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise ExportError(f"{info.serve_name}: GGUF export supports Llama-architecture bases, "
                          f"not {architecture!r}")
    tmp = _atomic_folder(out)
    tmp.mkdir()
    file_name = f"{info.serve_name}.gguf"
    with tempfile.TemporaryDirectory(prefix="farm-export-") as work:
        registry.download(info.serve_name, Path(work))
        tensors = load_file(str(Path(work) / "adapter_model.safetensors"))
        layers = 1 + max(int(k.split("layers.")[1].split(".")[0]) for k in tensors if "layers." in k)
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
        writer = gguf.GGUFWriter(str(tmp / file_name), GGUF_ARCHITECTURES[architecture])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(info.method_settings.get("lora_alpha", 1.0)))
        writer.add_string(gguf.Keys.General.NAME, info.serve_name)
        for key in sorted(tensors):
            writer.add_tensor(_gguf_tensor_name(key, name_map), tensors[key].float().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    (tmp / "Modelfile").write_text(f"FROM {info.base_model}\nADAPTER ./{file_name}\n")
    final = _finish(tmp, out)
    return info, final / file_name, final / "Modelfile"
