"""The OpenAI fine-tuning job request, as the farm reads it: every field checked, every error
naming its field, and a request turned into the farm's own job settings."""

from __future__ import annotations

import pytest

from farm.service.requests import AUTO_EPOCHS, RequestError, read_request
from farm.spec import parse_spec


@pytest.fixture
def defaults(base_model_dir):
    raw = {"name": "service", "base_model": {"name_or_path": str(base_model_dir)},
           "defaults": {"train": {"max_steps": 60, "batch_size": 8, "learning_rate": 2e-4}},
           "tenants": [{"name": "template", "data": {"path": "x.jsonl"}}]}
    return parse_spec(raw).job("template").settings


def _body(**fields):
    return {"model": "tiny", "training_file": "file-abc", **fields}


def test_a_farm_method_with_its_settings_and_openai_hyperparameters(defaults):
    request = read_request(_body(suffix="support", seed=3, metadata={"team": "support"}, method={
        "type": "lora", "lora": {"rank": 16, "target_modules": ["q_proj", "v_proj"],
                                 "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 5}}}))
    settings = request.settings(defaults, train_rows=30)
    assert settings.method == "lora" and settings.lora.rank == 16 and settings.lora.target_modules == ["q_proj", "v_proj"]
    assert settings.train.max_steps == 15  # 2 epochs x 30 rows / 4 per step
    assert settings.train.batch_size == 4 and settings.train.seed == 3
    assert settings.train.learning_rate == pytest.approx(1e-3)
    assert request.suffix == "support"


def test_supervised_and_auto_keep_the_service_defaults(defaults):
    # OpenAI's own shape, as its client sends it: supervised, auto everywhere
    request = read_request(_body(method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto"}}}))
    settings = request.settings(defaults, train_rows=1000)
    assert settings.method == "lora" and settings.train.batch_size == 8
    assert settings.train.max_steps == 60  # auto epochs stop at the service's max_steps
    small = request.settings(defaults, train_rows=10)
    assert small.train.max_steps == 4 == -(-AUTO_EPOCHS * 10 // 8) and small.train.batch_size == 8  # 3 x 10 rows / 8
    # the deprecated top-level hyperparameters still count
    old = read_request(_body(hyperparameters={"n_epochs": 1, "batch_size": 5})).settings(defaults, train_rows=20)
    assert old.train.max_steps == 4 and old.train.batch_size == 5
    # another method, its own settings class
    ia3 = read_request(_body(method={"type": "ia3", "ia3": {}})).settings(defaults, train_rows=20)
    assert ia3.method == "ia3"


@pytest.mark.parametrize("body, param, words", [
    (_body(method={"type": "dpo", "dpo": {}}), "method.type", "supervised adapters"),
    (_body(method={"type": "lora", "lora": {"rank": 0}}), "method.lora.rank", "greater than"),
    (_body(method={"type": "lora", "lora": {"hyperparameters": {"n_epochs": 0}}}),
     "method.lora.hyperparameters.n_epochs", "1 to 1024"),
    (_body(method={"type": "lora", "lora": {"hyperparameters": {"n_epochs": 2}}}, hyperparameters={"n_epochs": 1}),
     "hyperparameters", "given twice"),
    (_body(method={"type": "lora", "ia3": {}}), "method.ia3", "unknown field"),
    (_body(method={"type": "supervised", "supervised": {"rank": 8}}), "method.supervised.rank", "unknown field"),
    (_body(surprise=1), "surprise", "unknown field"),
    (_body(suffix="Bad Name"), "suffix", "registry name"),
    (_body(suffix="x" * 65), "suffix", "registry name"),
    (_body(integrations=[{"type": "wandb", "wandb": {"project": "p"}}]), "integrations", "not offered"),
    (_body(metadata={f"k{i}": "v" for i in range(17)}), "metadata", "16 keys"),
    (_body(seed=-1), "seed", "greater than or equal"),
    ({"model": 5, "training_file": "f"}, "model", "valid string"),
    ({"training_file": "f"}, "model", "required"),
])
def test_bad_requests_name_their_field(defaults, body, param, words):
    with pytest.raises(RequestError) as caught:
        read_request(body).settings(defaults, train_rows=10)
    assert caught.value.param == param and words in str(caught.value), str(caught.value)
    assert str(caught.value).startswith(param)


def test_a_body_that_is_not_an_object_is_refused():
    with pytest.raises(RequestError, match="JSON object"):
        read_request(["model", "tiny"])
