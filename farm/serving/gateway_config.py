"""What ``farm gateway`` serves and how: bases and their backends, per-tenant limits.

    # gateway.yaml
    registry: {store: .farm/registry}          # tokens, adapters and usage live in its catalog
    bases:
      - name: tiny                             # what clients send as `model` for the plain base
        base_model: /srv/models/tiny           # exactly as adapters were published (vLLM's --model)
        served_model_name: base                # vLLM's --served-model-name (default: name)
        tenants: ["*"]                         # who may call the plain base ("*": every tenant)
        backends:
          - {url: "http://127.0.0.1:8000", api_key_env: FARM_VLLM_API_KEY}
          - {url: "http://127.0.0.1:8001", kind: transformers, api_key_env: FARM_TRANSFORMERS_API_KEY}
    limits:
      default: {requests_per_minute: 600, tokens_per_minute: 200000, concurrent_requests: 16, max_tokens: 1024}
      tenants:
        acme: {requests_per_minute: 60}        # fields not given come from default
    fine_tuning:                               # the OpenAI files + fine-tuning jobs API (farm service)
      models: [tiny]                           # bases tenants may fine-tune
      default: {active_jobs: 100, stored_bytes: 10737418240, file_bytes: 536870912}
      tenants:
        acme: {active_jobs: 5}

Local paths (the store, a base folder) are relative to the file, as in sweep specs: a base
folder becomes the absolute path the sweep published adapters against. Secrets never appear in the file: each backend names the environment variable holding its key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from farm.registry.names import check_name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendConfig(_Strict):
    """One server of a base model: vLLM (LoRA) or the farm's transformers backend (every method)."""

    url: str = Field(..., description="base URL of the server, e.g. http://127.0.0.1:8000")
    kind: Literal["vllm", "transformers"] = Field(
        "vllm", description="vllm (farm serve), or transformers (farm serve --backend transformers): the "
                            "gateway sends a version to vLLM when vLLM can serve it, else to transformers")
    api_key_env: Optional[str] = Field(None, description="environment variable holding its API key")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    def api_key(self) -> Optional[str]:
        """The key from the environment; a named variable that is unset is an error."""
        if self.api_key_env is None:
            return None
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ValueError(f"backend {self.url}: environment variable {self.api_key_env} is not set")
        return value


class BaseConfig(_Strict):
    """A base model the gateway serves, with the vLLM servers that hold it."""

    name: str = Field(..., min_length=1, max_length=200, description="public model name of the plain base")
    base_model: str = Field(..., description="base model string adapters were published against (vLLM's --model)")
    served_model_name: Optional[str] = Field(None, description="vLLM's --served-model-name (default: name)")
    tenants: list[str] = Field(default_factory=lambda: ["*"], description='tenants allowed the plain base; "*" for all')
    backends: list[BackendConfig] = Field(..., min_length=1)

    @field_validator("tenants")
    @classmethod
    def _tenants(cls, value: list[str]) -> list[str]:
        for tenant in value:
            if tenant != "*":
                check_name("tenant", tenant)
        return value

    @property
    def vllm_name(self) -> str:
        return self.served_model_name or self.name

    def allows(self, tenant: Optional[str]) -> bool:
        """Whether ``tenant`` (None: admin) may call the plain base."""
        return tenant is None or "*" in self.tenants or tenant in self.tenants


def _tenant_names(value: dict) -> dict:
    """Per-tenant sections are keyed by registry tenant names."""
    for tenant in value:
        check_name("tenant", tenant)
    return value


def _layered(model, *layers):
    """``model`` from ``layers`` (None skipped), each one's set fields over the ones before:
    a tenant's own settings over the default's (over the built-in ones)."""
    merged: dict = {}
    for layer in layers:
        if layer is not None:
            merged.update({k: v for k, v in layer.model_dump().items() if v is not None})
    return model(**merged)


class TenantLimits(_Strict):
    """Per-tenant limits; a field left out takes the default's value."""

    requests_per_minute: Optional[int] = Field(None, ge=1, description="requests admitted per minute")
    tokens_per_minute: Optional[int] = Field(None, ge=1, description="prompt + completion tokens per minute")
    concurrent_requests: Optional[int] = Field(None, ge=1, description="requests in flight at once")
    max_tokens: Optional[int] = Field(None, ge=1, description="ceiling on a request's max_tokens")


class LimitsConfig(_Strict):
    default: TenantLimits = Field(default_factory=lambda: TenantLimits(
        requests_per_minute=600, tokens_per_minute=200_000, concurrent_requests=16, max_tokens=1024))
    tenants: dict[str, TenantLimits] = Field(default_factory=dict)

    _names = field_validator("tenants")(classmethod(lambda cls, value: _tenant_names(value)))

    def for_tenant(self, tenant: Optional[str]) -> TenantLimits:
        """The tenant's limits with the default filling what it leaves out (admins: default)."""
        return _layered(TenantLimits, self.default, self.tenants.get(tenant) if tenant else None)


class FineTuningQuota(_Strict):
    """A tenant's share of the fine-tuning service; a field left out takes the default's value."""

    active_jobs: Optional[int] = Field(None, ge=1, description="jobs validating, queued or running at once")
    stored_bytes: Optional[int] = Field(None, ge=1, description="bytes of files kept (deleted files do not count)")
    file_bytes: Optional[int] = Field(None, ge=1, description="largest single upload")


QUOTA_BUILT_IN = FineTuningQuota(active_jobs=100, stored_bytes=10 << 30, file_bytes=512 << 20)


class FineTuningConfig(_Strict):
    """The OpenAI fine-tuning API (``/v1/files``, ``/v1/fine_tuning/jobs``) this gateway serves
    for ``farm service``. How many jobs run at once per tenant is the service's (its pools)."""

    models: list[str] = Field(..., min_length=1, description="bases (by name, from bases) that tenants may fine-tune")
    default: FineTuningQuota = Field(default_factory=FineTuningQuota, description="every tenant's quota; fields "
                                     "left out: 100 active jobs, 10 GiB stored, 512 MiB a file")
    tenants: dict[str, FineTuningQuota] = Field(default_factory=dict)

    _names = field_validator("tenants")(classmethod(lambda cls, value: _tenant_names(value)))

    def quota(self, tenant: str) -> FineTuningQuota:
        """The tenant's quota, every field set: its own, else the default's, else the built-in one."""
        return _layered(FineTuningQuota, QUOTA_BUILT_IN, self.default, self.tenants.get(tenant))


class RegistryConfig(_Strict):
    store: str = Field(".farm/registry", description="registry store: folder or s3://bucket/prefix")
    catalog: Optional[str] = Field(None, description="catalog SQLAlchemy URL (default: SQLite in a local store)")


class GatewayConfig(_Strict):
    """Everything ``farm gateway`` needs besides its listen address."""

    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    bases: list[BaseConfig] = Field(..., min_length=1)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    fine_tuning: Optional[FineTuningConfig] = Field(None, description="serve the fine-tuning API (null: it answers 404)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body accepted")
    health_interval_s: float = Field(5.0, gt=0, description="seconds between backend health checks")
    usage_flush_s: float = Field(5.0, gt=0, description="seconds between writes of metered usage to the catalog")
    request_timeout_s: float = Field(600.0, gt=0, description="longest a backend may take to answer")
    token_cache_s: float = Field(2.0, ge=0, description="seconds a token lookup is reused (revocation delay)")
    target_cache_s: float = Field(1.0, ge=0, description="seconds a serve name's routing is reused (a deleted "
                                  "version stops answering within this); alias refs are resolved every request")

    @model_validator(mode="after")
    def _unique(self) -> "GatewayConfig":
        names = [b.name for b in self.bases]
        if len(set(names)) != len(names):
            raise ValueError(f"bases: names must be unique, got {names}")
        models = [b.base_model for b in self.bases]
        if len(set(models)) != len(models):
            raise ValueError("bases: each base_model may appear once (list several backends under it)")
        if self.fine_tuning is not None:
            unknown = [m for m in self.fine_tuning.models if m not in names]
            if unknown:
                raise ValueError(f"fine_tuning.models: {unknown} are not bases of this gateway ({names})")
        return self


class GatewayConfigError(ValueError):
    """A gateway file that does not parse, with the field path and reason."""


def load_gateway_config(path: Path) -> GatewayConfig:
    """Read and validate a gateway YAML file; ``GatewayConfigError`` names each bad field."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise GatewayConfigError(f"{path}: {exc}") from None
    if isinstance(raw, dict):
        raw = with_catalog_from_env(_relative_to(raw, Path(path).resolve().parent))
    try:
        return GatewayConfig.model_validate(raw or {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise GatewayConfigError(f"{path}: {problems}") from None


CATALOG_ENV = "FARM_REGISTRY_CATALOG"


def with_catalog_from_env(raw: dict) -> dict:
    """``registry.catalog`` from ``$FARM_REGISTRY_CATALOG`` when the file leaves it out: a
    PostgreSQL URL carries a password, which belongs in a Secret, not in a config file."""
    registry = raw.get("registry")
    if os.environ.get(CATALOG_ENV) and (registry is None or (isinstance(registry, dict) and not registry.get("catalog"))):
        raw = {**raw, "registry": {**(registry or {}), "catalog": os.environ[CATALOG_ENV]}}
    return raw


def _relative_to(raw: dict, folder: Path) -> dict:
    """Local paths in the file (the store, a base folder) are relative to the file, as in specs."""
    raw = dict(raw)
    registry = raw.get("registry")
    if isinstance(registry, dict) and isinstance(registry.get("store"), str) and "://" not in registry["store"]:
        raw["registry"] = {**registry, "store": str((folder / registry["store"]).resolve())}
    bases = raw.get("bases")
    if isinstance(bases, list):
        resolved = []
        for base in bases:
            if isinstance(base, dict) and isinstance(base.get("base_model"), str):
                local = folder / base["base_model"]
                if not Path(base["base_model"]).is_absolute() and local.exists():
                    base = {**base, "base_model": str(local.resolve())}  # as the sweep published it
            resolved.append(base)
        raw["bases"] = resolved
    return raw
