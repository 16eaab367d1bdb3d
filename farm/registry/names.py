"""Names in the registry: tenants, adapters, aliases, serve names and references.

Names become path parts and URL parts, so they are checked against one strict pattern
(lower-case letters, digits, ``-`` and ``_``; no dots, slashes, ``..``, or control
characters). A version's **serve name** ``<tenant>.<adapter>.v<N>`` is immutable: vLLM caches
adapters by name, so a serve name must never come to mean other weights. An **alias
reference** ``<tenant>.<adapter>@<alias>`` follows a movable pointer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from farm.spec import NAME_PATTERN

# Applied with fullmatch: ``$`` alone would also accept a trailing newline.
_SERVE = re.compile(r"([a-z0-9][a-z0-9_-]{0,62})\.([a-z0-9][a-z0-9_-]{0,62})\.v([1-9][0-9]{0,8})")
_ALIAS = re.compile(r"([a-z0-9][a-z0-9_-]{0,62})\.([a-z0-9][a-z0-9_-]{0,62})@([a-z0-9][a-z0-9_-]{0,62})")


class NameError_(ValueError):
    """A name or reference that does not match the registry's strict patterns."""


def check_name(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid ``kind`` name (tenant, adapter, alias); else raise."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise NameError_(f"invalid {kind} name {value!r}: use 1-63 of a-z, 0-9, '-', '_', "
                         "starting with a letter or digit")
    return value


def serve_name(tenant: str, adapter: str, version: int) -> str:
    """The immutable serve name of a version, for example ``acme.support.v3``."""
    return f"{tenant}.{adapter}.v{version}"


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a serve name (version set) or an alias reference (alias set)."""

    tenant: str
    adapter: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return serve_name(self.tenant, self.adapter, self.version)
        return f"{self.tenant}.{self.adapter}@{self.alias}"


def parse_ref(text: str) -> Ref:
    """Parse ``tenant.adapter.vN`` or ``tenant.adapter@alias``; raise ``NameError_`` otherwise."""
    if isinstance(text, str):
        match = _SERVE.fullmatch(text)
        if match:
            return Ref(match.group(1), match.group(2), version=int(match.group(3)))
        match = _ALIAS.fullmatch(text)
        if match:
            return Ref(match.group(1), match.group(2), alias=match.group(3))
    raise NameError_(f"{text!r} is neither a serve name (tenant.adapter.vN) nor an alias "
                     "reference (tenant.adapter@alias)")


_METRIC_FILTER = re.compile(r"^(?P<name>[^<>=]+?)\s*(?P<op><=|>=|<|>|=)\s*(?P<value>\S.*)$")


def parse_metric_filter(text: str) -> tuple[str, str, float]:
    """``eval_loss<=3.5`` -> ``("eval_loss", "<=", 3.5)``; ``ValueError`` when malformed."""
    match = _METRIC_FILTER.match(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"metric filter {text!r}: use NAME<op>VALUE with op one of <, <=, >, >=, =")
    name = match.group("name").strip()
    try:
        value = float(match.group("value"))
    except ValueError:
        raise ValueError(f"metric filter {text!r}: {match.group('value')!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"metric filter {text!r}: the value must be a finite number")
    check_text("metric name", name, 100)
    return name, match.group("op"), value


def check_text(field: str, value: str, max_len: int) -> str:
    """Free text that reaches SQL: bounded, no control characters, encodable as UTF-8."""
    if len(value) > max_len:
        raise ValueError(f"{field}: at most {max_len} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{field}: control characters are not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field}: not valid UTF-8 text") from None
    return value
