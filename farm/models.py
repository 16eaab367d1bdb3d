"""Base model and tokenizer loading, device and precision choice, PEFT construction.

A base model is named by the operator (a hub id or a local folder), never by a tenant, and
is always loaded with ``trust_remote_code=False`` and safetensors weights only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from farm.methods import method_info
from farm.spec import BaseModelSpec, JobSettings


@dataclass(frozen=True)
class Placement:
    """Where and in which precision a job runs."""

    device: torch.device
    dtype: torch.dtype          # dtype of the frozen base weights
    autocast: torch.dtype | None  # dtype of autocast regions (None: plain fp32)

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"


def select_device(local_rank: int = 0) -> torch.device:
    """The CUDA device of this worker when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def select_placement(precision: str = "auto", device: torch.device | None = None) -> Placement:
    """Pick device and dtypes: bf16 on GPUs that support it when ``auto``, fp32 elsewhere.

    ``bf16`` asked for on a machine without bf16 support is an error, not a silent fp32.
    """
    device = device or select_device()
    has_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not has_bf16:
        raise ValueError(f"precision bf16 needs a GPU with bf16 support; this worker has {device}")
    if precision == "bf16" or (precision == "auto" and has_bf16):
        return Placement(device, torch.bfloat16, torch.bfloat16)
    return Placement(device, torch.float32, None)


def load_tokenizer(base: BaseModelSpec):
    """Load the base model's tokenizer; it must have a chat template and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.name_or_path, revision=base.revision,
                                              trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pads are masked out of loss and attention
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"base model {base.name_or_path!r} has no chat template; chat and alpaca "
                         "data need one (plain text data does not)")
    return tokenizer


def load_base_model(base: BaseModelSpec, placement: Placement, settings: JobSettings | None = None):
    """Load the frozen base model on ``placement`` (safetensors only, no remote code).

    When the job's method quantises the base (QLoRA), the weights are loaded in 4-bit straight
    onto the worker's CUDA device and prepared for k-bit training; such a method on a worker
    without CUDA is an error that says why.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load would drown the sweep's own progress
    info = method_info(settings.method) if settings is not None else None
    if info is not None and info.needs_cuda and placement.device.type != "cuda":
        raise ValueError(f"method {info.name}: {info.needs_cuda}; this worker has {placement.device}")
    quantized = info is not None and info.quantization is not None
    extra = {}
    if quantized:
        extra = {"quantization_config": info.quantization(settings.method_settings()),
                 "device_map": {"": placement.device.index or 0}}  # bitsandbytes quantises on load
    model = AutoModelForCausalLM.from_pretrained(
        base.name_or_path, revision=base.revision, dtype=placement.dtype,
        trust_remote_code=False, use_safetensors=True, **extra,
    )
    model.config.use_cache = False  # training never decodes; a cache also disables packing masks
    if quantized:
        from peft import prepare_model_for_kbit_training

        # Norms and head in fp32, input grads enabled; checkpointing stays the spec's choice.
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})  # as the recipe enables it
    return model.to(placement.device)


def build_peft_model(model, settings: JobSettings, base_model: str):
    """Wrap ``model`` with the adapter of the job's PEFT method (from ``farm.methods``).

    ``base_model`` is the base's name or path (prompt tuning's text initialisation tokenises
    with it).
    """
    from peft import get_peft_model

    info = method_info(settings.method)
    return get_peft_model(model, info.to_peft_config(settings.method_settings(), base_model))


def trainable_state(model) -> dict:
    """The trainable tensors of a PEFT model by parameter name (what a checkpoint holds).

    Method-agnostic and exact: unlike PEFT's saved adapter, it keeps what only training uses
    (for example prefix tuning's projection MLP), so a resumed run continues the same weights.
    """
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def load_trainable_state(model, tensors: dict) -> None:
    """Copy checkpoint ``tensors`` (from ``trainable_state``) into ``model``; every trainable
    parameter must be there with its shape, or the checkpoint belongs to another setup."""
    own = trainable_state(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match this adapter: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (settings changed since it was written?)")
    with torch.no_grad():
        for name, param in own.items():
            if param.shape != tensors[name].shape:
                raise ValueError(f"checkpoint tensor {name}: shape {tuple(tensors[name].shape)}, "
                                 f"adapter has {tuple(param.shape)}")
            param.copy_(tensors[name].to(param.device, param.dtype))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
