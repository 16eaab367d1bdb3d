"""Shared fixtures: a tiny offline base model (built once per session), sample data, and the
registry's backends (a real SeaweedFS S3 server and a real PostgreSQL server, one each per session)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from tests.servers import PostgresServer, SeaweedS3Server

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


def pytest_collection_modifyitems(config, items):
    """Mark every test by the real servers it starts (``-m "not postgres"`` and the like; ``make
    test-fast`` runs the tier that starts none). A registry test's backend is a parameter, so
    its servers are not among its fixtures: the parameter says which."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        params = [p for p in getattr(getattr(item, "callspec", None), "params", {}).values() if isinstance(p, str)]
        if "pg_server" in names or any(p.endswith("postgres") for p in params):
            item.add_marker(pytest.mark.postgres)
        if "s3_server" in names or any(p.startswith("s3+") for p in params):
            item.add_marker(pytest.mark.s3)
        if "local_ray" in names:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this module's own: its own temp dir, ports Ray picks, no dashboard;
    ``ray.shutdown()`` stops exactly the processes it started (never a machine-wide stop)."""
    import ray

    assert not ray.is_initialized(), "another test left Ray connected in this process"
    temp_dir = tempfile.mkdtemp(prefix="farm-pk-", dir="/tmp")  # short: Ray's socket paths have a limit
    # The workers import this module (for the worker function) from the checkout.
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_DISABLE_USAGE_STATS", "1")
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=temp_dir,
                 logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": python_path}})
        try:
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


# -- registry backends: shared by the registry, serving and service tiers (one server each per session) --
BACKENDS = ["local+sqlite", "s3+sqlite", "local+postgres"]


@pytest.fixture(scope="session")
def s3_server():
    with SeaweedS3Server() as server:
        yield server


@pytest.fixture(scope="session")
def pg_server():
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=BACKENDS)
def registry_env(request, tmp_path, monkeypatch):
    """(store URI, catalog URL or None) for one backend combination, fresh per test."""
    kind = request.param
    if kind == "local+sqlite":
        return str(tmp_path / "store"), None
    if kind == "s3+sqlite":
        server = request.getfixturevalue("s3_server")
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        return f"s3://{server.bucket}/t-{uuid.uuid4().hex[:10]}", f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    return str(tmp_path / "store"), new_database(request.getfixturevalue("pg_server"))


def new_database(server: PostgresServer) -> str:
    """The URL of a new, empty database on the test PostgreSQL server (one per test)."""
    from sqlalchemy import create_engine, text

    database = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{database}"'))
    admin.dispose()
    return server.url.rsplit("/", 1)[0] + f"/{database}"
