"""Spec validation: good specs resolve, bad ones name the failing key's path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from farm.spec import SpecError, load_spec, parse_spec

from .conftest import REPO


def test_demo_preset_validates_and_merges_overrides():
    sweep = load_spec(REPO / "jobs" / "configs" / "demo.yaml")
    assert set(sweep.jobs) == {"acme", "globex", "initech", "umbrella", "hooli"}
    # initech overrides rank and alpha; everyone else keeps the defaults
    assert sweep.job("initech").settings.lora.rank == 16
    assert sweep.job("initech").settings.lora.alpha == 32
    assert sweep.job("acme").settings.lora.rank == 8
    # the override is merged, not replacing: initech keeps the default targets
    assert sweep.job("initech").settings.lora.target_modules == "all-linear"
    # relative paths are resolved against the spec file, not the current directory
    assert sweep.job("acme").settings.data.path == str(REPO / "jobs" / "data" / "acme.jsonl")
    assert sweep.spec.base_model.name_or_path == str(REPO / ".farm" / "base-model")


def _raw(**tenant_extra):
    return {"name": "s", "base_model": {"name_or_path": "org/model"},
            "tenants": [{"name": "a", "data": {"path": "a.jsonl"}},
                        {"name": "b", "data": {"path": "b.jsonl"}},
                        {"name": "c", "data": {"path": "c.jsonl"}, **tenant_extra}]}


@pytest.mark.parametrize("extra, expected", [
    ({"lora": {"rank": "eight"}}, 'tenants[2].lora.rank: expected int, got "eight"'),
    ({"lora": {"rnak": 8}}, "tenants[2].lora.rnak: unknown key"),
    ({"train": {"learning_rate": -1}}, "tenants[2].train.learning_rate: Input should be greater than 0"),
    ({"data": {"path": "c.jsonl", "format": "csv"}}, "tenants[2].data.format:"),
    ({"data": {"format": "chat"}}, "tenants[2].data.path: required key is missing"),
    ({"method": "lorax"}, "tenants[2].method:"),
    ({"lora": {"target_modules": []}}, "tenants[2].lora.target_modules:"),
])
def test_bad_tenant_keys_are_named_by_path(extra, expected):
    with pytest.raises(SpecError) as info:
        parse_spec(_raw(**extra))
    assert expected in str(info.value)


def test_top_level_problems_are_all_reported_at_once():
    raw = {"name": "Bad Name", "base_model": {}, "defaults": {"train": {"max_steps": 0}},
           "tenants": [{"name": "../evil", "data": {}}, {"name": "ok", "data": {}, "colour": 1}]}
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    problems = info.value.problems
    text = "\n".join(problems)
    assert "name: 'Bad Name' is not a valid sweep name" in text
    assert "base_model.name_or_path: required key is missing" in text
    assert "defaults.train.max_steps:" in text
    assert "tenants[0].name:" in text and "'../evil'" in text
    assert "tenants[1].colour: unknown key" in text
    assert len(problems) == 5


def test_duplicate_tenants_and_non_mapping_are_refused(tmp_path):
    raw = _raw()
    raw["tenants"][1]["name"] = "a"
    with pytest.raises(SpecError, match="tenant 'a' appears more than once"):
        parse_spec(raw)
    bad = tmp_path / "list.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(bad)
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")


def test_cli_validate_exit_codes(tmp_path):
    good = subprocess.run([sys.executable, "-m", "farm.cli", "spec", "validate",
                           str(REPO / "jobs" / "configs" / "demo.yaml")], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "5 tenants" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\nbase_model: {name_or_path: m}\ntenants:\n"
                   "  - {name: a, data: {path: a.jsonl}, lora: {rank: many}}\n")
    result = subprocess.run([sys.executable, "-m", "farm.cli", "spec", "validate", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert 'tenants[0].lora.rank: expected int, got "many"' in result.stderr


def test_command_line_overrides_reach_the_spec_and_bad_ones_name_themselves(tmp_path):
    from farm.spec import load_spec, parse_overrides
    from farm.sweep_command import parse_args

    overrides = parse_overrides(["defaults.train.max_steps=7", "defaults.lora.target_modules=[q_proj, v_proj]",
                                 "defaults.train.learning_rate=3.0e-4", "baseline.workers=2", "name=night"])
    assert overrides == {"defaults": {"train": {"max_steps": 7, "learning_rate": 3e-4},
                                      "lora": {"target_modules": ["q_proj", "v_proj"]}},
                         "baseline": {"workers": 2}, "name": "night"}
    sweep = load_spec(REPO / "jobs/configs/demo.yaml",
                      parse_overrides(["defaults.train.max_steps=7", "defaults.train.learning_rate=3e-4"]))
    assert {(job.settings.train.max_steps, job.settings.train.learning_rate) for job in sweep.jobs.values()} == {
        (7, 3e-4)}  # YAML reads 3e-4 as text; the spec's float field takes it
    for bad, message in (("max_steps", "expected KEY=VALUE"), ("a..b=1", "expected KEY=VALUE"),
                         ("x=[1, 2", "not valid YAML")):
        with pytest.raises(ValueError, match=message):
            parse_overrides([bad])
    with pytest.raises(SpecError, match=r"defaults\.train\.max_stepz"):
        load_spec(REPO / "jobs/configs/demo.yaml", parse_overrides(["defaults.train.max_stepz=7"]))
    assert parse_args(["--config", "s.yaml", "defaults.train.max_steps=3"]).overrides == ["defaults.train.max_steps=3"]
