"""Catalog schema migrations (Alembic): an old catalog is refused with the command that upgrades it,
``farm registry migrate`` upgrades it keeping every row, and the result equals a new catalog's schema."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text

from farm.registry.catalog import Catalog, CatalogOutdated, current_revision, head_revision, utcnow

from ..conftest import REPO
from ..conftest import new_database


def _old_catalog(url: str) -> None:
    """A catalog as the releases before migrations made it, with a version, an alias and a token."""
    from alembic import command

    from farm.registry.catalog import _alembic

    engine = create_engine(url)
    with engine.begin() as connection:
        command.upgrade(_alembic(connection), "0001")
        connection.execute(text("DROP TABLE alembic_version"))  # those releases had none
        connection.execute(text("INSERT INTO tenants (id, name, created_at) VALUES (1, 'acme', '2026-11-01')"))
        connection.execute(text("INSERT INTO adapters (id, tenant_id, name, created_at) VALUES (1, 1, 'support', '2026-11-01')"))
        connection.execute(text("INSERT INTO version_numbers (id, adapter_id, number) VALUES (1, 1, 1)"))
        connection.execute(text(
            "INSERT INTO versions (id, adapter_id, number, serve_name, base_model, method, rank, servable_by_vllm, "
            "size_bytes, status, created_at, manifest) VALUES (1, 1, 1, 'acme.support.v1', 'm', 'lora', 8, true, "
            "2147483000, 'active', '2026-11-01T00:00:00+00:00', '{\"tenant\": \"acme\", \"adapter\": \"support\", "
            "\"created_at\": \"2026-11-01T00:00:00+00:00\"}')"))
        connection.execute(text("INSERT INTO aliases (id, adapter_id, name, version_id, updated_at) "
                                "VALUES (1, 1, 'production', 1, '2026-11-01')"))
        connection.execute(text("INSERT INTO api_tokens (token_hash, tenant, label, created_at, revoked) "
                                "VALUES ('abc', 'acme', 'old', '2026-11-01', false)"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def old_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    else:
        url = new_database(request.getfixturevalue("pg_server"))
    _old_catalog(url)
    return url


def test_an_old_catalog_is_refused_then_migrated_keeping_every_row(old_url, tmp_path):
    with pytest.raises(CatalogOutdated, match="farm registry migrate"):
        Catalog(old_url)
    result = subprocess.run([sys.executable, "-m", "farm.cli", "registry", "migrate", "--catalog", old_url,
                             "--store", str(tmp_path / "store")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "from schema revision 0001 (made before migrations) to 0003" in result.stdout
    catalog = Catalog(old_url)
    assert current_revision(catalog.engine) == head_revision() == "0003"
    row = catalog.get_version("acme", "support", alias="production")
    assert row.serve_name == "acme.support.v1" and row.size_bytes == 2147483000
    assert [t.label for t in catalog.list_tokens()] == ["old"]
    token = catalog.create_token("acme", expires_at=utcnow() + timedelta(hours=1))  # the new column works
    assert catalog.principal(token).tenant == "acme"
    # 0003: metered usage counts trained tokens (the fine-tuning service's)
    from farm.registry.catalog import UsageDelta

    catalog.add_usage([UsageDelta("acme", "acme.ft.v1", "base", utcnow().replace(minute=0, second=0, microsecond=0),
                                  trained_tokens=1234)])
    assert catalog.usage(tenant="acme")[0]["trained_tokens"] == 1234
    catalog.engine.dispose()
    again = subprocess.run([sys.executable, "-m", "farm.cli", "registry", "migrate", "--catalog", old_url,
                            "--store", str(tmp_path / "store")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert again.returncode == 0 and "already at schema revision 0003" in again.stdout


def test_the_migrated_schema_equals_a_new_catalogs(old_url):
    """Alembic's own comparison finds nothing between the migrated database and the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from farm.registry.catalog import Base, migrate_catalog

    migrate_catalog(old_url)
    engine = create_engine(old_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    if old_url.startswith("sqlite"):
        # SQLite stores INTEGER and BIGINT alike (64 bits): 0002 leaves that column as it is there
        differences = [d for d in differences if not (isinstance(d, list) and d[0][0] == "modify_type"
                                                      and d[0][2:4] == ("versions", "size_bytes"))]
    engine.dispose()
    assert differences == []


def test_processes_creating_one_new_catalog_at_once_all_open_it(tmp_path):
    """Tables and stamp are one transaction: no opener ever sees a catalog 'from before migrations'."""
    code = ("import sys; from farm.registry.catalog import Catalog; "
            "Catalog(sys.argv[1]).create_token('acme', label=sys.argv[2])")
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    procs = [subprocess.Popen([sys.executable, "-c", code, url, f"p{i}"], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for i in range(6)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [e[-600:] for e in errors]
    assert sorted(t.label for t in Catalog(url).list_tokens()) == [f"p{i}" for i in range(6)]
