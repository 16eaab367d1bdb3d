"""Extras by role: the package alone (no extra) is a registry client and the `farm` command,
without torch, Ray, DeepSpeed, vLLM or a web server. Installed into a fresh venv from this
checkout, from the package index (what `pip install adapter-farm` does on a laptop)."""

from __future__ import annotations

import json
import subprocess
import venv

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow
tomllib = pytest.importorskip("tomllib")  # Python 3.11+

HEAVY = ("torch", "ray", "deepspeed", "transformers", "peft", "vllm", "bitsandbytes", "fastapi", "psycopg")


def test_the_core_package_is_a_registry_client_without_the_training_stack(tmp_path):
    env_dir = tmp_path / "core"
    venv.create(env_dir, with_pip=True)
    python, farm = env_dir / "bin" / "python", env_dir / "bin" / "farm"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(REPO)], capture_output=True,
                             text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    found = subprocess.run([str(python), "-c", "import importlib.util as u, json, sys; "
                            f"print(json.dumps({{m: u.find_spec(m) is not None for m in {HEAVY!r}}}))"],
                           capture_output=True, text=True, timeout=120)
    assert json.loads(found.stdout) == {m: False for m in HEAVY}, found.stdout + found.stderr
    # what a registry client does: open a registry (local store, SQLite catalog), search it, validate a spec
    made = subprocess.run([str(python), "-c", "import sys; from farm.registry import open_registry; "
                           "print(open_registry(sys.argv[1]).search()[1])", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=120)
    assert made.stdout.strip() == "0", made.stdout[-2000:] + made.stderr[-2000:]
    from farm import __version__

    version = subprocess.run([str(farm), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"farm {__version__}", version.stdout + version.stderr
    # the library's entry points: the registry-side ones load here, the training ones say what is missing
    library = subprocess.run([str(python), "-c", "import sys, farm; from farm import load_spec, open_registry; "
                              "print('torch' in sys.modules); farm.train_tenant"], capture_output=True, text=True,
                             timeout=120)
    assert library.stdout.strip() == "False" and "No module named 'torch'" in library.stderr, library.stdout + library.stderr
    listed = subprocess.run([str(farm), "registry", "list", "--store", str(tmp_path / "store"), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
    spec = subprocess.run([str(farm), "spec", "validate", str(REPO / "jobs" / "configs" / "demo.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert spec.returncode == 0 and "ok: " in spec.stdout, spec.stdout[-2000:] + spec.stderr[-2000:]


def test_every_role_is_an_extra_and_all_names_them_all():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    roles = {"train", "baseline", "qlora", "serve", "registry-server", "postgres", "export", "aws"}
    assert roles <= set(extras)
    named = extras["all"][0].split("[", 1)[1].rstrip("]").split(",")
    assert set(named) == roles
    assert ".[all,dev]" in (REPO / "Makefile").read_text()  # make setup installs every role
