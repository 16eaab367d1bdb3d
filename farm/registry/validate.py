"""What the registry accepts at publish: safetensors weights, a sane adapter_config.json.

Refused outright: any pickle-based weight file (``.bin``, ``.pt``, ``.pth``, ``.pkl``,
``.ckpt``, ...), any file that is not part of a PEFT adapter, a safetensors file whose header
does not parse, an ``adapter_config.json`` that is not a JSON object with the keys PEFT
writes, files over the size limit. Recorded, not refused: whether vLLM can serve the adapter
(``servable_by_vllm`` with the reason when it cannot); methods vLLM cannot serve are still
first-class versions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from typing import Annotated, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from farm.methods import method_for_config

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
OPTIONAL_FILES = frozenset({"README.md"})
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})
DEFAULT_MAX_FILE_BYTES = 4 * 2**30


class PublishError(ValueError):
    """An adapter the registry refuses, with the file or field and the reason."""


class RecordedSettings(BaseModel):
    """The adapter_config.json fields a version records, parsed into their types.

    Strict: ``"r": 1.5``, ``"r": "eight"`` or ``"r": [1, 2]`` is refused at publish naming the
    field, instead of reaching the catalog and breaking every later listing.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    peft_type: str = Field(max_length=64)
    task_type: Optional[str] = Field(None, max_length=64)
    r: Optional[int] = Field(None, ge=1, le=65536)
    lora_alpha: Optional[float] = None
    lora_dropout: Optional[float] = Field(None, ge=0, le=1)
    target_modules: Union[str, list[Annotated[str, Field(max_length=500)]], None] = Field(None, max_length=4096)
    bias: Optional[str] = Field(None, max_length=32)
    use_dora: Optional[bool] = None
    num_virtual_tokens: Optional[int] = Field(None, ge=1, le=65536)
    feedforward_modules: Union[str, list[Annotated[str, Field(max_length=500)]], None] = Field(None, max_length=4096)
    prefix_projection: Optional[bool] = None
    encoder_hidden_size: Optional[int] = Field(None, ge=1, le=2**31 - 1)
    prompt_tuning_init: Optional[str] = Field(None, max_length=64)
    placement: Optional[str] = Field(None, max_length=16)
    bottleneck_size: Optional[int] = Field(None, ge=1, le=65536)
    non_linearity: Optional[str] = Field(None, max_length=16)

    @field_validator("lora_alpha", "lora_dropout", mode="before")
    @classmethod
    def _number(cls, value):
        if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
            raise ValueError("must be a number")
        return None if value is None else float(value)


@dataclass(frozen=True)
class AdapterCheck:
    """What validation found out about an adapter folder."""

    config: dict
    peft_type: str
    method: str
    servable_by_vllm: bool
    not_servable_reason: str | None
    settings: dict  # the RecordedSettings fields the config gave, checked


def validate_files(files: dict[str, int], max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
    """Check file names and sizes (``name -> size``) before reading any content."""
    for name, size in files.items():
        suffix = Path(name).suffix.lower()
        if "/" in name or "\\" in name or name.startswith(".") or any(ord(c) < 32 for c in name):
            raise PublishError(f"{name!r}: file names must be plain names, no folders")
        if suffix in PICKLE_SUFFIXES:
            raise PublishError(f"{name}: pickle-based weight files are refused (they can run code "
                               f"on load); save the adapter with safetensors")
        if name not in (CONFIG_FILE, WEIGHTS_FILE) and name not in OPTIONAL_FILES:
            raise PublishError(f"{name}: not part of a PEFT adapter (expected {CONFIG_FILE}, "
                               f"{WEIGHTS_FILE}, optionally {', '.join(sorted(OPTIONAL_FILES))})")
        if size > max_file_bytes:
            raise PublishError(f"{name}: {size} bytes, over the limit of {max_file_bytes}")
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in files:
            raise PublishError(f"{required}: missing")


def folder_files(folder: Path) -> dict[str, Path]:
    """``name -> path`` of an adapter folder's files; anything but a regular file is refused.

    A symlink (``README.md -> /etc/passwd``) would otherwise copy whatever it points at into
    a version its tenant can download; a folder, socket or device has no place in an adapter.
    """
    import stat

    if not folder.is_dir():
        raise PublishError(f"{folder}: not a folder")
    files = {}
    for path in sorted(folder.iterdir()):
        mode = path.lstat().st_mode  # lstat: the entry itself, never what a link points at
        if stat.S_ISLNK(mode):
            raise PublishError(f"{path.name}: a symbolic link; publish the file itself")
        if not stat.S_ISREG(mode):
            raise PublishError(f"{path.name}: not a regular file")
        files[path.name] = path
    return files


def check_metadata(base_model: str, metrics: dict, lineage: dict) -> None:
    """Types and lengths of what is indexed next to a version (catalog column limits)."""
    import math

    if not isinstance(base_model, str) or not 0 < len(base_model) <= 500 or "\x00" in base_model:
        raise PublishError("base_model: a non-empty string of at most 500 characters")
    for name, value in metrics.items():
        if not isinstance(name, str) or not 0 < len(name) <= 100:
            raise PublishError(f"metrics: name {name!r} must be a string of 1-100 characters")
        if isinstance(value, bool) or not isinstance(value, (int, float, str, type(None))):
            raise PublishError(f"metrics.{name}: expected a number, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise PublishError(f"metrics.{name}: must be finite, got {value}")
    limits = {"sweep_id": 200, "dataset_fingerprint": 64}
    for key, limit in limits.items():
        value = lineage.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            raise PublishError(f"lineage.{key}: expected a string of at most {limit} characters")


def check_config(raw: bytes, base_model: str, base_architecture: str | None,
                 method: str | None = None) -> AdapterCheck:
    """Schema-check adapter_config.json, settle its method and decide vLLM servability.

    ``method`` is what the trainer declares (``qlora`` saves the same kind of weights as
    ``lora``, so only the trainer can say); it must agree with the config.
    """
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublishError(f"{CONFIG_FILE}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PublishError(f"{CONFIG_FILE}: expected a JSON object")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise PublishError(f"{CONFIG_FILE}: field 'peft_type' must be a string")
    if config.get("auto_map"):
        raise PublishError(f"{CONFIG_FILE}: 'auto_map' points at custom code, which is refused")
    mapping = config.get("auto_mapping") or {}
    library = mapping.get("parent_library", "transformers.") if isinstance(mapping, dict) else None
    if not isinstance(library, str) or not library.startswith("transformers."):
        # PEFT imports this module when loading with AutoPeftModel: only transformers' own.
        raise PublishError(f"{CONFIG_FILE}: 'auto_mapping' names {library!r}; only transformers classes are accepted")
    try:
        info = method_for_config(config, method)
    except ValueError as exc:
        raise PublishError(f"{CONFIG_FILE}: {exc}") from None
    if peft_type == "LORA":
        rank = config.get("r")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 65536:
            raise PublishError(f"{CONFIG_FILE}: field 'r' must be an integer in 1..65536, got {rank!r}")
        targets = config.get("target_modules")
        if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise PublishError(f"{CONFIG_FILE}: field 'target_modules' must be a list of names")
    if peft_type in ("PREFIX_TUNING", "PROMPT_TUNING"):
        tokens = config.get("num_virtual_tokens")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= 65536:
            raise PublishError(f"{CONFIG_FILE}: field 'num_virtual_tokens' must be an integer in 1..65536, got {tokens!r}")
    if peft_type == "BOTTLENECK":  # the farm's own format: every field typed, nothing unknown
        from farm.bottleneck import parse_config

        try:
            parse_config(config)
        except ValueError as exc:
            raise PublishError(f"{CONFIG_FILE}: {exc}") from None
    try:
        recorded = RecordedSettings.model_validate(config)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PublishError(f"{CONFIG_FILE}: field '{where}': {first['msg']}") from None
    settings = {key: config[key] for key in recorded.model_fields_set}  # as written, now known sound
    if peft_type != "LORA":
        settings.pop("r", None)  # a rank only means something to LoRA-family adapters
    reason = info.vllm_blocker(config, base_architecture)
    declared = config.get("base_model_name_or_path")
    if reason is None and declared != base_model:
        reason = (f"adapter_config base_model_name_or_path {declared!r} differs from the base model "
                  f"{base_model!r} the server is started with")
    return AdapterCheck(config=config, peft_type=peft_type, method=info.name,
                        servable_by_vllm=reason is None, not_servable_reason=reason, settings=settings)


class FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=2**62)


class Manifest(BaseModel):
    """A version's manifest, parsed: what publish writes and what reindex accepts.

    Every field that reaches the catalog is typed and bounded here, so a manifest that parses
    can be indexed; one that does not is skipped by reindex with the reason, never indexed.
    """

    model_config = ConfigDict(extra="allow")

    schema_: int = Field(1, alias="schema")
    tenant: str
    adapter: str
    version: int = Field(ge=1, le=999_999_999)
    serve_name: str
    created_at: str
    base_model: str = Field(min_length=1, max_length=500)
    base_architecture: Optional[str] = Field(None, max_length=200)
    method: str = Field(max_length=32)
    method_settings: RecordedSettings
    servable_by_vllm: bool
    not_servable_reason: Optional[str] = None
    metrics: dict[str, Union[float, int, str, None]] = Field(default_factory=dict)
    training: dict = Field(default_factory=dict)
    lineage: dict = Field(default_factory=dict)
    files: dict[str, FileRecord]

    @field_validator("created_at")
    @classmethod
    def _iso(cls, value: str) -> str:
        from datetime import datetime

        datetime.fromisoformat(value)
        return value


def parse_manifest(raw: dict, tenant: str, adapter: str, version: int) -> Manifest:
    """``Manifest`` of the version stored at (tenant, adapter, version); ``PublishError`` otherwise."""
    import math

    from farm.registry.names import check_name, serve_name

    try:
        manifest = Manifest.model_validate(raw)
        check_name("tenant", manifest.tenant)
        check_name("adapter", manifest.adapter)
    except (ValidationError, ValueError) as exc:
        raise PublishError(f"manifest: {_first_error(exc)}") from None
    if (manifest.tenant, manifest.adapter, manifest.version) != (tenant, adapter, version) or \
            manifest.serve_name != serve_name(tenant, adapter, version):
        raise PublishError(f"manifest names {manifest.serve_name!r}, but it is stored as "
                           f"{serve_name(tenant, adapter, version)!r}")
    for name, value in manifest.metrics.items():
        if len(name) > 100 or (isinstance(value, float) and not math.isfinite(value)):
            raise PublishError(f"manifest: metrics.{name[:100]}: a finite number with a name of at most 100 characters")
    check_metadata(manifest.base_model, {}, manifest.lineage)
    return manifest


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(exc)
