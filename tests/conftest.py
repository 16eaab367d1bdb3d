"""Shared fixtures: a tiny offline base model (built once per session) and sample data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "jobs" / "data"
SAMPLE_FILES = {"acme": "acme.jsonl", "globex": "globex.jsonl", "initech": "initech.jsonl",
                "umbrella": "umbrella.parquet", "hooli": "hooli.jsonl"}


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama base model, built exactly as `farm base-model build` builds it."""
    from farm.base_model import build_base_model

    return build_base_model(tmp_path_factory.mktemp("base-model"))


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    from farm.models import load_tokenizer
    from farm.spec import BaseModelSpec

    return load_tokenizer(BaseModelSpec(name_or_path=str(base_model_dir)))


#: Settings small enough for 2 CPUs and large enough that each adapter learns its tenant.
FAST_DEFAULTS = {
    "lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
    "train": {"max_steps": 40, "batch_size": 4, "learning_rate": 3.0e-3, "warmup_steps": 4,
              "checkpoint_every": 20, "log_every": 20, "seed": 7},
    "data": {"max_seq_len": 128},
}


@pytest.fixture
def write_spec(tmp_path, base_model_dir):
    """Write a spec YAML for the given tenants (sample files by default); returns its path."""

    def write(tenants: list[dict] | None = None, defaults: dict | None = None, **top) -> Path:
        tenants = tenants if tenants is not None else [
            {"name": name, "data": {"path": str(SAMPLE_DATA / f)}} for name, f in SAMPLE_FILES.items()]
        raw = {"name": "test", "base_model": {"name_or_path": str(base_model_dir)},
               "output_dir": str(tmp_path / "runs"), "defaults": defaults or FAST_DEFAULTS,
               "tenants": tenants, **top}
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write
