"""``farm.models.attach_saved``: a saved adapter that does not fit leaves the base exactly as it was.

The transformers backend lends one base to every adapter it serves, one after another; an
adapter whose tensors do not match its config (or the base) must be refused without leaving
wrapped modules or hooks behind, or every later request would run through them.
"""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("method", ["lora", "bottleneck", "prefix"])
def test_an_adapter_that_does_not_fit_is_refused_and_the_base_stays_bare(method, base_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from farm.models import attach_saved, read_adapter, unload_adapter

    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()
    before = {name: type(module) for name, module in base.named_modules()}
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    base = unload_adapter(_saved(base, method, base_model_dir, tmp_path))
    config, tensors = read_adapter(tmp_path / method)
    first = sorted(tensors)[0]
    tensors[first] = torch.zeros(3, 3)  # a tensor of the wrong shape
    with pytest.raises(ValueError, match="shape"):
        attach_saved(base, config, tensors)
    assert {name: type(module) for name, module in base.named_modules()} == before
    assert not any(module._forward_hooks for module in base.modules())
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, plain)


def _saved(base, method: str, base_model_dir, tmp_path):
    """Save a fresh adapter of ``method`` to ``tmp_path/method``; returns the model (to unload)."""
    from farm.models import build_peft_model
    from farm.spec import JobSettings

    model = build_peft_model(base, JobSettings(method=method), str(base_model_dir))
    model.save_pretrained(str(tmp_path / method), safe_serialization=True)
    return model
