"""What is inside an adapter's weights: every tensor finite, named and shaped as its config says.

The registry runs these checks at publish, and the vLLM resolver runs them again (against the
base the server actually holds) before a version can reach vLLM: one adapter whose tensors are
NaN broke later requests of other tenants on the same vLLM server, and a wrong
shape fails inside the engine. Tensors are read one at a time, in row chunks, so memory stays
bounded by ``CHUNK_ELEMENTS`` whatever the file holds.

    check_adapter_weights(Path("adapter_model.safetensors"), config)            # no base known
    check_adapter_weights(path, config, base_module_shapes("/models/base"))     # against the base
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from farm.registry.validate import CONFIG_FILE, WEIGHTS_FILE, PublishError

#: At most this many elements of one tensor are in memory at once while checking finiteness.
CHUNK_ELEMENTS = 1 << 22
#: PEFT prefixes saved keys with the wrapper's path to the base model.
_PEFT_PREFIX = "base_model.model."
#: Saved LoRA tensor kinds (PEFT 0.21 drops the adapter name from saved keys).
_LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector",
               "lora_embedding_A", "lora_embedding_B")


@dataclass(frozen=True)
class ModuleShape:
    """A base module an adapter may target: its kind and (in_features, out_features)."""

    kind: str  # "linear" or "embedding"
    in_features: int
    out_features: int


def _tensor_error(name: str, reason: str) -> PublishError:
    return PublishError(f"{WEIGHTS_FILE}: tensor {name!r}: {reason}")


def _check_finite(handle, name: str) -> tuple[int, ...]:
    """The tensor's shape, after checking every value is finite (row chunks, bounded memory)."""
    import torch

    piece = handle.get_slice(name)
    shape = tuple(piece.get_shape())
    if any(d == 0 for d in shape):
        raise _tensor_error(name, f"is empty (shape {list(shape)})")
    if not shape:  # a scalar
        values = [handle.get_tensor(name)]
    else:
        row = 1
        for d in shape[1:]:
            row *= d
        step = max(1, CHUNK_ELEMENTS // max(row, 1))
        values = (piece[start:start + step] for start in range(0, shape[0], step))
    for chunk in values:
        if chunk.is_floating_point() or chunk.is_complex():
            if not bool(torch.isfinite(chunk).all()):
                bad = "NaN" if bool(torch.isnan(chunk).any()) else "infinite"
                raise _tensor_error(name, f"holds {bad} values; every value must be finite")
    return shape


def _targets(config: Mapping) -> list[str] | str:
    targets = config.get("target_modules")
    if targets is None or targets == [] or targets == "":
        raise PublishError(f"{CONFIG_FILE}: field 'target_modules' is empty; an adapter must adapt "
                           f"at least one module")
    return targets


def _targeted(module_path: str, targets: list[str] | str) -> bool:
    """Whether PEFT would have adapted ``module_path`` for these ``target_modules``.

    A string is a regular expression in PEFT. A tenant's pattern is never run here (a
    backtracking pattern could hold the registry's CPU); such adapters are not servable by vLLM
    anyway, and their tensors still have to be LoRA parts with consistent shapes.
    """
    if isinstance(targets, str):
        return True
    return any(module_path == t or module_path.endswith("." + t) for t in targets)


def check_adapter_weights(weights: Path, config: Mapping,
                          base_modules: Mapping[str, ModuleShape] | None = None) -> int:
    """Check every tensor of ``weights`` against ``config`` (and the base, when given).

    Always: the file holds tensors, every value is finite (no NaN or inf), LoRA adapters have
    a non-empty target set and every tensor is a known LoRA part of a targeted module with
    both halves present and shapes that agree with the rank. With ``base_modules`` (from
    ``base_module_shapes``): each adapted module exists in the base with matching features.
    Raises ``PublishError`` naming the tensor and the reason; returns the tensor count.
    """
    from safetensors import safe_open

    peft_type = config.get("peft_type")
    is_lora = peft_type == "LORA"
    targets = _targets(config) if is_lora else None
    rank = config.get("r")
    rank_pattern = config.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
            for k, v in rank_pattern.items()):
        raise PublishError(f"{CONFIG_FILE}: field 'rank_pattern' must map module names to ranks")
    halves: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        handle_cm = safe_open(str(weights), framework="pt")
    except Exception as exc:
        raise PublishError(f"{WEIGHTS_FILE}: not a valid safetensors file ({exc})") from None
    count = 0
    shapes: dict[str, tuple[int, ...]] = {}
    with handle_cm as handle:
        names = list(handle.keys())
        if not names:
            raise PublishError(f"{WEIGHTS_FILE}: holds no tensors")
        for name in names:
            shape = _check_finite(handle, name)
            count += 1
            shapes[name] = shape
            if not is_lora:
                continue
            part = next((p for p in _LORA_PARTS if name.endswith("." + p)), None)
            if part is None or not name.startswith(_PEFT_PREFIX):
                raise _tensor_error(name, "is not a LoRA tensor (expected base_model.model.<module>."
                                          "lora_A.weight / lora_B.weight)")
            module = name[len(_PEFT_PREFIX):-(len(part) + 1)]
            if not module or not _targeted(module, targets):
                raise _tensor_error(name, f"adapts module {module!r}, which is not among target_modules")
            halves.setdefault(module, {})[part] = shape
    if peft_type == "BOTTLENECK":
        _check_bottleneck(config, shapes, base_modules)
    if not is_lora:
        return count
    for module, parts in sorted(halves.items()):
        expected_rank = next((r for key, r in rank_pattern.items() if module.endswith(key)), rank)
        if "lora_A.weight" in parts or "lora_B.weight" in parts:
            a, b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
            if a is None or b is None:
                missing = "lora_A.weight" if a is None else "lora_B.weight"
                raise _tensor_error(f"{_PEFT_PREFIX}{module}.{missing}", "is missing (LoRA needs both halves)")
            if len(a) != 2 or len(b) != 2:
                raise _tensor_error(f"{_PEFT_PREFIX}{module}.lora_A.weight",
                                    f"LoRA halves must be matrices, got {list(a)} and {list(b)}")
            if a[0] != expected_rank or b[1] != expected_rank:
                raise _tensor_error(f"{_PEFT_PREFIX}{module}.lora_A.weight",
                                    f"shapes {list(a)} (A) and {list(b)} (B) do not have rank {expected_rank}")
            in_features, out_features = a[1], b[0]
            if base_modules is not None:
                base = base_modules.get(module)
                if base is None:
                    raise _tensor_error(f"{_PEFT_PREFIX}{module}.lora_A.weight",
                                        f"the base model has no module {module!r}")
                if (base.in_features, base.out_features) != (in_features, out_features):
                    half = "lora_A.weight" if base.in_features != in_features else "lora_B.weight"
                    raise _tensor_error(
                        f"{_PEFT_PREFIX}{module}.{half}",
                        f"adapts {in_features} -> {out_features} features, but the base module "
                        f"{module!r} is {base.in_features} -> {base.out_features}")
            magnitude = parts.get("lora_magnitude_vector")
            if magnitude is not None and tuple(magnitude) != (out_features,):
                raise _tensor_error(f"{_PEFT_PREFIX}{module}.lora_magnitude_vector",
                                    f"shape {list(magnitude)}, expected [{out_features}]")
        elif base_modules is not None and module not in base_modules:
            raise _tensor_error(f"{_PEFT_PREFIX}{module}", f"the base model has no module {module!r}")
    if not halves:
        raise PublishError(f"{WEIGHTS_FILE}: no LoRA tensors")
    return count


@functools.lru_cache(maxsize=8)
def base_module_shapes(base_model: str) -> dict[str, ModuleShape] | None:
    """Linear and embedding modules of a local base model, from its config.json alone.

    The model is built on PyTorch's ``meta`` device (no weights, no memory), so this is cheap
    for any size. None when ``base_model`` is not a local folder with a config.json (a hub id
    the registry cannot read offline): the checks that need the base are then skipped here and
    done by the serving resolver, which always has its base.
    """
    folder = Path(base_model).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        json.loads(config_file.read_text())
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise PublishError(f"base model {base_model!r}: cannot read its architecture ({exc})") from None
    shapes: dict[str, ModuleShape] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = ModuleShape("linear", module.in_features, module.out_features)
        elif isinstance(module, torch.nn.Embedding):
            shapes[name] = ModuleShape("embedding", module.num_embeddings, module.embedding_dim)
    return shapes


def _check_bottleneck(config: Mapping, shapes: dict[str, tuple[int, ...]],
                      base_modules: Mapping[str, ModuleShape] | None) -> None:
    """A bottleneck adapter's tensors are exactly its config's (names, shapes, every layer), and
    with the base known, its hidden size is the base's (the input of each layer's MLP)."""
    from farm.bottleneck import CHILD, check_tensor_names, parse_config

    try:
        parsed = parse_config(dict(config))
    except ValueError as exc:
        raise PublishError(f"{CONFIG_FILE}: {exc}") from None
    reason = check_tensor_names(parsed, shapes)
    if reason is not None:
        raise PublishError(f"{WEIGHTS_FILE}: {reason}")
    if base_modules:
        widths = {shape.out_features for shape in base_modules.values() if shape.kind == "embedding"}
        if widths and parsed.hidden_size not in widths:
            raise PublishError(f"{CONFIG_FILE}: hidden_size {parsed.hidden_size} is not the base's {sorted(widths)}")
        for name in shapes:
            block = name.split(f".{CHILD}.")[0]  # <layer>.<self_attn|mlp>
            if not any(module.startswith(block + ".") for module in base_modules):
                raise PublishError(f"{WEIGHTS_FILE}: {name}: the base has no block {block}")
