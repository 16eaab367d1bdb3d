"""Registry fixtures: real PEFT adapters, and registries on every backend combination.

Backends: local folder + SQLite, S3 (a real SeaweedFS server) + SQLite, local folder +
PostgreSQL (a real PostgreSQL 15 server). The servers start once per session; each test gets
a fresh bucket prefix or database. Nothing here skips: a server that cannot start fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest




def make_lora_adapter(base_model_dir: Path, out: Path, rank: int = 8, seed: int = 0,
                      targets=("q_proj", "v_proj"), strength: float = 0.02) -> Path:
    """A real PEFT LoRA adapter for the tiny base, saved with safetensors (random, non-zero B of
    standard deviation ``strength``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=16, target_modules=list(targets)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, strength)  # a trained-looking adapter, not the all-zero init
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def adapter_dir(base_model_dir, tmp_path_factory) -> Path:
    return make_lora_adapter(base_model_dir, tmp_path_factory.mktemp("adapter") / "a")


@pytest.fixture
def registry(registry_env):
    from farm.registry import open_registry

    store, catalog = registry_env
    reg = open_registry(store, catalog)
    yield reg
    reg.catalog.engine.dispose()
