"""The PEFT methods the farm knows: one registry, one entry per method.

Everything that differs between methods lives here: the typed settings a spec may give, how
they become a PEFT config, and what can be done with the trained adapter afterwards. The rest
of the code asks this module; adding a method is one new settings class plus one entry in
``METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Ranks vLLM accepts for --max-lora-rank; an adapter whose rank is outside this set cannot be
# served by vLLM (see ../shared/FIELD-NOTES.md).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class StrictModel(BaseModel):
    """Base for every settings object: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(StrictModel):
    """Low-rank adaptation (LoRA) of the base model's linear layers."""

    rank: int = Field(8, ge=1, le=1024, description="rank r of the update matrices")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is scaled by alpha / rank")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description='module names to adapt, or "all-linear" for every linear layer but the head',
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return value


#: Module names vLLM can put a LoRA on, per base architecture (from vLLM's model classes:
#: packed qkv / gate_up projections are addressed by their original names).
VLLM_LORA_TARGETS: dict[str, frozenset[str]] = {
    arch: frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "embed_tokens", "lm_head"})
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
}


@dataclass(frozen=True)
class MethodInfo:
    """What the farm knows about one PEFT method."""

    name: str
    settings: type[StrictModel]
    to_peft_config: Callable[[StrictModel], object]
    summary: str
    #: PEFT's ``peft_type`` in a saved adapter_config.json
    peft_type: str = ""
    #: why vLLM cannot serve an adapter of this method with this config (None: it can)
    vllm_blocker: Callable[[dict, str | None], str | None] = lambda config, arch: "vLLM serves LoRA adapters only"


def _lora_config(settings: LoraSettings):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",  # vLLM serves only bias-free adapters
    )


def _lora_vllm_blocker(config: dict, architecture: str | None) -> str | None:
    """The first reason vLLM would refuse this LoRA adapter, or None (see FIELD-NOTES)."""
    rank = config.get("r")
    if rank not in VLLM_LORA_RANKS:
        return f"rank {rank} is not one vLLM accepts ({', '.join(map(str, VLLM_LORA_RANKS))})"
    if config.get("bias", "none") != "none":
        return f"bias is {config.get('bias')!r}; vLLM needs 'none'"
    if config.get("modules_to_save"):
        return f"modules_to_save {config['modules_to_save']} is not supported by vLLM"
    if config.get("use_dora"):
        return "DoRA adapters are not supported by vLLM"
    if architecture not in VLLM_LORA_TARGETS:
        return f"base architecture {architecture!r} is not in the farm's table of vLLM LoRA targets"
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        return f"target_modules is a pattern ({targets!r}); vLLM needs explicit module names"
    # PEFT saves "all-linear" as full module paths (model.layers.0.mlp.down_proj); vLLM
    # matches on the last component.
    unsupported = sorted({t.rsplit(".", 1)[-1] for t in targets} - VLLM_LORA_TARGETS[architecture])
    if unsupported:
        return f"target modules {unsupported} are not LoRA-capable in vLLM for {architecture}"
    return None


METHODS: dict[str, MethodInfo] = {
    "lora": MethodInfo("lora", LoraSettings, _lora_config, "low-rank update of linear layers",
                       peft_type="LORA", vllm_blocker=_lora_vllm_blocker),
}


#: Methods whose adapter can be folded into the base weights (``farm export merged``).
#: DoRA is LoRA with ``use_dora``; the registry records it as its own method.
MERGEABLE_METHODS = frozenset({"lora", "dora"})


def method_for_peft_type(peft_type: str, config: dict) -> MethodInfo | None:
    """The registry entry of a saved adapter's ``peft_type`` (None when the farm has none)."""
    for info in METHODS.values():
        if info.peft_type == peft_type:
            return info
    return None

MethodName = Literal["lora"]


def method_info(name: str) -> MethodInfo:
    """Return the registry entry for ``name``; raises ``KeyError`` naming the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown PEFT method {name!r}; known: {', '.join(sorted(METHODS))}") from None
