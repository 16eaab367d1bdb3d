"""Shared by the benchmarks in this folder (each is run as ``python jobs/bench/<name>.py``)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(payload: dict, out: str | Path) -> Path:
    """Write a benchmark's figures as JSON (creating the folder) and say where."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path
