"""Lineage's code version: a job's working dir arrives without ``.git`` (``ray job submit
--working-dir`` leaves it out), so the version is stamped where the code was taken from."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from ..conftest import REPO

PRINT = "from farm.registry.core import code_version; print(code_version())"


def _version_in(folder, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "FARM_CODE_VERSION"}
    return subprocess.run([sys.executable, "-c", PRINT], cwd=folder, capture_output=True, text=True, check=True,
                          env={**clean, "PYTHONPATH": str(folder), **env}).stdout.strip()


def test_a_checkout_names_its_commit_and_a_working_dir_copy_needs_the_stamp(tmp_path):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    from farm import __version__

    assert _version_in(REPO) == f"{__version__}+{commit}"
    # what a Ray job's working dir holds: the code, no .git
    shutil.copytree(REPO / "farm", tmp_path / "farm", ignore=shutil.ignore_patterns("__pycache__"))
    # no commit to be found there: the copy names its sources' fingerprint instead
    unstamped = _version_in(tmp_path)
    assert unstamped.startswith(f"{__version__}+src.") and len(unstamped) == len(__version__) + 17
    assert _version_in(tmp_path) == unstamped  # the same code, the same value
    (tmp_path / "farm" / "registry" / "core.py").write_text(
        (tmp_path / "farm" / "registry" / "core.py").read_text() + "\n# a local edit\n")
    assert _version_in(tmp_path) != unstamped  # other code, another value
    stamped = f"{__version__}+{commit}"
    assert _version_in(tmp_path, FARM_CODE_VERSION=stamped) == stamped  # what run_demo.sh sends along
    assert _version_in(tmp_path, FARM_CODE_VERSION="x\n" * 80).startswith(f"{__version__}+src.")  # junk is not a version
