"""Export a registry version: merged into a standalone model, or as a GGUF adapter for Ollama.

    farm export merged acme.demo.v3 --out exported/acme-merged
    farm export ollama acme.demo.v3 --base models/base-f32.gguf --out exported/acme-ollama
        # adapter .gguf + Modelfile (FROM the base GGUF, or a model name Ollama has: --base llama3.2:1b)

Both read the version from the registry (sha256-checked download) and its base model from
the version's manifest (the exact name the adapter was trained and registered against).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from farm.atomic import replacing_folder
from farm.methods import METHODS, mergeable_methods
from farm.registry.core import Registry, VersionInfo
from farm.registry.tensors import base_module_shapes

GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}


class ExportError(ValueError):
    """A version that cannot be exported the way that was asked, and why."""


def _new_folder(out: Path):
    """``farm.atomic.replacing_folder`` for ``out``, which must be new or empty: an export never
    overwrites, and a failed one leaves nothing behind."""
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty; choose a new folder")
    return replacing_folder(out)


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
    with _new_folder(out) as tmp, tempfile.TemporaryDirectory(prefix="farm-export-") as work:
        registry.download(info.serve_name, Path(work) / "adapter")
        base = AutoModelForCausalLM.from_pretrained(info.base_model, dtype=torch.float32,
                                                    trust_remote_code=False, use_safetensors=True)
        merged = PeftModel.from_pretrained(base, str(Path(work) / "adapter")).merge_and_unload()
        merged.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(info.base_model, trust_remote_code=False).save_pretrained(str(tmp))
    return info, out


def _gguf_tensor_name(peft_key: str, name_map) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` -> ``blk.0.attn_q.weight.lora_a``."""
    module, _, rest = peft_key.removeprefix("base_model.model.").rpartition(".lora_")
    kind = rest.split(".", 1)[0].lower()  # "a" or "b"
    mapped = name_map.get_name(module)
    if mapped is None:
        raise ExportError(f"no GGUF name for module {module!r}")
    return f"{mapped}.weight.lora_{kind}"


#: An Ollama model name: ``llama3.2``, ``llama3.2:1b``, ``library/llama3.2:1b-instruct-q4_K_M``.
OLLAMA_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}(/[a-z0-9][a-z0-9._-]{0,79}){0,2}(:[A-Za-z0-9][A-Za-z0-9._-]{0,79})?$")


def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types and field.types[0].name == "STRING" else value.tolist()[0]


def ollama_base(base: str, layers: int, hidden: int | None) -> str:
    """What the Modelfile's ``FROM`` names: a base GGUF file (checked: a llama model with the
    adapter's layer count and width), as an absolute path, or an Ollama model name as given.
    A Hugging Face folder is refused: Ollama loads GGUF models, not safetensors folders."""
    import gguf

    path = Path(base).expanduser()
    if base.endswith(".gguf") or path.exists():
        if not path.is_file():
            raise ExportError(f"--base {base}: not a file; give the base model as a GGUF file (llama.cpp's "
                              "convert_hf_to_gguf.py writes one) or as a model name Ollama has")
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as exc:
            raise ExportError(f"--base {base}: not a GGUF file ({exc})") from None
        if _gguf_field(reader, "general.type") not in (None, "model"):
            raise ExportError(f"--base {base}: a GGUF {_gguf_field(reader, 'general.type')}, not a model")
        arch = _gguf_field(reader, "general.architecture")
        if arch != "llama":
            raise ExportError(f"--base {base}: architecture {arch!r}; the adapter is for a llama base")
        blocks, width = _gguf_field(reader, "llama.block_count"), _gguf_field(reader, "llama.embedding_length")
        if blocks != layers or (hidden is not None and width != hidden):
            raise ExportError(f"--base {base}: {blocks} layers of width {width}; the adapter's base has "
                              f"{layers} of width {hidden}")
        return str(path.resolve())
    if not OLLAMA_NAME.match(base):
        raise ExportError(f"--base {base!r}: neither a GGUF file nor an Ollama model name (name[:tag])")
    return base


def _attention_heads(base_model: str) -> tuple[int, int]:
    """(query heads, key/value heads) of the base, from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_model, trust_remote_code=False)
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def _rope_rows(gguf_name: str, value, heads: int, kv_heads: int):
    """A LoRA tensor in the row order llama.cpp's GGUF base has.

    llama.cpp's converter reorders the output rows of q_proj and k_proj (per head, the two
    rotary halves interleaved, as its RoPE kernels read them); a LoRA's B of those modules
    produces those rows, so it is reordered the same way. A (the input side) and every other
    module are unchanged.
    """
    if not gguf_name.endswith(".lora_b") or not (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        return value
    groups = heads if ".attn_q." in gguf_name else kv_heads
    rows = value.shape[0]
    return value.reshape(groups, 2, rows // groups // 2, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)


def export_gguf(registry: Registry, reference: str, out: Path, base: str) -> tuple[VersionInfo, Path, Path]:
    """Write the adapter as a GGUF LoRA (llama.cpp's layout) plus an Ollama ``Modelfile`` whose
    ``FROM`` is ``base`` (see ``ollama_base``)."""
    import gguf
    from safetensors.torch import load_file

    info = registry.resolve(reference)
    if info.method != "lora":
        raise ExportError(f"{info.serve_name}: only plain LoRA adapters export to GGUF, not {info.method}")
    architecture = registry.store.read_manifest(info.tenant, info.adapter, info.version).get("base_architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise ExportError(f"{info.serve_name}: GGUF export supports Llama-architecture bases, "
                          f"not {architecture!r}")
    file_name = f"{info.serve_name}.gguf"
    with _new_folder(out) as tmp, tempfile.TemporaryDirectory(prefix="farm-export-") as work:
        registry.download(info.serve_name, Path(work))
        tensors = load_file(str(Path(work) / "adapter_model.safetensors"))
        layers = 1 + max(int(k.split("layers.")[1].split(".")[0]) for k in tensors if "layers." in k)
        shapes = base_module_shapes(info.base_model)
        hidden = next((s.out_features for s in shapes.values() if s.kind == "embedding"), None) if shapes else None
        if shapes:
            layers = len({n.split("layers.")[1].split(".")[0] for n in shapes if "layers." in n})
        source = ollama_base(base, layers, hidden)
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
        writer = gguf.GGUFWriter(str(tmp / file_name), GGUF_ARCHITECTURES[architecture])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(info.method_settings.get("lora_alpha", 1.0)))
        writer.add_string(gguf.Keys.General.NAME, info.serve_name)
        heads = _attention_heads(info.base_model)
        for key in sorted(tensors):
            name = _gguf_tensor_name(key, name_map)
            writer.add_tensor(name, _rope_rows(name, tensors[key].float().numpy(), *heads))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        (tmp / "Modelfile").write_text(f"FROM {source}\nADAPTER ./{file_name}\n")
    return info, out / file_name, out / "Modelfile"
