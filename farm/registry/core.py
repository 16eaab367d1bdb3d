"""The registry: immutable adapter versions (store) indexed in SQL (catalog).

    registry = open_registry("registry")                       # local folder + SQLite inside it
    registry = open_registry("s3://bucket/farm", "postgresql+psycopg://...")
    info = registry.publish("acme", "support", Path("runs/demo/acme/adapter"),
                            base_model="meta-llama/Llama-3.1-8B", metrics={"eval_loss": 1.2})
    registry.resolve("acme.support.v1"), registry.resolve("acme.support@latest")

Publishing: validate (safetensors only, config schema, vLLM servability) -> allocate the
next number in the catalog -> write the version to the store atomically -> insert the
catalog row. A crash at any point leaves no visible version: an allocated number without
files is a gap, files without a row are adopted by ``reindex``, a temporary folder is removed
by ``gc``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from typing_extensions import (
    TypedDict,  # pydantic needs this one on Python < 3.12 (API schema)
)

from farm.registry import validate
from farm.registry.catalog import Catalog, Principal, VersionRow, utcnow
from farm.registry.names import Ref, check_name, parse_ref, serve_name
from farm.registry.store import Store
from farm.registry.tensors import base_module_shapes, check_adapter_weights


class FileEntry(TypedDict):
    """A stored file's checksum and size, as the manifest records them."""

    sha256: str
    size: int


class NotFound(KeyError):
    """No such version, or one the caller may not see (the two are indistinguishable)."""


@dataclass
class VersionInfo:
    """One version as callers see it (also the HTTP API's response model)."""

    tenant: str
    adapter: str
    version: int
    serve_name: str
    base_model: str
    method: str
    rank: int | None
    servable_by_vllm: bool
    not_servable_reason: str | None
    status: str
    created_at: str
    size_bytes: int
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    method_settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    #: the serving backends that can serve this version, preferred first (``farm.methods.servable_by``);
    #: derived from the method and vLLM's verdict, whose reason ``not_servable_reason`` keeps
    servable_by: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from farm.methods import servable_by

        self.servable_by = servable_by(self.method, self.servable_by_vllm)

    def to_dict(self) -> dict:
        # not asdict(): it deep-copies every manifest, which dominates a search page's cost
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: The largest note an alias move keeps (JSON bytes): a gate's decision with its figures fits.
MAX_NOTE_BYTES = 16 * 2**10


def check_note(note: dict | None) -> dict | None:
    """A JSON object of at most ``MAX_NOTE_BYTES``, or ``ValueError`` saying why not."""
    if note is None:
        return None
    if not isinstance(note, dict):
        raise ValueError("note must be a JSON object")
    try:
        size = len(json.dumps(note, allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"note is not plain JSON: {exc}") from None
    if size > MAX_NOTE_BYTES:
        raise ValueError(f"note is {size} bytes of JSON, more than {MAX_NOTE_BYTES}")
    return note


CODE_VERSION_ENV = "FARM_CODE_VERSION"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The farm's version and the exact code it ran, as lineage records it.

    ``$FARM_CODE_VERSION`` first: stamped where the code was taken from, because a job's
    working dir arrives without ``.git`` (``ray job submit --working-dir`` leaves it out), so
    the job itself cannot ask git; ``jobs/run_demo.sh`` and the image set it. Otherwise the
    package version plus the commit of the checkout this module is in, when it is one; and
    where neither exists (an unstamped working-dir copy), a fingerprint of the farm's own
    source files, ``<version>+src.<sha256 prefix>``: the same code always gives the same value,
    and installed package metadata would describe another copy than the one imported.
    """
    from farm import __version__

    stamped = os.environ.get(CODE_VERSION_ENV, "").strip()
    if stamped and len(stamped) <= 100 and stamped.isprintable():
        return stamped
    package = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=package).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else f"{__version__}+src.{source_fingerprint(package)}"


def source_fingerprint(package: Path) -> str:
    """A short sha256 over the package's Python sources and their relative paths, in order."""
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + b"\0")
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def default_catalog_url(store_uri: str) -> str:
    """SQLite inside a local store; an object store needs an explicit catalog URL."""
    if "://" in store_uri:
        raise ValueError(f"store {store_uri!r} is remote: give a catalog URL (for example PostgreSQL)")
    return f"sqlite:///{Path(store_uri).expanduser().resolve() / 'catalog.sqlite'}"


def open_registry(store_uri: str, catalog_url: str | None = None,
                  on_names_changed: Callable[[list[str], str], None] | None = None,
                  create: bool = True) -> "Registry":
    """A registry over ``store_uri`` (folder or ``s3://``) and ``catalog_url`` (SQLAlchemy URL).

    ``on_names_changed`` subscribes to name changes (see ``Registry``); the registry itself
    knows nothing of serving. ``create=False`` for reads: a missing store or SQLite catalog is
    an error naming the path, never a new empty registry at a mistyped path.
    """
    store = Store(store_uri, create)
    catalog = Catalog(catalog_url or default_catalog_url(store_uri), create)
    return Registry(store, catalog, on_names_changed)


class Registry:
    """Publish, find, alias, archive and delete adapter versions.

    ``on_names_changed(names, base_model)`` is called with request names whose meaning just
    changed (alias refs that moved or vanished, serve names of deleted versions): a hook for
    whoever caches by name. (vLLM never sees an alias: ``farm gateway`` resolves each request.)
    """

    def __init__(self, store: Store, catalog: Catalog,
                 on_names_changed: Callable[[list[str], str], None] | None = None):
        self.store, self.catalog = store, catalog
        self.on_names_changed = on_names_changed

    def _changed(self, names: list[str], base_model: str) -> None:
        if self.on_names_changed is not None and names:
            self.on_names_changed(names, base_model)

    # -- publish -----------------------------------------------------------------------------
    def publish(self, tenant: str, adapter: str, folder: Path | dict[str, Path], *, base_model: str,
                base_architecture: str | None = None, metrics: dict | None = None,
                training: dict | None = None, lineage: dict | None = None,
                aliases: tuple[str, ...] = ("latest",),
                max_file_bytes: int = validate.DEFAULT_MAX_FILE_BYTES,
                detect_architecture: bool = True, method: str | None = None,
                idempotency_key: str | None = None) -> VersionInfo:
        """Validate and publish an adapter folder as the next version of ``tenant/adapter``.

        ``method`` is the PEFT method the trainer used (``farm.methods``); it must agree with
        the adapter's config, and is needed only where the config cannot tell (``qlora``
        saves plain LoRA weights). Default: the method the config shows.

        ``detect_architecture`` reads a local base model's config.json when no architecture
        is given; the HTTP API turns it off (it never reads paths a caller names).

        ``idempotency_key``: a retry with the key of a publish that committed returns that
        version instead of publishing again (a client that lost the answer can retry safely).
        """
        check_name("tenant", tenant)
        check_name("adapter", adapter)
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not 8 <= len(idempotency_key) <= 200:
                raise validate.PublishError("idempotency key: a string of 8-200 characters")
            done = self.catalog.published_with(idempotency_key, tenant, adapter)
            if done is not None:
                return self.get(tenant, adapter, done)
        for alias in aliases:
            check_name("alias", alias)
        validate.check_metadata(base_model=base_model, metrics=metrics or {}, lineage=lineage or {})
        files = folder if isinstance(folder, dict) else validate.folder_files(Path(folder))
        validate.validate_files({name: path.stat().st_size for name, path in files.items()}, max_file_bytes)
        if base_architecture is None and detect_architecture:
            base_architecture = _architecture_of(base_model)
        check = validate.check_config(files[validate.CONFIG_FILE].read_bytes(), base_model, base_architecture,
                                      method)
        # Every tensor finite, named and shaped as the config says (and as the base's modules
        # are, when the base is a local folder this process may read): before any number is taken.
        check_adapter_weights(files[validate.WEIGHTS_FILE], check.config,
                              base_module_shapes(base_model) if detect_architecture else None)
        number = self.catalog.reserve_number(tenant, adapter)
        settings = check.settings
        manifest = {
            "schema": 1, "tenant": tenant, "adapter": adapter, "version": number,
            "serve_name": serve_name(tenant, adapter, number), "created_at": utcnow().isoformat(),
            "base_model": base_model, "base_architecture": base_architecture,
            "method": check.method, "method_settings": settings,
            "servable_by_vllm": check.servable_by_vllm, "not_servable_reason": check.not_servable_reason,
            "metrics": dict(metrics or {}), "training": dict(training or {}),
            "lineage": {"code_version": code_version(), **(lineage or {})},
        }
        validate.parse_manifest({**manifest, "files": {}}, tenant, adapter, number)  # what reindex will accept
        manifest = self.store.write_version(tenant, adapter, number, files, manifest)
        size = sum(entry["size"] for entry in manifest["files"].values())
        try:
            self.catalog.add_version(tenant, adapter, number, manifest, size, move_aliases=aliases,
                                     idempotency_key=idempotency_key)
        except BaseException as exc:
            # All or nothing: a version the catalog could not take leaves no files behind.
            self.store.delete_version(tenant, adapter, number)
            if isinstance(exc, Exception) and idempotency_key is not None:
                done = self.catalog.published_with(idempotency_key, tenant, adapter)
                if done is not None:  # a concurrent retry with the same key committed first
                    return self.get(tenant, adapter, done)
            raise
        for alias in aliases:
            self._record(tenant, adapter, kind="alias", alias=alias, version=number, by="publish")
        self._changed([f"{tenant}.{adapter}@{alias}" for alias in aliases], base_model)
        return self.get(tenant, adapter, number)

    def _record(self, tenant: str, adapter: str, **record) -> None:
        """Append a state record to the store, so that reindex can restore what the catalog holds."""
        self.store.append_record(tenant, adapter, {**record, "at": utcnow().isoformat()})

    # -- read --------------------------------------------------------------------------------
    def _info(self, row: VersionRow, aliases: list[str] | None = None) -> VersionInfo:
        manifest = row.manifest
        tenant, adapter = manifest["tenant"], manifest["adapter"]
        return VersionInfo(
            tenant=tenant, adapter=adapter, version=row.number, serve_name=row.serve_name,
            base_model=row.base_model, method=row.method, rank=row.rank,
            servable_by_vllm=row.servable_by_vllm, not_servable_reason=row.not_servable_reason,
            status=row.status, created_at=manifest["created_at"], size_bytes=row.size_bytes,
            metrics=manifest.get("metrics", {}), lineage=manifest.get("lineage", {}),
            training=manifest.get("training", {}), method_settings=manifest.get("method_settings", {}),
            files=manifest.get("files", {}),
            aliases=aliases if aliases is not None else self.catalog.aliases_of(row.id))

    def get(self, tenant: str, adapter: str, number: int | None = None, alias: str | None = None,
            principal: Principal | None = None) -> VersionInfo:
        """One version by number or alias; ``NotFound`` also when the principal may not see it."""
        if principal is not None and not principal.is_admin and principal.tenant != tenant:
            raise NotFound(str(Ref(tenant, adapter, number, alias)))  # same answer as a missing one
        row = self.catalog.get_version(tenant, adapter, number=number, alias=alias)
        if row is None:
            raise NotFound(str(Ref(tenant, adapter, number, alias)))
        return self._info(row)

    def resolve(self, reference: str, principal: Principal | None = None) -> VersionInfo:
        """A serve name (``acme.support.v3``) or alias reference (``acme.support@production``)."""
        ref = parse_ref(reference)
        return self.get(ref.tenant, ref.adapter, ref.version, ref.alias, principal)

    def search(self, principal: Principal | None = None, **filters) -> tuple[list[VersionInfo], int]:
        """Catalog search (see ``Catalog.search``); a tenant principal sees only itself."""
        if principal is not None and not principal.is_admin:
            if filters.get("tenant") not in (None, principal.tenant):
                return [], 0
            filters["tenant"] = principal.tenant
        rows, total = self.catalog.search(**filters)
        aliases = self.catalog.aliases_for([row.id for row in rows])
        return [self._info(row, aliases[row.id]) for row in rows], total

    def iter_file(self, info: VersionInfo, name: str):
        """Stream a file of a version (names come from its manifest only)."""
        if name not in info.files:
            raise NotFound(f"{info.serve_name} has no file {name!r}")
        return self.store.iter_file(info.tenant, info.adapter, info.version, name)

    def download(self, reference: str, destination: Path, principal: Principal | None = None) -> VersionInfo:
        """Copy a version into ``destination`` (absent or empty) with every sha256 checked.

        Written into a temporary folder beside it and renamed at the end: ``destination`` is
        complete or absent. Always by serve name, so an alias moving meanwhile changes nothing.
        """
        destination = Path(destination)
        if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
            raise FileExistsError(f"{destination} exists and is not an empty folder")
        info = self.resolve(reference, principal)
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
        try:
            self.store.download(info.tenant, info.adapter, info.version, tmp)
            if destination.exists():
                destination.rmdir()
            os.rename(tmp, destination)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return info

    # -- aliases and lifecycle ---------------------------------------------------------------
    def set_alias(self, tenant: str, adapter: str, alias: str, number: int,
                  principal: Principal | None = None, note: dict | None = None) -> tuple[int | None, int]:
        """Point an alias at a version; returns (previous version or None, new version).

        ``note`` (a small JSON object: why, for example an eval gate's decision and figures)
        is kept with the move in the adapter's alias history (``alias_history``)."""
        check_name("alias", alias)
        note = check_note(note)
        self._writable(tenant, principal)
        try:
            previous, number = self.catalog.set_alias(tenant, adapter, alias, number)
        except KeyError:
            raise NotFound(serve_name(tenant, adapter, number)) from None
        self._record(tenant, adapter, kind="alias", alias=alias, version=number, previous=previous,
                     **({"note": note} if note is not None else {}))
        if previous not in (None, number):
            self._changed([f"{tenant}.{adapter}@{alias}"], self.get(tenant, adapter, number).base_model)
        return previous, number

    def alias_history(self, tenant: str, adapter: str, alias: str | None = None,
                      principal: Principal | None = None) -> list[dict]:
        """Every move of the adapter's aliases (or of ``alias``), oldest first: ``{alias,
        version (None: removed), previous, at, note}``. ``NotFound`` for an adapter the
        principal may not see, as for one that does not exist."""
        if (principal is not None and not principal.is_admin and principal.tenant != tenant) or \
                not self.catalog.has_adapter(tenant, adapter):
            raise NotFound(f"{tenant}.{adapter}")
        return [{"alias": r.get("alias"), "version": r.get("version"), "previous": r.get("previous"),
                 "at": r.get("at"), "note": r.get("note")}
                for r in self.store.records(tenant, adapter)
                if r.get("kind") == "alias" and (alias is None or r.get("alias") == alias)]

    def delete_alias(self, tenant: str, adapter: str, alias: str, principal: Principal | None = None) -> int:
        self._writable(tenant, principal)
        try:
            number = self.catalog.delete_alias(tenant, adapter, alias)
        except KeyError:
            raise NotFound(f"{tenant}.{adapter}@{alias}") from None
        self._record(tenant, adapter, kind="alias", alias=alias, version=None, previous=number)
        self._changed([f"{tenant}.{adapter}@{alias}"], self.get(tenant, adapter, number).base_model)
        return number

    def archive(self, tenant: str, adapter: str, number: int, principal: Principal | None = None) -> None:
        """Hide a version from default searches and drop its aliases; files stay."""
        self._writable(tenant, principal)
        before = self.get(tenant, adapter, number)
        try:
            self.catalog.set_status(tenant, adapter, number, "archived")
        except KeyError:
            raise NotFound(serve_name(tenant, adapter, number)) from None
        self._record(tenant, adapter, kind="status", version=number, status="archived")
        self._changed([f"{tenant}.{adapter}@{a}" for a in before.aliases], before.base_model)

    def delete(self, tenant: str, adapter: str, number: int, principal: Principal | None = None) -> None:
        """Delete a version: its catalog row first (it vanishes at once), then its files.

        The number is never reused, so the serve name never comes to mean other weights.
        """
        self._writable(tenant, principal)
        try:
            before = self.get(tenant, adapter, number)
            self.catalog.delete_version(tenant, adapter, number)
        except KeyError:
            raise NotFound(serve_name(tenant, adapter, number)) from None
        self.store.delete_version(tenant, adapter, number)
        self._changed([before.serve_name] + [f"{tenant}.{adapter}@{a}" for a in before.aliases],
                      before.base_model)

    @staticmethod
    def _writable(tenant: str, principal: Principal | None) -> None:
        if principal is not None and not principal.is_admin and principal.tenant != tenant:
            raise NotFound(tenant)

    # -- maintenance -------------------------------------------------------------------------
    def gc(self, older_than_s: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Remove what crashed publishes left: incomplete version folders and upload spools.

        Returns what was (or with ``dry_run`` would be) removed.
        """
        orphans = self.store.orphans(older_than_s)
        uploads = self.store.stale_uploads(older_than_s)
        if not dry_run:
            for path in orphans:
                self.store.remove(path)
            for folder in uploads:
                shutil.rmtree(folder, ignore_errors=True)
        return orphans + [str(folder) for folder in uploads]

    def reindex(self) -> "ReindexReport":
        """Rebuild the catalog's versions, statuses and aliases from the store.

        Everything is read and parsed first; then the catalog is replaced in one transaction,
        so a failure leaves it as it was. A version folder, manifest or record that does not
        parse is skipped and reported (path and reason), never deleted. Aliases and statuses
        come back from the store's append-only state records; an adapter without records (from
        before they existed) gets ``latest`` on its newest version.
        """
        scan = self.store.scan()
        skipped = list(scan.skipped)
        present: dict[tuple[str, str], dict[int, dict]] = {}
        for stored in scan.versions:
            try:
                validate.parse_manifest(stored.manifest, stored.tenant, stored.adapter, stored.version)
            except validate.PublishError as exc:
                skipped.append((self.store.version_dir(stored.tenant, stored.adapter, stored.version), str(exc)))
                continue
            present.setdefault((stored.tenant, stored.adapter), {})[stored.version] = stored.manifest
        rows, aliases = [], {}
        for key, versions in sorted(present.items()):
            status, pointers = _replay(versions, scan.records.get(key, []))
            aliases[key] = pointers
            for number, manifest in sorted(versions.items()):
                size = sum(entry["size"] for entry in manifest["files"].values())
                rows.append((*key, number, manifest, size, status.get(number, "active")))
        self.catalog.rebuild(rows, aliases, scan.taken)
        return ReindexReport(versions=len(rows), skipped=[{"path": p, "reason": r} for p, r in skipped])


@dataclass(frozen=True)
class ReindexReport:
    """What reindex restored, and what it skipped (path and reason) without touching it."""

    versions: int
    skipped: list[dict[str, str]]


def _replay(versions: dict[int, dict], records: list[dict]) -> tuple[dict[int, str], dict[str, int]]:
    """Statuses and alias pointers of one adapter, from its records in time order.

    The same rules as the live catalog: ``latest`` moved by a publish only moves forward; an
    archived version loses its aliases; an alias whose version was deleted is gone.
    """
    status: dict[int, str] = {}
    pointers: dict[str, int] = {}
    for record in records:
        version, alias = record.get("version"), record.get("alias")
        if record.get("kind") == "status" and isinstance(version, int) and isinstance(record.get("status"), str):
            status[version] = record["status"]
            if record["status"] != "active":
                pointers = {a: v for a, v in pointers.items() if v != version}
        elif record.get("kind") == "alias" and isinstance(alias, str):
            if version is None or version not in versions or status.get(version, "active") != "active":
                pointers.pop(alias, None)
            elif record.get("by") == "publish" and alias == "latest" and pointers.get(alias, 0) > version:
                continue
            else:
                pointers[alias] = version
    if versions and not any(r.get("alias") == "latest" for r in records):
        # versions published before state records existed: latest was their newest
        active = [n for n in versions if status.get(n, "active") == "active"]
        if active:
            pointers["latest"] = max(active)
    return status, pointers


def _architecture_of(base_model: str) -> str | None:
    """The architecture named in a local base model's config.json (None if unknown here)."""
    config = Path(base_model).expanduser() / "config.json"
    if config.is_file():
        try:
            architectures = json.loads(config.read_text()).get("architectures") or [None]
            return architectures[0]
        except (OSError, ValueError):
            return None
    return None
