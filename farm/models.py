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


def load_base_model(base: BaseModelSpec, placement: Placement):
    """Load the frozen base model on ``placement`` (safetensors only, no remote code)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load would drown the sweep's own progress
    model = AutoModelForCausalLM.from_pretrained(
        base.name_or_path, revision=base.revision, dtype=placement.dtype,
        trust_remote_code=False, use_safetensors=True,
    )
    model.config.use_cache = False  # training never decodes; a cache also disables packing masks
    return model.to(placement.device)


def build_peft_model(model, settings: JobSettings):
    """Wrap ``model`` with the adapter of the job's PEFT method (from ``farm.methods``)."""
    from peft import get_peft_model

    info = method_info(settings.method)
    return get_peft_model(model, info.to_peft_config(settings.method_settings()))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
