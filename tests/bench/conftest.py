"""Shared by the benchmark smoke tests: run a benchmark as a user would and read its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..conftest import REPO


def run_smoke(script: str, out: Path, base_model_dir: Path | None, timeout: int = 600) -> tuple[dict, str]:
    """Run ``jobs/bench/<script> --smoke`` (with ``--base-model`` unless None); assert it exits
    0; return its JSON and its stdout."""
    model = ["--base-model", str(base_model_dir)] if base_model_dir is not None else []
    run = subprocess.run([sys.executable, f"jobs/bench/{script}", "--smoke", "--out", str(out), *model],
                         cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return json.loads(out.read_text()), run.stdout
