"""Base model and tokenizer loading, device and precision choice, PEFT construction.

A base model is named by the operator (a hub id or a local folder), never by a tenant, and
is always loaded with ``trust_remote_code=False`` and safetensors weights only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from farm.methods import method_info
from farm.spec import BaseModelSpec, JobSettings, TenantJob


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


class BaseModelCache:
    """A pool worker's frozen base, loaded once and lent to one tenant at a time.

    ``borrow`` hands out the cached base when it was loaded the same way (same model, revision,
    device and dtype), else loads one; ``give_back`` takes the tenant's PEFT model, removes the
    adapter (PEFT's ``unload`` puts every wrapped layer's original module back; prompt-learning
    methods never touch the base's modules) and keeps the base for the next tenant. A base that
    may not be exactly as loaded is dropped instead, and the next tenant loads a fresh one: a
    4-bit base (``prepare_model_for_kbit_training`` changes norms' dtypes and adds hooks), one
    that ran with gradient checkpointing (PEFT registers an input-grad hook for it), one that was
    sharded (FSDP), one with a trainable parameter left, or one whose parameter names differ
    from the loaded base's.
    """

    def __init__(self):
        self._key: tuple | None = None
        self._model = None
        self._names: list[str] = []
        self.loads = 0  # how many times a base was read from disk (tests and logs)

    def borrow(self, base: BaseModelSpec, placement: Placement, settings: JobSettings):
        key = (base.name_or_path, base.revision, str(placement.device), placement.dtype)
        cached, self._model = self._model, None  # lent out: the cache holds nothing meanwhile
        if cached is not None and self._key == key and method_info(settings.method).quantization is None:
            return cached
        del cached  # a mismatched base goes before the next one loads
        self.loads += 1
        loaded = load_base_model(base, placement, settings)
        self._key, self._names = key, [name for name, _ in loaded.named_parameters()]
        return loaded

    def give_back(self, peft_model, settings: JobSettings) -> None:
        """Take back the base under ``peft_model`` (the tenant is done with it)."""
        info = method_info(settings.method)
        if peft_model is None or info.quantization is not None or settings.train.gradient_checkpointing \
                or settings.train.shard_base == "fsdp":  # FSDP turned its modules into sharded ones
            return
        base = unload_adapter(peft_model)
        pristine = ([name for name, _ in base.named_parameters()] == self._names
                    and not any(p.requires_grad for p in base.parameters()))
        self._model = base if pristine else None


def build_peft_model(model, settings: JobSettings, base_model: str):
    """Wrap ``model`` with the adapter of the job's PEFT method (from ``farm.methods``).

    ``base_model`` is the base's name or path (prompt tuning's text initialisation tokenises
    with it).
    """
    info = method_info(settings.method)
    if info.library == "farm":
        from farm import bottleneck

        return bottleneck.attach(model, settings.method_settings(), base_model)
    from peft import get_peft_model

    return get_peft_model(model, info.to_peft_config(settings.method_settings(), base_model))


def read_adapter(folder: str | Path) -> tuple[dict, dict]:
    """(config, tensors) of the saved adapter in ``folder`` (safetensors only, on the CPU)."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{folder}/adapter_config.json: expected a JSON object")
    return config, load_file(str(folder / "adapter_model.safetensors"))


def attach_saved(base, config: dict, tensors: dict, trainable: bool = False):
    """``base`` with a saved adapter (``read_adapter``'s config and tensors) attached, whichever
    library's it is: the farm's bottleneck adapters (``peft_type`` BOTTLENECK) or PEFT's.

    Loading never runs a tenant's code or reaches the network: a PEFT config is built in
    inference mode (prompt tuning's text initialisation, which would fetch the tokenizer its
    config names, is skipped: the saved embeddings replace it). Raises ``ValueError`` when the
    config or tensors do not fit the base.
    """
    from farm import bottleneck

    farm_own = config.get("peft_type") == bottleneck.PEFT_TYPE
    if farm_own:  # the constructor checks layers and width before it attaches anything
        model = bottleneck.BottleneckModel(base, bottleneck.parse_config(config))
    else:
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

        fields = {k: v for k, v in config.items() if k not in ("auto_mapping", "revision")}
        try:
            peft_config = PeftConfig.from_peft_type(**fields)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"adapter config does not load in PEFT: {exc}") from None
        peft_config.inference_mode = not trainable
        model = get_peft_model(base, peft_config)  # the task's class (PeftModelForCausalLM)
    try:
        if farm_own:
            model.load_adapter_state(tensors)
        else:
            same_tensors(adapter_state_dict(model), tensors, "adapter")
            set_peft_model_state_dict(model, tensors)
    except Exception:
        unload_adapter(model)  # a base lent to many adapters never keeps a broken one attached
        raise
    if not trainable:
        for param in model.parameters():
            param.requires_grad_(False)
    return model


def load_adapter(base, folder: str | Path, trainable: bool = False):
    """``base`` with the saved adapter in ``folder`` attached (``attach_saved``)."""
    config, tensors = read_adapter(folder)
    return attach_saved(base, config, tensors, trainable=trainable)


def unload_adapter(model):
    """Take the adapter off ``model`` (from ``build_peft_model`` or ``load_adapter``); returns the
    base as it was: PEFT's ``unload`` puts every wrapped module back, prompt learning never
    touched the base's modules, bottleneck adapters remove their hooks and modules."""
    config = getattr(model, "peft_config", None)
    if config is not None and config[model.active_adapter].is_prompt_learning:
        return model.get_base_model()
    if config is not None:
        return model.base_model.unload()
    return model.unload()


def adapter_state_dict(model, adapter_name: str = "default") -> dict:
    """The adapter's tensors as they are saved (PEFT's names, or the bottleneck's)."""
    if hasattr(model, "adapter_state"):
        return model.adapter_state()
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def set_adapter_state_dict(model, tensors: dict, adapter_name: str = "default") -> None:
    """Load saved adapter tensors (``adapter_state_dict``'s names) into ``model``."""
    if hasattr(model, "load_adapter_state"):
        model.load_adapter_state(tensors)
        return
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)


def full_tensor(value):
    """A whole tensor: a sharded one (a DTensor of FSDP) gathered from every worker, which is a
    collective (every worker must call it, in the same order); any other as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def trainable_state(model) -> dict:
    """The trainable tensors of a PEFT model by parameter name (what a checkpoint holds), whole
    even when the model is sharded (then every worker must call it: it gathers).

    Method-agnostic and exact: unlike PEFT's saved adapter, it keeps what only training uses
    (for example prefix tuning's projection MLP), so a resumed run continues the same weights.
    """
    return {name: full_tensor(param) for name, param in model.named_parameters() if param.requires_grad}


def load_trainable_state(model, tensors: dict) -> None:
    """Copy checkpoint ``tensors`` (from ``trainable_state``) into ``model``; every trainable
    parameter must be there with its shape, or the checkpoint belongs to another setup."""
    own = {name: param for name, param in model.named_parameters() if param.requires_grad}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match this adapter: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (settings changed since it was written?)")
    with torch.no_grad():
        for name, param in own.items():
            if param.shape != tensors[name].shape:
                raise ValueError(f"checkpoint tensor {name}: shape {tuple(tensors[name].shape)}, "
                                 f"adapter has {tuple(param.shape)}")
            param.copy_(as_sharded_like(tensors[name].to(param.device, param.dtype), param))


def warm_start(model, job: TenantJob, adapter_name: str = "default") -> None:
    """Load the adapter files ``job.init_adapter`` holds (a folder or storage URI, staged by the
    sweep for ``train.init_from``) into ``model``'s adapter ``adapter_name``; nothing when the
    job has none. The files must hold exactly this adapter's tensors with its shapes, else
    ``ValueError`` naming the first difference (settings changed since that version)."""
    if not job.init_adapter:
        return
    from safetensors.torch import load as load_safetensors

    from farm.train.ray_support import storage_fs

    fs, root = storage_fs(job.init_adapter.rstrip("/"))
    with fs.open_input_stream(f"{root}/adapter_model.safetensors") as stream:
        tensors = load_safetensors(stream.read())
    same_tensors(adapter_state_dict(model, adapter_name=adapter_name), tensors,
                 f"train.init_from: {job.init_version}")
    set_adapter_state_dict(model, tensors, adapter_name=adapter_name)


def same_tensors(own: dict, tensors: dict, what: str) -> None:
    """``tensors`` hold exactly ``own``'s names with their shapes, else ``ValueError`` naming
    ``what`` and the first difference (an adapter of other settings, or another base)."""
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{what} does not match this adapter: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, value in own.items():
        if tuple(value.shape) != tuple(tensors[name].shape):
            raise ValueError(f"{what}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                             f"this adapter {tuple(value.shape)}")


def as_sharded_like(value, param):
    """``value`` (a whole tensor of ``param``'s shape) sharded as ``param`` is when ``param`` is
    a DTensor (FSDP); else ``value``. Every worker holds the whole value (from a checkpoint)."""
    if not hasattr(param, "device_mesh") or tuple(value.shape) != tuple(param.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, param.device_mesh, param.placements)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
