"""What the registry API reads and answers: request and response models, path parameters.

These are what ``/docs`` and ``/openapi.json`` describe. Patterns and bounds are documented in
the schema (so clients and fuzzers see the shape) and enforced in the handlers with readable
messages (``names.py`` is the authority).
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from farm.registry.core import VersionInfo
from farm.registry.names import check_name, check_text

MAX_VERSION = 999_999_999              # serve names allow up to nine digits
_NAME = r"[a-z0-9][a-z0-9_-]{0,62}"
NAME_PATTERN = rf"^{_NAME}$"
_SERVE_PATTERN = rf"^{_NAME}\.{_NAME}\.v[1-9][0-9]{{0,8}}$"
_REF_PATTERN = rf"^{_NAME}\.{_NAME}(\.v[1-9][0-9]{{0,8}}|@{_NAME})$"


# -- response models ----------------------------------------------------------------------------
class VersionList(BaseModel):
    items: list[VersionInfo]
    total: int
    limit: int
    offset: int


class AliasBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(..., ge=1, le=MAX_VERSION, description="version number the alias points at")
    note: dict | None = Field(None, description="why (a JSON object of at most 16 KiB, for example an eval "
                              "gate's decision and figures), kept with the move in the alias history")


class AliasEvent(BaseModel):
    alias: str
    version: int | None = Field(..., description="the version the alias pointed at after the move; null: removed")
    previous: int | None
    at: str | None
    note: dict | None


class AliasOut(BaseModel):
    alias: str
    version: int
    previous: int | None
    serve_name: str


class GcOut(BaseModel):
    removed: list[str]
    dry_run: bool


class SkippedOut(BaseModel):
    path: str
    reason: str


class ReindexOut(BaseModel):
    versions: int
    skipped: list[SkippedOut] = Field(default_factory=list, description="what could not be parsed (left as it is)")


class ErrorOut(BaseModel):
    detail: str


ERRORS = {401: {"model": ErrorOut, "description": "missing or unknown token"},
          404: {"model": ErrorOut, "description": "no such version, or one this token may not see"},
          422: {"model": ErrorOut, "description": "invalid name, reference or parameter"}}


# -- path parameters ----------------------------------------------------------------------------
def name_param(kind: str):
    """A tenant, adapter or alias name in the path."""
    return PathParam(..., max_length=63, description=f"{kind} name", json_schema_extra={"pattern": NAME_PATTERN})


def ref_param(serve_only: bool = False):
    """A version reference in the path: a serve name, or (unless ``serve_only``) an alias reference."""
    if serve_only:
        return PathParam(..., max_length=200, description="serve name tenant.adapter.vN",
                         json_schema_extra={"pattern": _SERVE_PATTERN})
    return PathParam(..., max_length=200, description="serve name tenant.adapter.vN or alias reference "
                     "tenant.adapter@alias", json_schema_extra={"pattern": _REF_PATTERN})


# -- the publish form ---------------------------------------------------------------------------
class PublishForm(BaseModel):
    """The publish form's text fields, parsed: each typed and bounded, unknown fields refused.

    Sent as form text by a tenant: ``metrics``, ``training`` and ``lineage`` are JSON objects
    (finite numbers, bounded depth and size), ``aliases`` a comma-separated list (default
    ``latest``), an empty optional field the same as an absent one.
    """

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1, max_length=500)
    base_architecture: Optional[str] = Field(None, max_length=200)
    method: Optional[str] = Field(None, max_length=32)
    metrics: dict = Field(default_factory=dict)
    training: dict = Field(default_factory=dict)
    lineage: dict = Field(default_factory=dict)
    aliases: tuple[str, ...] = ("latest",)

    @field_validator("base_architecture", "method", mode="before")
    @classmethod
    def _empty_is_absent(cls, value):
        return value or None

    @field_validator("base_model", "base_architecture", "method")
    @classmethod
    def _plain_text(cls, value, info):
        return value if value is None else check_text(info.field_name, value, 500)

    @field_validator("metrics", "training", "lineage", mode="before")
    @classmethod
    def _json(cls, value, info):
        return value if isinstance(value, dict) else _json_object(info.field_name, value)

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, value: dict):
        for key in value:
            check_text("metric name", key, 100)
        return value

    @field_validator("lineage")
    @classmethod
    def _lineage(cls, value: dict):
        for key, max_len in (("sweep_id", 200), ("dataset_fingerprint", 64)):
            if value.get(key) is not None:
                if not isinstance(value[key], str):
                    raise ValueError(f"lineage.{key}: must be a string")
                check_text(f"lineage.{key}", value[key], max_len)
        return value

    @field_validator("aliases", mode="before")
    @classmethod
    def _aliases(cls, value):
        names = tuple(a.strip() for a in value.split(",") if a.strip()) if isinstance(value, str) else value
        for alias in names:
            check_name("alias", alias)
        return names

    @classmethod
    def parse(cls, fields: dict[str, str]) -> "PublishForm":
        """The checked form, or ``ValueError`` naming the first bad field."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "form"
            message = str(first.get("ctx", {}).get("error") or first["msg"])
            raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None


def check_json_value(field: str, value: Any, depth: int = 0) -> None:
    """JSON that is stored and echoed: finite numbers, UTF-8 strings, bounded nesting."""
    if depth > 32:
        raise ValueError(f"{field}: nested too deeply")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        try:
            finite = math.isfinite(float(value))
        except OverflowError:
            finite = False
        if not finite:
            raise ValueError(f"{field}: numbers must be finite and below 1e308")
        return
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{field}: strings must be valid UTF-8") from None
        return
    if isinstance(value, list):
        for item in value:
            check_json_value(field, item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            check_json_value(field, key, depth + 1)
            check_json_value(f"{field}.{key}", item, depth + 1)
        return
    raise ValueError(f"{field}: unsupported value {type(value).__name__}")


def _json_object(field: str, raw: str | None) -> dict:
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{field}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field}: expected a JSON object")
    check_json_value(field, value)
    return value
