"""Only sound adapters are published: every tensor finite, named and shaped as config and base say.

Each case damages one thing in a real PEFT adapter and publishes it; the refusal must name the
file, the tensor (or field) and the reason, and leave nothing behind (no version, no number
visible, no store folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from farm.registry import PublishError, open_registry
from farm.registry.tensors import base_module_shapes, check_adapter_weights

from .conftest import make_lora_adapter

V_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _damaged(base_model_dir: Path, folder: Path, change) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    make_lora_adapter(base_model_dir, folder, seed=3)
    weights = folder / "adapter_model.safetensors"
    config_path = folder / "adapter_config.json"
    tensors, config = load_file(str(weights)), json.loads(config_path.read_text())
    change(tensors, config, torch)
    save_file(tensors, str(weights))
    config_path.write_text(json.dumps(config))
    return folder


CASES = {
    "nan": (lambda t, c, torch: t.__setitem__(V_B, torch.full_like(t[V_B], float("nan"))), f"{V_B}.*NaN"),
    "inf": (lambda t, c, torch: t[Q_A].__setitem__((0, 0), float("inf")), f"{Q_A}.*infinite"),
    "wider than the base": (lambda t, c, torch: t.__setitem__(Q_A, torch.zeros(8, 300)),
                            f"{Q_A}.*300 -> 256 features, but the base module"),
    "rank disagrees": (lambda t, c, torch: t.__setitem__(Q_A, torch.zeros(4, 256)), "do not have rank 8"),
    "module the base lacks": (lambda t, c, torch: t.__setitem__(
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", torch.zeros(8, 256)),
        "(is missing|has no module)"),
    "not a LoRA tensor": (lambda t, c, torch: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(2, 2)),
                          "lm_head.weight.*not a LoRA tensor"),
    "untargeted module": (lambda t, c, torch: c.__setitem__("target_modules", ["k_proj"]),
                          "not among target_modules"),
    "empty target set": (lambda t, c, torch: c.__setitem__("target_modules", []), "'target_modules' is empty"),
    "half missing": (lambda t, c, torch: t.pop(V_B), f"{V_B}.*is missing"),
    "empty tensor": (lambda t, c, torch: t.__setitem__(V_B, torch.zeros(0, 8)), "is empty"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_unsound_adapter_is_refused_naming_the_tensor_and_leaves_nothing(case, base_model_dir, tmp_path):
    change, message = CASES[case]
    folder = _damaged(base_model_dir, tmp_path / "adapter", change)
    registry = open_registry(str(tmp_path / "reg"))
    with pytest.raises(PublishError, match=message):
        registry.publish("acme", "bad", folder, base_model=str(base_model_dir))
    assert registry.search(status=None)[1] == 0
    assert not (tmp_path / "reg" / "adapters").exists() or not any((tmp_path / "reg" / "adapters").rglob("*.safetensors"))
    good = registry.publish("acme", "bad", make_lora_adapter(base_model_dir, tmp_path / "good", seed=4),
                            base_model=str(base_model_dir))
    assert good.version == 1 and good.servable_by_vllm  # a refusal takes no number either


def test_base_checks_need_the_base_and_the_rest_do_not(base_model_dir, tmp_path):
    """Without a readable base (HTTP publish), names and finiteness are still checked."""
    folder = _damaged(base_model_dir, tmp_path / "wide", CASES["wider than the base"][0])
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    assert check_adapter_weights(weights, config, None) > 0  # shapes agree with each other
    with pytest.raises(PublishError, match="features"):
        check_adapter_weights(weights, config, base_module_shapes(str(base_model_dir)))
    nan = _damaged(base_model_dir, tmp_path / "nan", CASES["nan"][0])
    with pytest.raises(PublishError, match="NaN"):
        check_adapter_weights(nan / "adapter_model.safetensors", config, None)
    assert base_module_shapes(str(tmp_path / "no-such-base")) is None
    shapes = base_module_shapes(str(base_model_dir))
    assert shapes["model.layers.0.self_attn.q_proj"].in_features == 256
    assert "model.embed_tokens" in shapes


def test_other_methods_are_checked_for_finiteness(base_model_dir, tmp_path):
    import torch
    from peft import IA3Config, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32),
                           IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    folder = tmp_path / "ia3"
    model.save_pretrained(str(folder))
    weights = folder / "adapter_model.safetensors"
    registry = open_registry(str(tmp_path / "reg"))
    shutil.copytree(folder, tmp_path / "ia3-good")
    assert registry.publish("acme", "ia3", tmp_path / "ia3-good", base_model=str(base_model_dir)).method == "ia3"
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(weights))
    with pytest.raises(PublishError, match=f"{first}.*NaN"):
        registry.publish("acme", "ia3", folder, base_model=str(base_model_dir))


def test_symlinks_and_other_non_files_in_an_adapter_folder_are_refused(base_model_dir, tmp_path):
    """Found by trying it: README.md -> /etc/passwd was stored in the version, downloadable."""
    import os

    registry = open_registry(str(tmp_path / "reg"))
    folder = make_lora_adapter(base_model_dir, tmp_path / "a", seed=5)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for tenants")
    readme = folder / "README.md"
    readme.unlink(missing_ok=True)
    os.symlink(secret, readme)
    with pytest.raises(PublishError, match="README.md: a symbolic link"):
        registry.publish("acme", "a", folder, base_model=str(base_model_dir))
    readme.unlink()
    (folder / "nested").mkdir()
    with pytest.raises(PublishError, match="nested: not a regular file"):
        registry.publish("acme", "a", folder, base_model=str(base_model_dir))
    (folder / "nested").rmdir()
    assert registry.publish("acme", "a", folder, base_model=str(base_model_dir)).version == 1


def _bottleneck_adapter(base_model_dir: Path, folder: Path) -> Path:
    """A real bottleneck adapter (farm.bottleneck) on the test base, saved as the trainer saves it."""
    import torch
    from transformers import AutoModelForCausalLM

    from farm import bottleneck
    from farm.methods import BottleneckSettings

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    bottleneck.attach(base, BottleneckSettings(placement="houlsby", bottleneck_size=8),
                      str(base_model_dir)).save_pretrained(str(folder))
    return folder


LAYER0_UP = "model.layers.0.mlp.farm_bottleneck.up.weight"
BOTTLENECK_CASES = {
    "unknown config field": (lambda t, c, torch: c.__setitem__("auto_map", None), "'auto_map'"),
    "code hook in config": (lambda t, c, torch: c.__setitem__("non_linearity", "os.system"), "non_linearity"),
    "rank-like field as text": (lambda t, c, torch: c.__setitem__("bottleneck_size", "8"), "bottleneck_size"),
    "shape against config": (lambda t, c, torch: t.__setitem__(LAYER0_UP, torch.zeros(256, 9)),
                             f"{LAYER0_UP}: shape \\(256, 9\\), the config says \\(256, 8\\)"),
    "stray tensor": (lambda t, c, torch: t.__setitem__("lm_head.weight", torch.zeros(2, 2)),
                     "lm_head.weight: not a bottleneck adapter tensor"),
    "layer the base lacks": (lambda t, c, torch: [t.__setitem__(k.replace("layers.1.", "layers.9."), t.pop(k))
                                                  for k in [k for k in t if ".layers.1." in k]],
                             "the base has no block model.layers.9"),
    "hidden size not the base's": (lambda t, c, torch: c.__setitem__("hidden_size", 128), "hidden_size|shape"),
    "nan": (lambda t, c, torch: t.__setitem__(LAYER0_UP, torch.full_like(t[LAYER0_UP], float("nan"))),
            f"{LAYER0_UP}.*NaN"),
}


@pytest.mark.parametrize("case", list(BOTTLENECK_CASES))
def test_an_unsound_bottleneck_adapter_is_refused_naming_the_field_or_tensor(case, base_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    import torch

    folder = _bottleneck_adapter(base_model_dir, tmp_path / "adapter")
    registry = open_registry(str(tmp_path / "registry"))
    sound = registry.publish("acme", "sound", folder, base_model=str(base_model_dir), method="bottleneck")
    assert sound.method == "bottleneck" and not sound.servable_by_vllm and "vLLM" in sound.not_servable_reason
    change, message = BOTTLENECK_CASES[case]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    change(tensors, config, torch)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PublishError, match=message):
        registry.publish("acme", "damaged", folder, base_model=str(base_model_dir), method="bottleneck")
    assert registry.search(tenant="acme", adapter="damaged")[1] == 0
