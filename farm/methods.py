"""The PEFT methods the farm knows: one registry, one entry per method.

Everything that differs between methods lives here: the typed settings a spec may give, how
they become a PEFT config, what they need (a CUDA device, unpacked rows), what the planner
should assume, and what can be done with the trained adapter afterwards (vLLM, merging,
co-training). The rest of the code asks this module; adding a method is one new settings
class plus one entry in ``METHODS`` (the spec, its reference, the registry and the planner
follow from the entry).

=======  =============  ============================  =========  =========  ===========
method   peft_type      vLLM serves it                mergeable  co-trains  packed rows
=======  =============  ============================  =========  =========  ===========
lora     LORA           yes                           yes        yes        yes
dora     LORA           no                            yes        no         yes
ia3      IA3            no                            yes        no         yes
prefix   PREFIX_TUNING  no                            no         no         no
prompt   PROMPT_TUNING  no                            no         no         no
qlora    LORA           yes (plain LoRA weights)      yes        no         yes  (needs CUDA)
bottle-  BOTTLENECK     no                            no         no         yes
neck     (the farm's)
=======  =============  ============================  =========  =========  ===========

Every method is served by the farm's transformers backend (``farm serve --backend
transformers``); the gateway sends a version there when vLLM cannot serve it. Bottleneck
adapters are the farm's own implementation (``farm.bottleneck``): ``library`` says which code
builds and loads a method's adapters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from farm.plan import ModelShape

# Ranks vLLM (0.32) accepts for --max-lora-rank; an adapter whose rank is outside this set cannot be
# served by vLLM: the server refuses to start with another --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class StrictModel(BaseModel):
    """Base for every settings object: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _module_list(value, what: str):
    if isinstance(value, list):
        if not value:
            raise ValueError(f"must name at least one module{what}")
        bad = [v for v in value if not v or not all(c.isalnum() or c in "._-" for c in v)]
        if bad:
            raise ValueError(f"{bad} are not module names (letters, digits, '.', '_', '-')")
    return value


# -- settings, one class per method -------------------------------------------------------------


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
        return _module_list(value, ", or be 'all-linear'")


class DoraSettings(LoraSettings):
    """Weight-decomposed LoRA (DoRA): LoRA's update plus a trained magnitude per output feature.

    Same settings as LoRA. Each step also normalises the updated weight, which costs one
    weight-sized product per adapted linear (the planner counts it).
    """


class QLoraSettings(LoraSettings):
    """LoRA on a base loaded in 4-bit with bitsandbytes (QLoRA); needs a CUDA device.

    The adapter itself is plain LoRA weights saved against the unquantised base's name, so
    vLLM can serve it on the full-precision base.
    """

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen weights (NF4 is QLoRA's)")
    double_quant: bool = Field(True, description="quantise the quantisation scales too (saves about 0.4 bit/param)")
    compute_dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="dtype the 4-bit weights are dequantised to for matmuls")


class IA3Settings(StrictModel):
    """IA3: learned per-feature scaling of chosen activations (far fewer parameters than LoRA)."""

    target_modules: list[str] = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
        description="modules whose activations are scaled")
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"],
        description="those of target_modules that are feed-forward layers (scaled on their input, not output)")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value):
        return _module_list(value, "")

    @model_validator(mode="after")
    def _feedforward_among_targets(self):
        stray = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if stray:
            raise ValueError(f"feedforward_modules {stray} are not among target_modules {self.target_modules}")
        return self


class PrefixSettings(StrictModel):
    """Prefix tuning: trained key/value prefixes in every attention layer; weights untouched."""

    num_virtual_tokens: int = Field(16, ge=1, le=512, description="prefix length per layer")
    init: Literal["random", "zero"] = Field("random", description="random prefixes, or zero ones (the untrained adapter is then a no-op)")
    projection: bool = Field(False, description="reparametrise the prefixes through a two-layer MLP while training")
    projection_hidden_size: Optional[int] = Field(None, ge=1, description="hidden size of that MLP (default: the model's hidden size); needs projection")

    @model_validator(mode="after")
    def _projection_settings(self):
        if self.projection_hidden_size is not None and not self.projection:
            raise ValueError("projection_hidden_size needs projection: true")
        if self.projection and self.init == "zero":
            raise ValueError("init 'zero' applies to plain prefixes, not to projection: true")
        return self


class PromptSettings(StrictModel):
    """Prompt tuning: trained virtual-token embeddings prepended to the input; weights untouched."""

    num_virtual_tokens: int = Field(16, ge=1, le=512, description="virtual tokens prepended to every row")
    init: Literal["random", "sample_vocab", "text"] = Field(
        "sample_vocab", description="random embeddings, embeddings of random vocabulary tokens, or of init_text")
    init_text: Optional[str] = Field(None, min_length=1, max_length=2000, description="text whose token embeddings start the prompt (init: text)")

    @model_validator(mode="after")
    def _text_init(self):
        if self.init == "text" and not self.init_text:
            raise ValueError("init 'text' needs init_text")
        if self.init != "text" and self.init_text is not None:
            raise ValueError("init_text is only used with init: text")
        return self


class BottleneckSettings(StrictModel):
    """Bottleneck adapters: a small down-projection, non-linearity, up-projection and residual
    after the attention and/or MLP block of every layer (``farm.bottleneck``)."""

    placement: Literal["houlsby", "pfeiffer"] = Field(
        "pfeiffer", description="houlsby: after the attention and the MLP block of each layer; pfeiffer: after the MLP only")
    reduction_factor: int = Field(16, ge=1, le=4096, description="bottleneck size is hidden size / reduction_factor")
    bottleneck_size: Optional[int] = Field(None, ge=1, le=65536, description="bottleneck size itself (overrides reduction_factor)")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="activation between the projections")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout inside the adapter (training only)")
    init: Literal["near_identity", "identity"] = Field(
        "near_identity", description="near_identity: both projections small random; identity: up-projection zero (exact no-op at start)")
    init_std: float = Field(1e-2, gt=0, le=1, description="standard deviation of the initial projection weights")

    def size_for(self, hidden: int) -> int:
        """The bottleneck size on a base of width ``hidden``."""
        return self.bottleneck_size or max(1, hidden // self.reduction_factor)


# -- the entries --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodInfo:
    """What the farm knows about one PEFT method."""

    name: str
    settings: type[StrictModel]
    #: settings + the base model's name or path -> a PEFT config
    to_peft_config: Callable[[StrictModel, str], object]
    summary: str
    #: PEFT's ``peft_type`` in a saved adapter_config.json
    peft_type: str
    #: why vLLM cannot serve an adapter of this method with this config (None: it can)
    vllm_blocker: Callable[[dict, Optional[str]], Optional[str]]
    #: can share a batch with other tenants' adapters on one base (``farm.train.cotrain``)
    co_trainable: bool
    #: can train on packed rows (several examples per row, separated by position ids)
    packs_rows: bool
    #: the planner's view: ``PlanRequest`` fields for these settings on a model shape (see
    #: ``planner_fields``, which adds the label)
    plan_fields: Callable[[StrictModel, "ModelShape"], dict]
    #: why it cannot run without a CUDA device (None: it runs anywhere)
    needs_cuda: Optional[str] = None
    #: does a saved adapter_config.json of ``peft_type`` belong to this method (default: every one)
    recognises: Callable[[dict], bool] = lambda config: True
    #: why it cannot train with gradient checkpointing (None: it can)
    no_gradient_checkpointing: Optional[str] = None
    #: a transformers quantisation config for the base model (None: load it unquantised)
    quantization: Optional[Callable[[StrictModel], object]] = None
    #: why it cannot train on a base sharded across workers (``train.shard_base``; None: it can)
    no_sharded_base: Optional[str] = None
    #: whose code builds, saves and loads its adapters: ``peft``, or ``farm`` (``farm.bottleneck``)
    library: Literal["peft", "farm"] = "peft"
    #: why ``farm export merged`` cannot fold it into the base (None: ``merge_and_unload`` can)
    not_mergeable: Optional[str] = None
    #: can rows of different lengths share a generation batch (left-padded) and answer exactly as
    #: alone; False: the serving backend batches only prompts of equal length
    pads_batches: bool = True

    @property
    def mergeable(self) -> bool:
        """Can ``merge_and_unload`` fold it into the base weights (``farm export merged``)."""
        return self.not_mergeable is None


def _lora_config(settings: LoraSettings, base_model: str, use_dora: bool = False):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",  # vLLM serves only bias-free adapters
        use_dora=use_dora,
    )


def _dora_config(settings: DoraSettings, base_model: str):
    return _lora_config(settings, base_model, use_dora=True)


def _ia3_config(settings: IA3Settings, base_model: str):
    from peft import IA3Config, TaskType

    return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=list(settings.target_modules),
                     feedforward_modules=list(settings.feedforward_modules))


def _prefix_config(settings: PrefixSettings, base_model: str):
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens,
                              prefix_projection=settings.projection,
                              encoder_hidden_size=settings.projection_hidden_size,
                              init_weights="zero" if settings.init == "zero" else None)


def _prompt_config(settings: PromptSettings, base_model: str):
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    text = settings.init == "text"
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens,
                              prompt_tuning_init=PromptTuningInit[settings.init.upper()],
                              prompt_tuning_init_text=settings.init_text if text else None,
                              # PEFT tokenises init_text with the base model's own tokenizer
                              tokenizer_name_or_path=base_model if text else None)


def _bottleneck_config(settings: BottleneckSettings, base_model: str):
    # The config depends on the base's shape; farm.bottleneck.attach builds it from the model.
    return settings


def _bnb_config(settings: QLoraSettings):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype={"bf16": torch.bfloat16, "fp16": torch.float16,
                                "fp32": torch.float32}[settings.compute_dtype])


#: Module names vLLM can put a LoRA on, per base architecture (from vLLM's model classes:
#: packed qkv / gate_up projections are addressed by their original names).
VLLM_LORA_TARGETS: dict[str, frozenset[str]] = {
    arch: frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "embed_tokens", "lm_head"})
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
}


def _lora_vllm_blocker(config: dict, architecture: str | None) -> str | None:
    """The first reason vLLM (0.32) would refuse this LoRA adapter when loading it, or None."""
    rank = config.get("r")
    if rank not in VLLM_LORA_RANKS:
        return f"rank {rank} is not one vLLM accepts ({', '.join(map(str, VLLM_LORA_RANKS))})"
    if config.get("bias", "none") != "none":
        return f"bias is {config.get('bias')!r}; vLLM needs 'none'"
    if config.get("modules_to_save"):
        return f"modules_to_save {config['modules_to_save']} is not supported by vLLM"
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


def _fixed_blocker(reason: str) -> Callable[[dict, Optional[str]], str]:
    return lambda config, architecture: reason


_dora_vllm_blocker = _fixed_blocker(
    "vLLM does not load DoRA adapters (use_dora); `farm export merged` folds it into a model vLLM can serve")


# -- the planner's view -------------------------------------------------------------------------


def _lora_plan(settings: LoraSettings, shape: "ModelShape") -> dict:
    targets = settings.target_modules
    return {"method": "lora", "rank": settings.rank,
            "target_modules": targets if targets == "all-linear" else tuple(targets)}


def _dora_plan(settings: DoraSettings, shape: "ModelShape") -> dict:
    return {**_lora_plan(settings, shape), "dora": True}


def _qlora_plan(settings: QLoraSettings, shape: "ModelShape") -> dict:
    return {**_lora_plan(settings, shape), "method": "qlora"}


def _ia3_plan(settings: IA3Settings, shape: "ModelShape") -> dict:
    # One scale per output feature of a target, per input feature of a feed-forward target.
    shapes = shape.linear_shapes()
    count = sum(shapes[t][0] if t in settings.feedforward_modules else shapes[t][1]
                for t in settings.target_modules if t in shapes)
    return {"method": "lora", "rank": 1, "target_modules": (), "adapter_params": shape.layers * count}


def _prefix_plan(settings: PrefixSettings, shape: "ModelShape") -> dict:
    # A key and a value prefix per layer; the projection MLP adds two dense layers.
    kv = shape.kv_heads * shape.head_dim
    count = settings.num_virtual_tokens * shape.layers * 2 * kv
    if settings.projection:
        hidden = settings.projection_hidden_size or shape.hidden
        out = shape.layers * 2 * kv
        count = settings.num_virtual_tokens * shape.hidden + (shape.hidden + 1) * hidden + (hidden + 1) * out
    return {"method": "lora", "rank": 1, "target_modules": (), "adapter_params": count,
            "extra_tokens": settings.num_virtual_tokens}


def _prompt_plan(settings: PromptSettings, shape: "ModelShape") -> dict:
    return {"method": "lora", "rank": 1, "target_modules": (),
            "adapter_params": settings.num_virtual_tokens * shape.hidden,
            "extra_tokens": settings.num_virtual_tokens}


def _bottleneck_plan(settings: BottleneckSettings, shape: "ModelShape") -> dict:
    # Per adapted block: down (hidden x size + size) and up (size x hidden + hidden).
    size = settings.size_for(shape.hidden)
    blocks = 2 if settings.placement == "houlsby" else 1
    count = shape.layers * blocks * (2 * shape.hidden * size + size + shape.hidden)
    return {"method": "lora", "rank": 1, "target_modules": (), "adapter_params": count}


_ONLY_LORA = "vLLM serves LoRA adapters only"

_PROMPT_OUTSIDE = ("its trained virtual tokens live outside the base's layers, which the sharding wraps; "
                   "train it with shard_base: none")

METHODS: dict[str, MethodInfo] = {
    "lora": MethodInfo(
        "lora", LoraSettings, _lora_config, "low-rank update of linear layers", peft_type="LORA",
        recognises=lambda config: not config.get("use_dora"), vllm_blocker=_lora_vllm_blocker,
        co_trainable=True, packs_rows=True, plan_fields=_lora_plan),
    "dora": MethodInfo(
        "dora", DoraSettings, _dora_config, "LoRA plus a trained magnitude per output feature",
        peft_type="LORA", recognises=lambda config: bool(config.get("use_dora")),
        vllm_blocker=_dora_vllm_blocker, co_trainable=False, packs_rows=True,
        plan_fields=_dora_plan),
    "ia3": MethodInfo(
        "ia3", IA3Settings, _ia3_config, "learned scaling of attention and feed-forward activations",
        peft_type="IA3",
        vllm_blocker=_fixed_blocker(f"{_ONLY_LORA}; IA3 scales activations and has no low-rank weights "
                                    "(`farm export merged` folds it into a model vLLM can serve)"),
        co_trainable=False, packs_rows=True, plan_fields=_ia3_plan),
    "prefix": MethodInfo(
        "prefix", PrefixSettings, _prefix_config, "trained key/value prefixes in every layer",
        peft_type="PREFIX_TUNING",
        vllm_blocker=_fixed_blocker(f"{_ONLY_LORA}; prefix tuning adds key/value prefixes, which vLLM "
                                    "cannot load and which cannot be merged into the weights"),
        not_mergeable="it adds key/value prefixes, not weight updates",
        co_trainable=False, packs_rows=False, plan_fields=_prefix_plan,
        no_gradient_checkpointing="its prefixes enter every layer through the key/value cache, which "
                                  "gradient checkpointing turns off",
        no_sharded_base=_PROMPT_OUTSIDE),
    "prompt": MethodInfo(
        "prompt", PromptSettings, _prompt_config, "trained virtual-token embeddings before the input",
        peft_type="PROMPT_TUNING",
        vllm_blocker=_fixed_blocker(f"{_ONLY_LORA}; prompt tuning's virtual-token embeddings are not "
                                    "LoRA weights and cannot be merged into the weights"),
        not_mergeable="it adds virtual tokens before the input, not weight updates",
        # PEFT puts the virtual tokens before the padding and ignores position ids: padded rows
        # would see other positions than alone.
        pads_batches=False,
        co_trainable=False, packs_rows=False, plan_fields=_prompt_plan,
        no_sharded_base=_PROMPT_OUTSIDE),
    "qlora": MethodInfo(
        "qlora", QLoraSettings, _lora_config, "LoRA on a 4-bit (bitsandbytes) base", peft_type="LORA",
        recognises=lambda config: not config.get("use_dora"), vllm_blocker=_lora_vllm_blocker,
        co_trainable=False, packs_rows=True, plan_fields=_qlora_plan,
        needs_cuda="QLoRA loads the base in 4-bit with bitsandbytes, whose kernels need a CUDA device",
        quantization=_bnb_config,
        no_sharded_base="its base is already 4-bit to fit one device, and FSDP does not shard bitsandbytes weights"),
    "bottleneck": MethodInfo(
        "bottleneck", BottleneckSettings, _bottleneck_config,
        "bottleneck modules (down, non-linearity, up, residual) after each layer's blocks",
        peft_type="BOTTLENECK", library="farm",
        vllm_blocker=_fixed_blocker(f"{_ONLY_LORA}; bottleneck adapters add non-linear modules after each "
                                    "layer's blocks, which vLLM cannot load"),
        not_mergeable="a bottleneck adapter is non-linear (an activation between its "
                                       "projections), so no weight update of the base equals it",
        co_trainable=False, packs_rows=True, plan_fields=_bottleneck_plan),
}

#: ``Literal`` of the method names, for the spec's ``method`` field.
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]


def planner_fields(name: str, settings: StrictModel, shape: "ModelShape") -> dict:
    """``farm.plan.PlanRequest`` fields for a tenant of method ``name`` with ``settings``."""
    return {**method_info(name).plan_fields(settings, shape), "label": name}


def method_info(name: str) -> MethodInfo:
    """Return the registry entry for ``name``; raises ``KeyError`` naming the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown PEFT method {name!r}; known: {', '.join(METHODS)}") from None


def mergeable_methods() -> list[str]:
    """Names of the methods ``farm export merged`` can fold into the base weights."""
    return [name for name, info in METHODS.items() if info.mergeable]


#: The serving backends: vLLM (LoRA adapters it can load) and the farm's transformers backend
#: (``farm serve --backend transformers``), which loads every method the farm trains.
SERVING_BACKENDS = ("vllm", "transformers")


def servable_by(method: str, servable_by_vllm: bool) -> list[str]:
    """The backends that can serve a version of ``method``, preferred first: vLLM when it can
    load the adapter (the registry's verdict at publish), and transformers for every method the
    farm knows."""
    return (["vllm"] if servable_by_vllm else []) + (["transformers"] if method in METHODS else [])


def co_trainable_methods() -> list[str]:
    """Names of the methods whose tenants can share a batch (``farm.train.cotrain``)."""
    return [name for name, info in METHODS.items() if info.co_trainable]


def method_for_config(config: dict, declared: str | None = None) -> MethodInfo:
    """The method of a saved adapter_config.json; ``declared`` (what the trainer says) must agree.

    Without ``declared`` the first matching entry wins (``lora`` before ``qlora``: the saved
    weights of the two are the same kind). Raises ``ValueError`` naming the mismatch.
    """
    peft_type = config.get("peft_type")
    matches = [info for info in METHODS.values()
               if info.peft_type == peft_type and info.recognises(config)]
    if not matches:
        raise ValueError(f"peft_type {peft_type!r} is not a method the farm knows "
                         f"({', '.join(sorted({i.peft_type for i in METHODS.values()}))})")
    if declared is None:
        return matches[0]
    if declared not in METHODS:
        raise ValueError(f"method {declared!r} is not one the farm knows ({', '.join(METHODS)})")
    if METHODS[declared] not in matches:
        raise ValueError(f"method {declared!r} does not match the adapter's config (peft_type "
                         f"{peft_type!r}{', use_dora' if config.get('use_dora') else ''}: "
                         f"{' or '.join(i.name for i in matches)})")
    return METHODS[declared]
