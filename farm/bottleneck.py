"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020), implemented by the farm.

A bottleneck adapter is a small module after a block of each decoder layer::

    y = x + up(dropout(act(down(x))))          down: hidden -> size, up: size -> hidden

placed after the attention block and the MLP (``houlsby``) or after the MLP only
(``pfeiffer``). Initialised near the identity (``up`` starts at zero or tiny), the untrained
adapter leaves the base's outputs (nearly) as they are.

Why the farm's own and not a library's: PEFT 0.21 has no bottleneck tuner and cannot register
one outside its ``PeftType`` enum; AdapterHub's ``adapters`` pins a transformers release the
serving stack cannot use. The implementation is small and keeps the shape of a PEFT adapter
where the farm relies on it: the saved adapter is ``adapter_config.json`` (``peft_type``
``BOTTLENECK``, validated by ``BottleneckConfig``) plus ``adapter_model.safetensors``; the
wrapped model answers the few ``PeftModel`` calls the farm makes (``save_pretrained``,
``get_base_model``, ``unload``, ``generate``, ``gradient_checkpointing_enable``), and
``farm.models.attach_saved`` loads a saved one, as it loads PEFT's.

The modules are registered as children of the blocks they follow (``<layer>.mlp.farm_bottleneck``)
and applied by forward hooks on those blocks, so the base's own modules are never replaced:
``unload`` removes the hooks and the children and hands back the base exactly as it was, and
FSDP, which shards per decoder layer, shards each adapter with its layer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

PEFT_TYPE = "BOTTLENECK"
#: name of the adapter module inside the block it follows
CHILD = "farm_bottleneck"
BLOCKS = {"houlsby": ("self_attn", "mlp"), "pfeiffer": ("mlp",)}
ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}
#: a saved tensor's name: <path of the decoder layer>.<block>.farm_bottleneck.<down|up>.<weight|bias>
TENSOR_NAME = re.compile(rf"^(?P<layer>[A-Za-z0-9_.]+?)\.(?P<block>self_attn|mlp)\.{CHILD}\."
                         r"(?P<part>down|up)\.(?P<kind>weight|bias)$")


class BottleneckConfig(BaseModel):
    """A saved bottleneck adapter's ``adapter_config.json``, parsed strictly (it may come from a
    tenant: every field is typed and bounded, unknown ones are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    peft_type: Literal["BOTTLENECK"] = PEFT_TYPE
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    library: Literal["farm"] = "farm"
    base_model_name_or_path: Optional[str] = Field(None, max_length=500)
    placement: Literal["houlsby", "pfeiffer"]
    hidden_size: int = Field(ge=1, le=65536)
    bottleneck_size: int = Field(ge=1, le=65536)
    non_linearity: Literal["relu", "gelu", "silu", "tanh"]
    dropout: float = Field(0.0, ge=0, lt=1)
    num_layers: int = Field(ge=1, le=1024)

    def blocks(self) -> tuple[str, ...]:
        """The blocks of each decoder layer an adapter follows."""
        return BLOCKS[self.placement]

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """``<block>.<part>.<kind>`` -> shape, for one layer."""
        h, s = self.hidden_size, self.bottleneck_size
        shapes = {}
        for block in self.blocks():
            shapes.update({f"{block}.down.weight": (s, h), f"{block}.down.bias": (s,),
                           f"{block}.up.weight": (h, s), f"{block}.up.bias": (h,)})
        return shapes


class Bottleneck(torch.nn.Module):
    """One adapter: ``x + up(dropout(act(down(x))))``; its weights keep their own dtype (fp32
    on a bf16 base, as PEFT keeps adapters), and the output is cast back to the input's."""

    def __init__(self, hidden: int, size: int, non_linearity: str, dropout: float):
        super().__init__()
        self.down = torch.nn.Linear(hidden, size)
        self.act = ACTIVATIONS[non_linearity]()
        self.dropout = torch.nn.Dropout(dropout)
        self.up = torch.nn.Linear(size, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.dropout(self.act(self.down(x.to(self.down.weight.dtype)))))
        return x + h.to(x.dtype)


def decoder_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) of the base's decoder layers, in order; each must have the blocks
    ``self_attn`` and ``mlp`` (Llama, Mistral, Qwen and most causal LMs do)."""
    layers = [(name, m) for name, m in model.named_modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"bottleneck adapters: no decoder layers found in {type(model).__name__}")
    for name, layer in layers:
        if not all(isinstance(getattr(layer, block, None), torch.nn.Module) for block in BLOCKS["houlsby"]):
            raise ValueError(f"bottleneck adapters: decoder layer {name} ({type(layer).__name__}) has no "
                             "self_attn and mlp blocks")
    return layers


def _after_block(module, args, output):
    # The attention block returns (output, weights); the MLP a tensor.
    adapter = getattr(module, CHILD)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


class BottleneckModel(torch.nn.Module):
    """A base causal LM with bottleneck adapters attached (see the module docstring)."""

    def __init__(self, base, config: BottleneckConfig, init: str = "near_identity", init_std: float = 1e-2):
        super().__init__()
        self.base = base
        self.config = config
        self._hooks = []
        layers = decoder_layers(base)
        if len(layers) != config.num_layers:
            raise ValueError(f"bottleneck adapter has {config.num_layers} layers, the base {len(layers)}")
        hidden = getattr(base.config, "hidden_size", None)
        if hidden != config.hidden_size:
            raise ValueError(f"bottleneck adapter has hidden size {config.hidden_size}, the base {hidden}")
        device = next(base.parameters()).device
        for _, layer in layers:
            for block_name in config.blocks():
                block = getattr(layer, block_name)
                adapter = Bottleneck(config.hidden_size, config.bottleneck_size, config.non_linearity,
                                     config.dropout).to(device)
                with torch.no_grad():  # near the identity: the untrained adapter barely changes the base
                    torch.nn.init.normal_(adapter.down.weight, std=init_std)
                    torch.nn.init.zeros_(adapter.down.bias)
                    if init == "identity":
                        torch.nn.init.zeros_(adapter.up.weight)
                    else:
                        torch.nn.init.normal_(adapter.up.weight, std=init_std)
                    torch.nn.init.zeros_(adapter.up.bias)
                block.add_module(CHILD, adapter)
                self._hooks.append(block.register_forward_hook(_after_block))
        for name, param in base.named_parameters():
            param.requires_grad_(f".{CHILD}." in name)

    # -- what the farm calls on a PEFT model -----------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base.generate(*args, **kwargs)

    def get_base_model(self):
        """The base model (with the adapters attached while this model holds them)."""
        return self.base

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.base.gradient_checkpointing_enable(**kwargs)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors by their saved names (paths in the base model)."""
        return {name: value for name, value in self.base.state_dict().items() if f".{CHILD}." in name}

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors in; exactly this adapter's names and shapes, else ``ValueError``."""
        from farm.models import same_tensors

        own = self.adapter_state()
        same_tensors(own, tensors, "bottleneck adapter")
        with torch.no_grad():
            for name, value in own.items():
                value.copy_(tensors[name].to(value.device, value.dtype))

    def save_pretrained(self, folder: str, safe_serialization: bool = True, state_dict: dict | None = None,
                        **_ignored) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``;
        ``state_dict``: whole tensors to save instead of the model's own (sharded) ones."""
        from safetensors.torch import save_file

        if not safe_serialization:
            raise ValueError("bottleneck adapters are saved as safetensors only")
        source = state_dict if state_dict is not None else self.adapter_state()
        tensors = {}
        for name, value in source.items():
            if f".{CHILD}." not in name:
                continue
            # trainable_state names parameters from the wrapper ("base.<path>"); saved names are the base's.
            key = name[len("base."):] if name.startswith("base.") else name
            tensors[key] = value.detach().to("cpu").contiguous()
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text(self.config.model_dump_json(indent=2) + "\n")
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})

    def unload(self):
        """Remove the adapters; returns the base exactly as it was before they were attached."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for _, layer in decoder_layers(self.base):
            for block_name in self.config.blocks():
                block = getattr(layer, block_name)
                if hasattr(block, CHILD):
                    delattr(block, CHILD)
        return self.base


def attach(base, settings, base_model: str) -> BottleneckModel:
    """Attach freshly initialised adapters of the farm's ``BottleneckSettings`` to ``base``."""
    hidden = base.config.hidden_size
    config = BottleneckConfig(base_model_name_or_path=base_model, placement=settings.placement, hidden_size=hidden,
                              bottleneck_size=settings.size_for(hidden), non_linearity=settings.non_linearity,
                              dropout=settings.dropout, num_layers=len(decoder_layers(base)))
    return BottleneckModel(base, config, init=settings.init, init_std=settings.init_std)


def parse_config(raw: dict) -> BottleneckConfig:
    """``BottleneckConfig`` of a saved config; ``ValueError`` naming the first bad field."""
    from pydantic import ValidationError

    try:
        return BottleneckConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"field '{'.'.join(str(p) for p in first['loc'])}': {first['msg']}") from None


def check_tensor_names(config: BottleneckConfig, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why saved tensors ``name -> shape`` are not exactly ``config``'s adapter, or None."""
    expected = config.tensor_shapes()
    layers: dict[str, set[str]] = {}
    for name, shape in shapes.items():
        match = TENSOR_NAME.match(name)
        if match is None:
            return f"{name}: not a bottleneck adapter tensor (<layer>.<self_attn|mlp>.{CHILD}.<down|up>.<weight|bias>)"
        key = f"{match['block']}.{match['part']}.{match['kind']}"
        if key not in expected:
            return f"{name}: placement {config.placement!r} has no adapter after {match['block']}"
        if tuple(shape) != expected[key]:
            return f"{name}: shape {tuple(shape)}, the config says {expected[key]}"
        layers.setdefault(match["layer"], set()).add(key)
    if len(layers) != config.num_layers:
        return f"tensors for {len(layers)} layers, the config says {config.num_layers}"
    for layer, keys in sorted(layers.items()):
        if keys != set(expected):
            return f"layer {layer}: missing {sorted(set(expected) - keys)[:2]}"
    return None
