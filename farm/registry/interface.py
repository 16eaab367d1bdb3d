"""One interface for a registry, local or over HTTP: what the CLI, ``farm serve`` and the vLLM
resolver use, whichever they were given.

``farm.registry.core.Registry`` (store + catalog) and ``farm.registry.client.RegistryClient``
(the HTTP API) both implement ``RegistryAPI`` with the same return types and the same errors
(``NotFound`` for a version that is missing or not the caller's, ``PublishError`` for a refused
publish), so code written against it runs on either.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from farm.registry.core import ReindexReport, VersionInfo


@runtime_checkable
class RegistryAPI(Protocol):
    def resolve(self, reference: str) -> VersionInfo:
        """A serve name (``acme.support.v3``) or alias reference (``acme.support@production``)."""

    def search(self, *, tenant: str | None = None, adapter: str | None = None, base_model: str | None = None,
               method: str | None = None, servable: bool | None = None, served_by: str | None = None,
               alias: str | None = None,
               sweep_id: str | None = None, status: str | None = "active",
               metric_filters: Iterable[tuple[str, str, float]] = (), created_after: datetime | None = None,
               created_before: datetime | None = None, sort: str = "-created_at", limit: int = 50,
               offset: int = 0) -> tuple[list[VersionInfo], int]:
        """A page of versions and the total count (``status=None``: any status)."""

    def download(self, reference: str, destination: Path) -> VersionInfo:
        """Every file of a version into ``destination`` (absent or empty), sha256-checked, atomically."""

    def publish(self, tenant: str, adapter: str, folder: Path, *, base_model: str, **settings) -> VersionInfo:
        """Validate and publish a folder as the next version (``settings``: metrics, training,
        lineage, aliases, base_architecture, method, idempotency_key)."""

    def set_alias(self, tenant: str, adapter: str, alias: str, number: int,
                  note: dict | None = None) -> tuple[int | None, int]:
        """Point an alias at a version: (the version it pointed at before or None, the version);
        ``note`` (why) is kept with the move in the alias history."""

    def alias_history(self, tenant: str, adapter: str, alias: str | None = None) -> list[dict]:
        """Every move of the adapter's aliases (or of ``alias``), oldest first, with its note."""

    def gc(self, older_than_s: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Remove (or list) what crashed publishes left behind."""

    def reindex(self) -> ReindexReport:
        """Rebuild the catalog from the store."""
