"""The ``farm`` command line's shared contract (``farm.cli_common``): ``--json`` prints only JSON
on stdout, and exit codes mean the same everywhere (0 done, 1 the work failed or a check found
problems, 2 the command was called wrongly)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from farm.cli import app

from .conftest import REPO

BAD_SPEC = "name: s\nbase_model: {name_or_path: m}\ntenants:\n  - {name: a, data: {path: a.jsonl}, lora: {rank: many}}\n"


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_json_output_is_json_alone():
    spec = _run("spec", "validate", str(REPO / "jobs/configs/demo.yaml"), "--json")
    assert spec.exit_code == 0, spec.output
    assert {t["tenant"] for t in json.loads(spec.stdout)["tenants"]} >= {"acme", "globex"}
    cluster = _run("cluster", "validate", str(REPO / "cluster/serving.yaml"), "--json")
    assert cluster.exit_code == 0, cluster.output
    assert json.loads(cluster.stdout) == [{"file": str(REPO / "cluster/serving.yaml"), "kind": "kubernetes",
                                           "ok": True, "problems": []}]
    plan = _run("plan", "--model", "llama-3.1-8b", "--method", "lora", "--gpu", "80GB", "--json")
    assert plan.exit_code == 0 and json.loads(plan.stdout)["fits"] is True


def test_exit_codes_mean_the_same_everywhere(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_SPEC)
    # a check that finds problems in what it checks: 1
    checked = _run("spec", "validate", str(bad))
    assert checked.exit_code == 1 and 'tenants[0].lora.rank: expected int, got "many"' in checked.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: RayCluster\napiVersion: ray.io/v1\nmetadata: {name: x}\nspec: {}\n")
    assert _run("cluster", "validate", str(broken), "--json").exit_code == 1
    # the same spec as the input of work, an unknown tenant, a bad flag or reference: 2
    assert _run("train", "--spec", str(bad), "--tenant", "a").exit_code == 2
    unknown = _run("train", "--spec", str(REPO / "jobs/configs/demo.yaml"), "--tenant", "nobody")
    assert unknown.exit_code == 2 and "nobody" in unknown.stderr
    assert _run("plan", "--model", "no-such-model").exit_code == 2
    assert _run("registry", "list", "--served-by", "ollama", "--store", str(tmp_path / "r")).exit_code == 2
    store = tmp_path / "registry"
    from farm.registry import open_registry

    open_registry(str(store))
    missing = _run("registry", "show", "acme.nothing.v1", "--store", str(store))
    assert missing.exit_code == 2 and "not found" in missing.stderr
    export = _run("export", "merged", "acme.nothing.v1", "--out", str(tmp_path / "m"), "--store", str(store), "--json")
    assert export.exit_code == 2 and export.stdout == ""  # errors go to stderr, never into the JSON stream
    # the work itself failing: 1 (a plan that does not fit)
    assert _run("plan", "--model", "llama-3.1-8b", "--method", "full", "--gpu", "80GB").exit_code == 1
