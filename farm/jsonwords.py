"""JSON and YAML values in the words their authors know: ``null``, ``a number``, never ``NoneType``.

Every message about a value a user wrote (a tenant's record, a spec key) goes through here, so
the farm speaks of them the same way everywhere.
"""

from __future__ import annotations

import json
from typing import Any


def kind(value: Any) -> str:
    """A value's type as JSON names it: ``null``, ``a boolean``, ``a number``, ``a string``,
    ``a list``, ``an object``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def shown(value: Any, limit: int = 80) -> str:
    """A value as JSON writes it (``null``, ``true``, ``"eight"``), cut to ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
