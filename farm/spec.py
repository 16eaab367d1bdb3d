"""The sweep spec: one typed, validated description of what a sweep trains.

A spec is a YAML file (see ``jobs/configs/demo.yaml``)::

    name: demo
    base_model: {name_or_path: ../../.farm/base-model}
    output_dir: ../../.farm/runs
    defaults:                      # settings every tenant starts from
      method: lora
      lora: {rank: 8, target_modules: all-linear}
      train: {max_steps: 60, learning_rate: 3.0e-3}
      data: {max_seq_len: 256}
    tenants:
      - name: acme
        data: {path: ../data/acme.jsonl}
      - name: initech
        data: {path: ../data/initech.jsonl, format: alpaca}
        lora: {rank: 16}           # per-tenant override, merged over the defaults

Every tenant's settings are the defaults deep-merged with its own keys, then validated as a
whole. Unknown or mistyped keys are rejected with their path (``tenants[2].lora.rank: expected
int``); all problems of a spec are reported at once. Relative paths are relative to the spec
file, so a spec works from any current directory (and under ``ray job submit``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from farm.methods import METHODS, MethodName, StrictModel, method_info
from farm.jsonwords import kind, shown

#: Tenant (and later adapter) names: lower-case, digits, '-' and '_'; they become path parts
#: and serve names, so nothing that could traverse or confuse a path is allowed.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # always applied with fullmatch


class SpecError(ValueError):
    """A spec that cannot be used; ``problems`` lists every ``path: reason`` found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid sweep spec\n" + "\n".join(f"  - {p}" for p in problems))


class DataSpec(StrictModel):
    """Where a tenant's data is and how it becomes training rows."""

    path: Optional[str] = Field(None, description="a file (JSON Lines, JSON array, CSV/TSV, Parquet; text shapes may be .gz/.bz2/.zst), a folder or glob of such files, or a saved `datasets` folder; local path or URI (s3://...)")
    format: Literal["auto", "chat", "sharegpt", "alpaca", "completion", "text"] = Field("auto", description="record schema; auto detects it from the first record")
    encoding: Optional[str] = Field(None, description="text encoding of the files (for example cp1252); null: UTF-8, with or without a byte-order mark")
    split: str = Field("train", min_length=1, description="the split to read from a saved DatasetDict")
    max_record_mb: int = Field(16, ge=1, le=1024, description="largest single record (a line, row or item) read, in MiB; a larger one is a bad record")
    max_seq_len: int = Field(512, ge=8, le=131072, description="tokens per training row")
    packing: bool = Field(True, description="pack several examples into each row (no cross-example attention); prefix and prompt tuning always train one example per row")
    train_on: Literal["completions", "all"] = Field("completions", description="which tokens carry loss: assistant answers only, or everything")
    on_bad_record: Literal["error", "skip"] = Field("error", description="stop at the first bad record, or skip and report bad records")
    too_long: Literal["truncate", "drop", "error"] = Field("truncate", description="what to do with an example longer than max_seq_len")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of examples held out for eval")
    eval_path: Optional[str] = Field(None, description="held-out examples from this dataset (same shapes as path) instead of eval_fraction of path; null: split path")
    split_seed: int = Field(0, description="seed of the deterministic train/eval split")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            import codecs

            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown text encoding {value!r} (Python codec names: utf-8, cp1252, latin-1, utf-16, ...)") from None
        return value


class TrainSpec(StrictModel):
    """Optimisation settings of one tenant's training."""

    max_steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="rows per micro-batch (per worker)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="max gradient norm; null disables clipping")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    shard_base: Literal["auto", "none", "fsdp"] = Field("auto", description="fsdp: shard the frozen base and the adapter across the tenant's workers (PyTorch FSDP2), for a base one device cannot hold; none: every worker holds the whole base (data parallel); auto: the sweep's planner shards over the fewest GPUs that hold it when one device cannot, else none")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPUs that support it, fp32 elsewhere")
    seed: int = Field(0, description="seed for adapter init, dropout and data order")
    eval_every: Optional[int] = Field(None, ge=1, description="steps between eval passes; null: only before and after")
    early_stop_patience: Optional[int] = Field(None, ge=1, description="stop after this many eval passes without improvement (needs eval_every); null: never")
    early_stop_min_delta: float = Field(0.0, ge=0, description="how much lower an eval loss must be to count as an improvement")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep")
    log_every: int = Field(10, ge=1, description="steps between progress lines")
    init_from: Optional[str] = Field(None, description="warm start (farm sweep): begin from the weights of the version this alias of the tenant's own adapter names (production, latest, ...), when it exists and was trained with the same method settings; null: fresh init")

    @field_validator("init_from")
    @classmethod
    def _valid_init_alias(cls, value: str | None) -> str | None:
        if value is not None and not NAME_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not an alias name (pattern {NAME_PATTERN.pattern})")
        return value

    @model_validator(mode="after")
    def _early_stop_needs_eval(self):
        if self.early_stop_patience is not None and self.eval_every is None:
            raise ValueError("early_stop_patience needs eval_every (early stopping watches the periodic eval loss)")
        return self


CHECK_KINDS = ("starts_with", "ends_with", "regex", "upper_case", "max_words", "json_schema")


class BehaviourCheck(StrictModel):
    """One behaviour check on a greedy generation: exactly one kind of test.

    Applied to the answer an adapter generates for each held-out prompt (for a plain-text
    tenant: the whole generated document). ``starts_with``/``ends_with`` compare after trimming
    white space; ``regex`` must match somewhere (anchor it with ``^``/``$`` for a full match; it
    runs under a time limit); ``upper_case`` wants letters and none in lower case; ``max_words``
    counts white-space separated words; ``json_schema`` wants the answer to be JSON valid
    against the schema.
    """

    name: Optional[str] = Field(None, max_length=80, description="label in reports and lineage; default: the check itself")
    starts_with: Optional[str] = Field(None, min_length=1, max_length=500, description="the answer starts with this text")
    ends_with: Optional[str] = Field(None, min_length=1, max_length=500, description="the answer ends with this text")
    regex: Optional[str] = Field(None, min_length=1, max_length=500, description="a regular expression found in the answer")
    upper_case: Optional[bool] = Field(None, description="true: the answer has letters, none lower case")
    max_words: Optional[int] = Field(None, ge=1, le=10_000, description="the answer has at most this many words")
    json_schema: Optional[dict[str, Any]] = Field(None, description="the answer is JSON valid against this schema")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [kind for kind in CHECK_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"a check has exactly one of {', '.join(CHECK_KINDS)}; got "
                             f"{', '.join(given) if given else 'none'}")
        if self.regex is not None:
            import regex

            try:
                regex.compile(self.regex)
            except regex.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from None
        if self.json_schema is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(self.json_schema).check_schema(self.json_schema)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"json_schema is not a valid JSON Schema: {exc.message}") from None
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in CHECK_KINDS if getattr(self, kind) is not None)

    @property
    def label(self) -> str:
        """How reports and lineage name this check."""
        if self.name:
            return self.name
        value = getattr(self, self.kind)
        return self.kind if isinstance(value, (bool, dict)) else f"{self.kind} {value!r}"

    def passes(self, text: str) -> bool:
        """Whether ``text`` (one generated answer) passes this check."""
        kind, value = self.kind, getattr(self, self.kind)
        if kind == "starts_with":
            return text.strip().startswith(value.strip())
        if kind == "ends_with":
            return text.strip().endswith(value.strip())
        if kind == "regex":
            import regex

            try:  # a pattern that backtracks for too long fails the answer instead of hanging the eval
                return regex.search(value, text, timeout=1.0) is not None
            except TimeoutError:
                return False
        if kind == "upper_case":
            letters = [c for c in text if c.isalpha()]
            return bool(letters) and all(not c.islower() for c in letters) == value
        if kind == "max_words":
            return len(text.split()) <= value
        import json

        import jsonschema

        try:
            jsonschema.validate(json.loads(text), value)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True


class PromotionSpec(StrictModel):
    """When a newly published version may take an alias (eval-gated promotion)."""

    alias: str = Field("production", description="the alias the gate guards")
    min_improvement: float = Field(0.0, ge=0, lt=1, description="the new version's eval loss must be lower than the alias's current version's by at least this share (0.02: 2%), both measured on the new version's held-out data; 0: not worse")
    min_pass_rate: float = Field(0.9, ge=0, le=1, description="every behaviour check must pass on at least this share of held-out prompts")

    @field_validator("alias")
    @classmethod
    def _valid_alias(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value) or value == "latest":
            raise ValueError(f"{value!r} is not an alias a gate can guard (pattern {NAME_PATTERN.pattern}; "
                             "'latest' always follows the newest version)")
        return value


class EvalSpec(StrictModel):
    """Quality evals of a tenant's adapter after training, and the gate for promoting it."""

    checks: list[BehaviourCheck] = Field(default_factory=list, max_length=50, description="behaviour checks on greedy generations for held-out prompts, each reported as the base's and the adapter's pass rate")
    prompts: int = Field(32, ge=1, le=1000, description="held-out prompts the checks run on (the first of the eval split)")
    max_new_tokens: int = Field(64, ge=1, le=1024, description="longest greedy generation per prompt")
    engine: Literal["auto", "vllm", "transformers"] = Field("auto", description="what generates the answers the checks judge: vllm (the serving engine; LoRA adapters it can load), transformers (+ PEFT, every method), auto (vllm on CUDA nodes where it can serve the adapter, transformers otherwise)")
    promote: Optional[PromotionSpec] = Field(None, description="move an alias to the new version only when it passes this gate; null: no gated alias")


class _JobSettingsFields(StrictModel):
    """Everything that can differ from one tenant to another: method, its settings, training, data.

    Each method of ``farm.methods.METHODS`` adds one field of its settings class, named after
    it (``lora``, ``ia3``, ...); see ``JobSettings`` below.
    """

    method: MethodName = Field("lora", description=f"PEFT method: {', '.join(METHODS)} (see farm/methods.py)")
    train: TrainSpec = Field(default_factory=TrainSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    def method_settings(self) -> StrictModel:
        """The settings object of the chosen method (for example ``self.lora``)."""
        return getattr(self, method_info(self.method).name)

    @model_validator(mode="wrap")
    @classmethod
    def _unpacked_rows_for_prompt_methods(cls, value, handler):
        # PEFT drops or shifts position ids for prompt-learning methods, so packed examples
        # would attend to each other: those methods train on one example per row.
        settings = handler(value)
        info = method_info(settings.method)
        if settings.train.shard_base == "fsdp" and info.no_sharded_base:
            raise ValueError(f"method {info.name} cannot train with train.shard_base: {settings.train.shard_base}: "
                             f"{info.no_sharded_base}")
        if settings.train.gradient_checkpointing and info.no_gradient_checkpointing:
            raise ValueError(f"method {info.name} cannot train with train.gradient_checkpointing: "
                             f"{info.no_gradient_checkpointing}; set it to false")
        if settings.data.packing and not info.packs_rows:
            settings = settings.model_copy(update={"data": settings.data.model_copy(update={"packing": False})})
        return settings


JobSettings = create_model(
    "JobSettings", __base__=_JobSettingsFields, __module__=__name__, __doc__=_JobSettingsFields.__doc__,
    **{name: (info.settings, Field(default_factory=info.settings, description=f"settings of method {name}"))
       for name, info in METHODS.items()})


class BaseModelSpec(StrictModel):
    """The shared base model: a hub id or a local folder, chosen by the operator."""

    name_or_path: str = Field(..., description="hub model id or local folder")
    revision: Optional[str] = Field(None, description="hub revision (ignored for local folders)")


class ResourceSpec(StrictModel):
    """What one tenant's trainer asks Ray for."""

    @field_validator("gpus_per_worker")
    @classmethod
    def _non_negative(cls, value):
        if value != "auto" and value < 0:
            raise ValueError("must be 0 or more, or auto")
        return value

    workers: int = Field(1, ge=1, description="data-parallel workers per tenant")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker (fractions allowed)")
    gpus_per_worker: Union[float, Literal["auto"]] = Field(0.0, description="GPUs per worker; fractions pack small jobs on one device; auto: the planner packs as many LoRA jobs per GPU as fit (0 on CPU clusters)")
    device_memory_gb: Optional[float] = Field(None, gt=0, description="memory of one GPU, for the planner; null: probed on a GPU node")
    memory_per_worker: Optional[int] = Field(None, gt=0, description="bytes of Ray's memory resource each worker reserves; null: the planner's estimate on CPU clusters")
    accelerator_type: Optional[str] = Field(None, description="Ray accelerator type, for example A100")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="collective backend; auto: NCCL when workers have GPUs, gloo otherwise")
    packing: Literal["auto", "off"] = Field("auto", description="auto: co-train small LoRA tenants in packs on one base per worker (the planner sizes the packs); off: every tenant trains alone, in single-tenant pools")
    request_up_front: bool = Field(True, description="show the autoscaler the first wave of trainers at once (placement groups the sweep's job owns: removed once placed, and gone with the job however it ends)")
    max_retries: int = Field(2, ge=0, description="worker-group restarts before a tenant fails")


class RegistrySpec(StrictModel):
    """Where finished adapters are published."""

    store: str = Field(..., description="store root: a local folder or s3://bucket/prefix")
    catalog: Optional[str] = Field(None, description="SQLAlchemy URL; default: SQLite file inside a local store")


class BaselineSpec(StrictModel):
    """A full fine-tuning baseline (DeepSpeed ZeRO) for some tenants, compared with their LoRA runs.

    The baseline sees the same rows per optimizer step, in the same order, for the same number
    of steps as the tenant's LoRA run; only the learning rate differs, because full fine-tuning
    needs a much smaller one.
    """

    tenants: list[str] = Field(..., min_length=1, description="tenants to also fine-tune fully")
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also weights")
    offload: Literal["none", "cpu"] = Field("none", description="offload optimizer states (and, at stage 3, weights) to host memory")
    workers: Optional[int] = Field(None, ge=1, description="data-parallel workers; null: the planner picks the fewest that fit (at least 2)")
    learning_rate: float = Field(5e-5, gt=0, description="peak learning rate of the full fine-tune")


class QualitySpec(StrictModel):
    """Sweep-wide quality evals after training."""

    matrix_rows: int = Field(16, ge=0, le=10_000, description="held-out rows of each tenant every adapter is scored on, for the cross-tenant eval-loss matrix (0: no matrix)")
    matrix_max_tenants: int = Field(50, ge=2, description="no matrix for sweeps with more adapters than this (its cost grows with their square)")


class _TenantEntryFields(StrictModel):
    """One tenant as written in the spec: a name, its data, and overrides of the defaults."""

    name: str
    data: dict[str, Any]
    adapter: Optional[str] = None
    method: Optional[str] = None
    train: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)

    @field_validator("adapter")
    @classmethod
    def _valid_adapter(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not NAME_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid adapter name (pattern {NAME_PATTERN.pattern})")
        return value

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid tenant name (pattern {NAME_PATTERN.pattern})")
        return value


#: A tenant entry may override the settings of every method (``lora: {rank: 16}``, ``ia3: ...``).
TenantEntry = create_model(
    "TenantEntry", __base__=_TenantEntryFields, __module__=__name__, __doc__=_TenantEntryFields.__doc__,
    **{name: (dict[str, Any], Field(default_factory=dict)) for name in METHODS})


class SweepSpec(StrictModel):
    """A whole sweep as written in YAML (tenant overrides not yet merged)."""

    name: str = Field(..., description="sweep name, used as the default sweep id")
    base_model: BaseModelSpec
    output_dir: str = Field("runs", description="where sweeps write adapters, checkpoints and reports")
    registry: Optional[RegistrySpec] = Field(None, description="publish finished adapters here (none: output folder only)")
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    defaults: JobSettings = Field(default_factory=JobSettings)
    tenants: list[TenantEntry] = Field(..., min_length=1)
    baseline: Optional[BaselineSpec] = Field(None, description="full fine-tuning baseline for some tenants (see below)")
    quality: QualitySpec = Field(default_factory=QualitySpec)

    @field_validator("name")
    @classmethod
    def _valid_sweep_name(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid sweep name (pattern {NAME_PATTERN.pattern})")
        return value

    @model_validator(mode="after")
    def _unique_tenants(self):
        seen: set[str] = set()
        for tenant in self.tenants:
            if tenant.name in seen:
                raise ValueError(f"tenant {tenant.name!r} appears more than once")
            seen.add(tenant.name)
        if self.baseline is not None:
            unknown = [name for name in self.baseline.tenants if name not in seen]
            if unknown:
                raise ValueError(f"baseline.tenants: {', '.join(map(repr, unknown))} not among the spec's tenants")
        return self


class TenantJob(BaseModel):
    """One tenant's fully resolved job: what a training function needs, nothing more."""

    model_config = ConfigDict(frozen=True)

    tenant: str
    adapter: str = Field(..., description="adapter name in the registry (default: the sweep's name)")
    base_model: BaseModelSpec
    settings: JobSettings
    output_dir: str = Field(..., description="this tenant's folder inside the sweep's output")
    run_id: Optional[str] = Field(None, description="names this run where one tenant has several (a service's "
                                  "fine-tuning job id); a sweep's runs are named by their tenant")
    init_adapter: Optional[str] = Field(None, description="folder or storage URI of the adapter files training starts "
                                        "from (train.init_from, resolved and staged by the sweep); null: fresh init")
    init_version: Optional[str] = Field(None, description="serve name of the version init_adapter holds (lineage)")

    @property
    def key(self) -> str:
        """What names this run in a pool's queue and on checkpoint storage."""
        return self.run_id or self.tenant

    @property
    def pack_key(self) -> tuple:
        """Jobs with equal keys can share a co-training pack (``farm.train.cotrain``): same base,
        same row layout, same method and precision. The planner groups tenants by it too."""
        data = self.settings.data
        return (self.base_model.name_or_path, self.base_model.revision, data.max_seq_len, data.packing,
                self.settings.method, self.settings.train.precision)


class ResolvedSweep(BaseModel):
    """A validated spec with every tenant's settings merged and every path made absolute."""

    model_config = ConfigDict(frozen=True)

    spec: SweepSpec
    source: str
    jobs: dict[str, TenantJob]

    def job(self, tenant: str) -> TenantJob:
        """The job of one tenant; raises ``KeyError`` naming the tenants the spec has."""
        if tenant not in self.jobs:
            raise KeyError(f"tenant {tenant!r} is not in {self.source}; it has: {', '.join(self.jobs)}")
        return self.jobs[tenant]


# -- loading ---------------------------------------------------------------------------------

_TYPE_WORDS = {
    "int": "expected int", "float": "expected number", "bool": "expected bool",
    "string": "expected string", "list": "expected list", "dict": "expected mapping",
    "model": "expected mapping",
}


def _describe(error: dict) -> str:
    kind: str = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    for prefix, words in _TYPE_WORDS.items():
        if kind.startswith(prefix + "_") and ("type" in kind or "parsing" in kind):
            return f"{words}, got {shown(error.get('input'))}"
    if kind == "value_error":  # our own validators: the message says it all; a whole mapping is noise
        message = error["msg"].removeprefix("Value error, ")
        return message if isinstance(error.get("input"), (dict, list)) else f"{message} (got {shown(error.get('input'))})"
    return f"{error['msg']} (got {shown(error.get('input'))})"


def _path(prefix: str, loc: tuple) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "union[", "literal[")) or part in ("list[str]",):
            continue  # pydantic's internal union branch names are noise to a reader
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _errors(exc: ValidationError, prefix: str = "") -> list[str]:
    return [f"{_path(prefix, tuple(e['loc']))}: {_describe(e)}" for e in exc.errors()]


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of ``base`` with ``override`` merged in: mappings key by key, anything else replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` overrides from a command line (``defaults.train.max_steps=10``) as the
    nested dict ``load_spec`` merges: dotted keys address mappings (``tenants`` is a list: edit
    the file for one tenant), values are YAML (``10``, ``3e-4``, ``true``, ``[q_proj, v_proj]``).
    ``ValueError`` naming the item that is not ``KEY=VALUE``; the spec's validation then names
    any key that does not exist."""
    merged: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts):
            raise ValueError(f"{item!r}: expected KEY=VALUE, for example defaults.train.max_steps=10")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"{item!r}: the value is not valid YAML ({exc})") from None
        node = merged
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{item!r}: {part} was given a value by an earlier override")
        node[parts[-1]] = parsed
    return merged


def resolve_path(value: str, relative_to: Path) -> str:
    """Make a local path absolute relative to ``relative_to``; URIs (``s3://``) pass unchanged."""
    if "://" in value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (relative_to / path).resolve())


def _resolve_base_model(base: BaseModelSpec, spec_dir: Path) -> BaseModelSpec:
    # A hub id looks like "org/name"; a local folder may too. Explicitly relative or absolute
    # strings are paths; anything else is a path only if that folder exists next to the spec.
    value = base.name_or_path
    if value.startswith(("./", "../", "/", "~")) or (spec_dir / value).is_dir():
        return base.model_copy(update={"name_or_path": resolve_path(value, spec_dir)})
    return base


def parse_spec(raw: Any, source: str = "<spec>", spec_dir: Path | None = None) -> ResolvedSweep:
    """Validate a spec given as plain data (as YAML loads it); raises ``SpecError``."""
    spec_dir = spec_dir or Path.cwd()
    if not isinstance(raw, dict):
        raise SpecError(source, [f"<root>: expected a mapping, got {kind(raw)}"])
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(source, _errors(exc)) from None

    problems: list[str] = []
    jobs: dict[str, TenantJob] = {}
    output_dir = resolve_path(spec.output_dir, spec_dir)
    base_model = _resolve_base_model(spec.base_model, spec_dir)
    defaults = spec.defaults.model_dump()
    for index, tenant in enumerate(spec.tenants):
        overrides = tenant.model_dump(exclude={"name", "adapter"}, exclude_defaults=True)
        overrides["data"] = tenant.data
        try:
            settings = JobSettings.model_validate(deep_merge(defaults, overrides))
        except ValidationError as exc:
            problems.extend(_errors(exc, f"tenants[{index}]"))
            continue
        if not settings.data.path:
            problems.append(f"tenants[{index}].data.path: required key is missing")
            continue
        data = settings.data.model_copy(update={
            "path": resolve_path(settings.data.path, spec_dir),
            "eval_path": resolve_path(settings.data.eval_path, spec_dir) if settings.data.eval_path else None})
        settings = settings.model_copy(update={"data": data})
        jobs[tenant.name] = TenantJob(
            tenant=tenant.name, adapter=tenant.adapter or spec.name, base_model=base_model, settings=settings,
            output_dir=str(Path(output_dir) / spec.name / tenant.name) if "://" not in output_dir
            else f"{output_dir.rstrip('/')}/{spec.name}/{tenant.name}",
        )
    if problems:
        raise SpecError(source, problems)
    registry = spec.registry
    if registry is not None:
        registry = registry.model_copy(update={"store": resolve_path(registry.store, spec_dir)})
    spec = spec.model_copy(update={"output_dir": output_dir, "base_model": base_model, "registry": registry})
    return ResolvedSweep(spec=spec, source=source, jobs=jobs)


def load_spec(path: str | Path, overrides: dict | None = None) -> ResolvedSweep:
    """Read and validate a YAML spec file; raises ``SpecError`` listing every problem.

    ``overrides`` are deep-merged over the file's top level before validation (the command
    line uses it for ``base_model`` and ``output_dir``); give absolute paths in them.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), ["<file>: no such file"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), [f"<file>: not valid YAML: {exc}"]) from None
    if overrides and isinstance(raw, dict):
        raw = deep_merge(raw, overrides)
    return parse_spec(raw, source=str(path), spec_dir=path.resolve().parent)


def _type_name(annotation) -> str:
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(annotation, "__name__", str(annotation))


def reference_markdown() -> str:
    """The spec's configuration reference as Markdown tables, generated from the models.

    The README embeds this output; a test keeps the two in step.
    """
    sections = [("top level", SweepSpec, ""), ("base_model", BaseModelSpec, "base_model."),
                ("resources", ResourceSpec, "resources."), ("registry", RegistrySpec, "registry."),
                ("baseline", BaselineSpec, "baseline."), ("quality", QualitySpec, "quality."),
                ("defaults / tenants[i]", JobSettings, ""),
                *((name, info.settings, f"{name}.") for name, info in METHODS.items()),
                ("train", TrainSpec, "train."), ("data", DataSpec, "data."), ("eval", EvalSpec, "eval."),
                ("eval.checks[i]", BehaviourCheck, "eval.checks[i]."), ("eval.promote", PromotionSpec, "eval.promote.")]
    lines: list[str] = []
    for title, model, prefix in sections:
        lines += [f"**{title}**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            if model is SweepSpec and name in ("base_model", "resources", "registry", "defaults", "baseline", "quality"):
                continue
            if model is JobSettings and name in ("train", "data", "eval", *METHODS):
                continue
            annotation = _type_name(info.annotation)
            if info.is_required():
                default = "required"
            elif info.default_factory is not None:
                value = info.default_factory()
                default = "see below" if isinstance(value, BaseModel) else f"`{value}`"
            else:
                default = f"`{info.default}`"
            description = info.description or ""
            if model is SweepSpec and name == "tenants":
                description = ("list of `{name, data: {path, ...}}`, optional `adapter` (registry name, "
                               "default: the sweep's name) and any `method`, `train`, `eval` or method-settings "
                               f"({', '.join(f'`{m}`' for m in METHODS)}) override")
            lines.append(f"| `{prefix}{name}` | {annotation} | {default} | {description} |")
        lines.append("")
    return "\n".join(lines)
