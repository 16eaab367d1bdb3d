"""``farm registry``: serve, search, show, promote, download and publish adapter versions.

    farm registry token create --admin                 # the first admin token (straight on the catalog)
    FARM_REGISTRY_ADMIN_TOKEN=... farm registry serve --port 8700
    export FARM_REGISTRY_URL=http://127.0.0.1:8700 FARM_REGISTRY_TOKEN=...
    farm registry list --adapter support --metric 'eval_loss<=3.5' --sort metric:eval_loss
    farm registry show acme.support@latest
    farm registry promote acme.support.v3 --alias production
    farm registry download acme.support@production --out adapters/acme-support

Commands talk to a server when ``--url`` (or ``FARM_REGISTRY_URL``) is set, and otherwise open
the registry directly from ``--store`` / ``--catalog`` (``FARM_REGISTRY_STORE``,
``FARM_REGISTRY_CATALOG``; default store ``.farm/registry``), with admin rights. Output is a
table; ``--json`` prints JSON for scripts.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict
import os
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from farm.cli_common import EXIT_BAD_INPUT, EXIT_FAILED, console, err_console, fail, json_option, print_json

registry_app = typer.Typer(help="The adapter registry: serve, search, promote, download, publish.",
                           no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
registry_app.add_typer(token_app, name="token")

DEFAULT_STORE = ".farm/registry"
#: An admin token chosen by the operator must carry at least 128 bits: 32 hex characters.
MIN_ADMIN_TOKEN_CHARS = 32


# -- shared options ------------------------------------------------------------------------------
def _url_option():
    return typer.Option(None, "--url", envvar="FARM_REGISTRY_URL", help="registry server URL (else: direct)")


def _token_option():
    return typer.Option(None, "--token", envvar="FARM_REGISTRY_TOKEN", help="bearer token for --url",
                        show_default=False)


def _store_option():
    return typer.Option(DEFAULT_STORE, "--store", envvar="FARM_REGISTRY_STORE",
                        help="store: a local folder or s3://bucket/prefix (direct mode)")


def _catalog_option():
    return typer.Option(None, "--catalog", envvar="FARM_REGISTRY_CATALOG",
                        help="catalog SQLAlchemy URL (default: SQLite inside a local store)")


# -- the registry: a server (HTTP) or the registry itself, one interface ---------------------------
def _backend(url: str | None, token: str | None, store: str, catalog: str | None, create: bool = False):
    """The server at ``url``, else the registry itself (created only when ``create``: publish).

    Both are ``farm.registry.interface.RegistryAPI``: the commands below do not care which.
    """
    if url:
        from farm.registry.client import RegistryClient

        return RegistryClient(url, token)
    from farm.registry.core import open_registry

    return open_registry(store, catalog, create=create)


def _guarded(action):
    """Run ``action()``; known registry errors become one red line and the exit code of
    ``farm.cli_common`` (2 for a refused request, a missing reference, a bad value; 1 otherwise)."""
    import httpx

    from farm.registry.catalog import CatalogOutdated
    from farm.registry.client import RegistryError
    from farm.registry.core import NotFound

    try:
        return action()
    except RegistryError as exc:  # the server refused the request (4xx), or failed (5xx)
        fail(f"registry answered {exc.status}: {exc.detail}", EXIT_BAD_INPUT if exc.status < 500 else EXIT_FAILED)
    except NotFound as exc:
        fail(f"not found: {exc.args[0] if exc.args else exc}", EXIT_BAD_INPUT)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:  # PublishError, NameError_, bad filters
        fail(str(exc), EXIT_BAD_INPUT)
    except CatalogOutdated as exc:  # the catalog needs `farm registry migrate`: not this call's fault
        fail(str(exc))
    except httpx.HTTPError as exc:
        fail(f"could not reach the registry: {exc}")


# -- rendering --------------------------------------------------------------------------------------
def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _metrics_text(metrics: dict) -> str:
    parts = []
    for key, value in sorted(metrics.items()):
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts)


def _versions_table(items: list[dict]) -> Table:
    table = Table("serve name", "method", "rank", "served by", "status", "aliases", "created", "size", "metrics")
    for item in items:
        table.add_row(item["serve_name"], item["method"], str(item["rank"] or ""),
                      ", ".join(item.get("servable_by") or []) or "[yellow]none[/yellow]",
                      item["status"], ", ".join(item["aliases"]), item["created_at"][:19].replace("T", " "),
                      _size(item["size_bytes"]), _metrics_text(item["metrics"]))
    return table


def _show_version(info: dict) -> None:
    table = Table("field", "value", show_header=False)
    for key in ("serve_name", "tenant", "adapter", "version", "base_model", "method", "rank",
                "servable_by", "servable_by_vllm", "not_servable_reason", "status", "created_at", "size_bytes", "aliases"):
        value = info.get(key)
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    for key in ("metrics", "training", "lineage", "method_settings"):
        if info.get(key):
            table.add_row(key, json.dumps(info[key], sort_keys=True))
    console.print(table)
    files = Table("file", "size", "sha256")
    for name, entry in sorted(info.get("files", {}).items()):
        files.add_row(name, _size(entry["size"]), entry["sha256"])
    console.print(files)


# -- commands ----------------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _catalog_has_admin(catalog) -> bool:
    return catalog.has_admin_token()


def _catalog_add_admin(catalog, token: str) -> None:
    catalog.add_token(token, None, label="FARM_REGISTRY_ADMIN_TOKEN")


@registry_app.command("serve")
def serve_cmd(
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(8700, help="port to bind"),
    store: str = _store_option(),
    catalog: Optional[str] = _catalog_option(),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="allow binding a non-loopback address"),
    max_upload_mb: int = typer.Option(2048, help="largest publish request, MiB"),
) -> None:
    """Run the query API (OpenAPI at /docs). Needs an admin token to exist first."""
    from farm.registry.api import serve
    from farm.registry.core import open_registry

    if not _is_loopback(host) and not allow_remote:
        fail(f"refusing to bind {host}: the API would be reachable from other machines; "
              "pass --allow-remote (and put TLS in front of it)", EXIT_BAD_INPUT)
    registry = _guarded(lambda: open_registry(store, catalog))
    env_token = os.environ.get("FARM_REGISTRY_ADMIN_TOKEN")
    if env_token and len(env_token) < MIN_ADMIN_TOKEN_CHARS:
        fail(f"FARM_REGISTRY_ADMIN_TOKEN has {len(env_token)} characters; an admin token needs at least "
              f"{MIN_ADMIN_TOKEN_CHARS} (128 bits as hex: openssl rand -hex 16), or use `farm registry token "
              "create --admin`", code=2)
    if env_token:
        known = registry.catalog.principal(env_token)
        if known is None:
            _catalog_add_admin(registry.catalog, env_token)
        elif not known.is_admin:
            fail("FARM_REGISTRY_ADMIN_TOKEN is a tenant token, not an admin token", EXIT_BAD_INPUT)
    elif not _catalog_has_admin(registry.catalog):
        fail("the catalog has no admin token: run `farm registry token create --admin` first, "
              "or set FARM_REGISTRY_ADMIN_TOKEN")
    err_console.print(f"registry API on http://{host}:{port} (docs at /docs), store {store}")
    serve(registry, host=host, port=port, max_upload_bytes=max_upload_mb * 2**20)


@registry_app.command("list")
def list_cmd(
    tenant: Optional[str] = typer.Option(None, help="only this tenant (admin)"),
    adapter: Optional[str] = typer.Option(None, help="only this adapter"),
    base_model: Optional[str] = typer.Option(None, help="only this base model"),
    method: Optional[str] = typer.Option(None, help="only this PEFT method (lora, dora, ...)"),
    servable: Optional[bool] = typer.Option(None, "--servable/--not-servable", help="servable by vLLM"),
    served_by: Optional[str] = typer.Option(None, "--served-by", help="a backend that can serve it: vllm or transformers"),
    alias: Optional[str] = typer.Option(None, help="only versions an alias points at"),
    sweep_id: Optional[str] = typer.Option(None, help="only this sweep"),
    status: str = typer.Option("active", help="active, archived or any"),
    metric: Optional[list[str]] = typer.Option(None, help="NAME<op>VALUE, repeatable (eval_loss<=3.5)"),
    created_after: Optional[str] = typer.Option(None, help="ISO time"),
    created_before: Optional[str] = typer.Option(None, help="ISO time"),
    sort: str = typer.Option("-created_at", help="created_at, version or metric:<name>; '-' descending"),
    limit: int = typer.Option(50, min=1, max=500),
    offset: int = typer.Option(0, min=0),
    as_json: bool = json_option(),
    url: Optional[str] = _url_option(), token: Optional[str] = _token_option(),
    store: str = _store_option(), catalog: Optional[str] = _catalog_option(),
) -> None:
    """Search versions."""
    if status not in ("active", "archived", "any"):
        fail(f"--status {status!r}: use active, archived or any", EXIT_BAD_INPUT)
    if served_by not in (None, "vllm", "transformers"):
        fail(f"--served-by {served_by!r}: use vllm or transformers", code=2)
    from farm.registry.names import parse_metric_filter

    def search() -> dict:
        filters = dict(
            tenant=tenant, adapter=adapter, base_model=base_model, method=method, servable=servable,
            served_by=served_by, alias=alias,
            sweep_id=sweep_id, status=None if status == "any" else status,
            metric_filters=[parse_metric_filter(m) for m in metric or []],
            created_after=datetime.fromisoformat(created_after) if created_after else None,
            created_before=datetime.fromisoformat(created_before) if created_before else None,
            sort=sort, limit=limit, offset=offset)
        items, total = _backend(url, token, store, catalog).search(**filters)
        return {"items": [item.to_dict() for item in items], "total": total, "limit": limit, "offset": offset}

    result = _guarded(search)
    if as_json:
        print_json(result)
        return
    console.print(_versions_table(result["items"]))
    shown = len(result["items"])
    console.print(f"{shown} of {result['total']} (offset {result['offset']})", highlight=False)


@registry_app.command("show")
def show_cmd(ref: str = typer.Argument(..., help="tenant.adapter.vN or tenant.adapter@alias"),
             as_json: bool = json_option(),
             url: Optional[str] = _url_option(), token: Optional[str] = _token_option(),
             store: str = _store_option(), catalog: Optional[str] = _catalog_option()) -> None:
    """Show one version."""
    info = _guarded(lambda: _backend(url, token, store, catalog).resolve(ref).to_dict())
    if as_json:
        print_json(info)
    else:
        _show_version(info)


@registry_app.command("promote")
def promote_cmd(ref: str = typer.Argument(..., help="the version to promote (serve name or alias ref)"),
                alias: str = typer.Option("production", help="alias to point at it"),
                if_better: bool = typer.Option(False, "--if-better", help="only if it passes the promotion gate: "
                                               "every behaviour check of its spec at --min-pass-rate, and an eval loss "
                                               "beating the alias's current version's by --min-improvement, both "
                                               "scored now on its held-out data"),
                min_improvement: Optional[float] = typer.Option(None, help="with --if-better: the share by which its eval loss must be lower (default: its spec's eval.promote, else 0)"),
                min_pass_rate: Optional[float] = typer.Option(None, help="with --if-better: each check's lowest pass rate (default: its spec's eval.promote, else 0.9)"),
                as_json: bool = json_option(),
                url: Optional[str] = _url_option(), token: Optional[str] = _token_option(),
                store: str = _store_option(), catalog: Optional[str] = _catalog_option()) -> None:
    """Point an alias (default: production) at a version; with --if-better, only when it passes
    the gate (exit 1 and the reason when it does not: the version stays published, unpromoted)."""
    backend = _guarded(lambda: _backend(url, token, store, catalog))
    if if_better:
        _promote_if_better(backend, ref, alias, min_improvement, min_pass_rate, as_json)
        return

    def promote() -> dict:
        from farm.registry.names import serve_name

        info = backend.resolve(ref)
        previous, number = backend.set_alias(info.tenant, info.adapter, alias, info.version)
        return {"alias": alias, "version": number, "previous": previous,
                "serve_name": serve_name(info.tenant, info.adapter, number)}

    result = _guarded(promote)
    if as_json:
        print_json(result)
        return
    tenant_adapter = result["serve_name"].rsplit(".", 1)[0]
    was = f"v{result['previous']}" if result["previous"] is not None else "unset"
    console.print(f"{tenant_adapter}@{alias} -> [bold]v{result['version']}[/bold] (was {was})")


def _promote_if_better(backend, ref: str, alias: str, min_improvement: Optional[float],
                       min_pass_rate: Optional[float], as_json: bool) -> None:
    from pydantic import ValidationError

    from farm.quality import job_of_version, promote_if_better
    from farm.spec import PromotionSpec

    def gate() -> PromotionSpec:
        declared = job_of_version(backend.resolve(ref)).settings.eval.promote
        values = {**(declared.model_dump() if declared else {}), "alias": alias}
        values.update({k: v for k, v in (("min_improvement", min_improvement), ("min_pass_rate", min_pass_rate))
                       if v is not None})
        try:
            return PromotionSpec.model_validate(values)
        except ValidationError as exc:
            fail("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()), code=2)

    result = _guarded(lambda: promote_if_better(backend, ref, _guarded(gate)))
    if as_json:
        print_json(result)
    else:
        table = Table("check", "adapter", "current", title=f"{result['serve_name']} @{alias}")
        for check in result.get("checks", []):
            current = "" if check["incumbent"] is None else f"{check['incumbent']:.0%}"
            table.add_row(escape(check["check"]), f"{check['adapter']:.0%}", current)
        loss = result.get("eval_loss", {})
        if loss:
            current = "" if loss.get("incumbent") is None else f"{loss['incumbent']:.4f}"
            table.add_row("eval loss", f"{loss['adapter']:.4f}", current)
        if result["decision"] != "unchanged":
            console.print(table)
        colour = {"promoted": "green", "held": "red"}.get(result["decision"], "cyan")
        console.print(f"[{colour}]{result['decision']}[/{colour}]: {escape(result['reason'])}")
    if result["decision"] == "held":
        raise typer.Exit(1)


@registry_app.command("history")
def history_cmd(adapter_ref: str = typer.Argument(..., help="tenant.adapter"),
                alias: Optional[str] = typer.Option(None, help="only this alias's moves"),
                as_json: bool = json_option(),
                url: Optional[str] = _url_option(), token: Optional[str] = _token_option(),
                store: str = _store_option(), catalog: Optional[str] = _catalog_option()) -> None:
    """Every move of an adapter's aliases, oldest first, with why (a gate's decision and figures
    when `farm sweep` or `promote --if-better` made it)."""
    tenant, dot, adapter = adapter_ref.partition(".")
    if not dot or "." in adapter:
        fail(escape(f"{adapter_ref!r}: expected tenant.adapter"), code=2)
    backend = _guarded(lambda: _backend(url, token, store, catalog))
    events = _guarded(lambda: backend.alias_history(tenant, adapter, alias))
    if as_json:
        print_json(events)
        return
    table = Table("at", "alias", "version", "was", "why", title=f"{adapter_ref}: alias history")
    for event in events:
        note = event.get("note") or {}
        why = note.get("reason") or ""
        if note.get("decision"):
            why = f"{note['decision']} by {note.get('by', '?')}: {why}"
        version = "removed" if event["version"] is None else f"v{event['version']}"
        was = "" if event.get("previous") is None else f"v{event['previous']}"
        table.add_row(escape(str(event.get("at") or "")), escape(event["alias"] or ""), version, was, escape(why))
    console.print(table)


@registry_app.command("download")
def download_cmd(ref: str = typer.Argument(..., help="serve name or alias ref"),
                 out: Path = typer.Option(..., "--out", help="folder to create (must be absent or empty)"),
                 as_json: bool = json_option(),
                 url: Optional[str] = _url_option(), token: Optional[str] = _token_option(),
                 store: str = _store_option(), catalog: Optional[str] = _catalog_option()) -> None:
    """Download a version's files (every sha256 checked)."""
    info = _guarded(lambda: _backend(url, token, store, catalog).download(ref, out).to_dict())
    if as_json:
        print_json({"serve_name": info["serve_name"], "path": str(out), "files": sorted(info["files"])})
        return
    console.print(f"{info['serve_name']} -> [bold]{out}[/bold] ({len(info['files'])} files, "
                  f"{_size(info['size_bytes'])})")


@registry_app.command("publish")
def publish_cmd(
    folder: Path = typer.Argument(..., help="adapter folder (adapter_config.json + adapter_model.safetensors)"),
    tenant: str = typer.Option(..., help="tenant name"),
    adapter: str = typer.Option(..., help="adapter name"),
    base_model: str = typer.Option(..., help="base model the adapter was trained on"),
    base_architecture: Optional[str] = typer.Option(None, help="e.g. LlamaForCausalLM"),
    method: Optional[str] = typer.Option(None, help="PEFT method the trainer used (needed for qlora); "
                                                    "default: what adapter_config.json shows"),
    metrics: Optional[str] = typer.Option(None, help='JSON object, e.g. \'{"eval_loss": 1.2}\''),
    training: Optional[str] = typer.Option(None, help="JSON object"),
    lineage: Optional[str] = typer.Option(None, help="JSON object"),
    alias: Optional[list[str]] = typer.Option(None, help="aliases to point at it (default: latest)"),
    as_json: bool = json_option(),
    url: Optional[str] = _url_option(), token: Optional[str] = _token_option(),
    store: str = _store_option(), catalog: Optional[str] = _catalog_option(),
) -> None:
    """Validate and publish an adapter folder as the next version."""
    if not folder.is_dir():
        fail(f"{folder} is not a folder", EXIT_BAD_INPUT)
    parsed: dict[str, dict | None] = {}
    for key, raw in (("metrics", metrics), ("training", training), ("lineage", lineage)):
        try:
            parsed[key] = json.loads(raw) if raw else None
        except ValueError as exc:
            fail(f"--{key}: not valid JSON ({exc})", EXIT_BAD_INPUT)
        if parsed[key] is not None and not isinstance(parsed[key], dict):
            fail(f"--{key}: expected a JSON object", EXIT_BAD_INPUT)
    info = _guarded(lambda: _backend(url, token, store, catalog, create=True).publish(
        tenant, adapter, folder, base_model=base_model, base_architecture=base_architecture, method=method,
        aliases=tuple(alias) if alias else ("latest",), **parsed).to_dict())
    if as_json:
        print_json(info)
        return
    servable = f"served by {', '.join(info['servable_by'])}"
    if not info["servable_by_vllm"]:
        servable += f"; not by vLLM: {info['not_servable_reason']}"
    console.print(f"published [bold]{info['serve_name']}[/bold] ({servable}; aliases: "
                  f"{', '.join(info['aliases']) or 'none'})")


@registry_app.command("gc")
def gc_cmd(older_than_s: float = typer.Option(3600.0, "--older-than-s", help="only leftovers older than this"),
           dry_run: bool = typer.Option(False, "--dry-run", help="list, do not remove"),
           as_json: bool = json_option(),
           url: Optional[str] = _url_option(), token: Optional[str] = _token_option(),
           store: str = _store_option(), catalog: Optional[str] = _catalog_option()) -> None:
    """Remove incomplete folders left by crashed publishes."""
    result = _guarded(lambda: {"removed": _backend(url, token, store, catalog).gc(older_than_s, dry_run),
                               "dry_run": dry_run})
    if as_json:
        print_json(result)
        return
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(result['removed'])} incomplete folder(s)")
    for path in result["removed"]:
        console.print(f"  {path}", highlight=False)


@registry_app.command("migrate")
def migrate_cmd(store: str = _store_option(), catalog: Optional[str] = _catalog_option(),
                as_json: bool = json_option()) -> None:
    """Upgrade the catalog's schema to this release (back it up first); a no-op when current."""
    from farm.registry.catalog import migrate_catalog
    from farm.registry.core import default_catalog_url

    url = _guarded(lambda: catalog or default_catalog_url(store))
    before, after = _guarded(lambda: migrate_catalog(url))
    if as_json:
        print_json({"before": before, "after": after, "migrated": before != after})
        return
    if before == after:
        console.print(f"catalog already at schema revision {after}")
    else:
        console.print(f"catalog migrated from schema revision {before or '0001 (made before migrations)'} to {after}")


@registry_app.command("reindex")
def reindex_cmd(as_json: bool = json_option(),
                url: Optional[str] = _url_option(), token: Optional[str] = _token_option(),
                store: str = _store_option(), catalog: Optional[str] = _catalog_option()) -> None:
    """Rebuild the catalog's versions, statuses and aliases from the store (one transaction).

    What does not parse is skipped and listed, never deleted; the rest is restored.
    """
    result = _guarded(lambda: asdict(_backend(url, token, store, catalog).reindex()))
    if as_json:
        print_json(result)
        return
    console.print(f"reindexed {result['versions']} version(s)")
    for item in result.get("skipped", []):
        err_console.print(f"[yellow]skipped[/yellow] {item['path']}: {item['reason']}", highlight=False, markup=True)


def _parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:].lower()
    try:
        seconds = float(number) * units[unit]
    except (KeyError, ValueError):
        raise ValueError(f"--expires-in {text!r}: use a number and a unit, e.g. 90s, 30m, 12h, 7d") from None
    if not 0 < seconds < 100 * 365 * 86400:
        raise ValueError(f"--expires-in {text!r}: must be positive and under 100 years")
    return seconds


def _direct_catalog(store: str, catalog: Optional[str], create: bool = False):
    """The catalog itself (token commands work on it, not through a server)."""
    from farm.registry.catalog import Catalog
    from farm.registry.core import default_catalog_url

    if catalog is None and "://" not in store:
        if create:
            Path(store).expanduser().mkdir(parents=True, exist_ok=True)  # the SQLite file lives inside
        elif not (Path(store).expanduser() / "catalog.sqlite").is_file():
            fail(f"no catalog in {store} (give --store or --catalog)", code=2)
    return _guarded(lambda: Catalog(catalog or default_catalog_url(store)))


@token_app.command("create")
def token_create(tenant: Optional[str] = typer.Option(None, help="a token that sees only this tenant"),
                 admin: bool = typer.Option(False, "--admin", help="an admin token (sees every tenant)"),
                 label: str = typer.Option("", help="note stored with the token"),
                 expires_in: Optional[str] = typer.Option(None, help="valid for this long: 90s, 30m, 12h, 7d"),
                 as_json: bool = json_option(),
                 store: str = _store_option(), catalog: Optional[str] = _catalog_option()) -> None:
    """Create an API token (directly on the catalog); it is printed once, only its hash is kept."""
    from datetime import timedelta

    from farm.registry.catalog import utcnow
    from farm.registry.names import check_name

    if admin == (tenant is not None):
        fail("give exactly one of --tenant T or --admin", EXIT_BAD_INPUT)
    if tenant is not None:
        _guarded(lambda: check_name("tenant", tenant))
    expires_at = None
    if expires_in is not None:
        expires_at = utcnow() + timedelta(seconds=_guarded(lambda: _parse_duration(expires_in)))
    catalog_obj = _direct_catalog(store, catalog, create=True)
    value = catalog_obj.create_token(None if admin else tenant, label=label, expires_at=expires_at)
    if as_json:
        print_json({"token": value, "tenant": tenant, "admin": admin, "label": label,
                     "expires_at": expires_at.isoformat() if expires_at else None})
        return
    console.print(f"{'admin' if admin else 'tenant ' + tenant} token (shown once, store it now):", highlight=False)
    print(value)


@token_app.command("list")
def token_list(as_json: bool = json_option(),
               store: str = _store_option(), catalog: Optional[str] = _catalog_option()) -> None:
    """List tokens: id, tenant (or admin), label, created, expires, revoked (never the token)."""
    from dataclasses import asdict

    tokens = _direct_catalog(store, catalog).list_tokens()
    if as_json:
        print_json([asdict(t) for t in tokens])
        return
    table = Table("id", "tenant", "label", "created", "expires", "revoked")
    for t in tokens:
        table.add_row(str(t.id), t.tenant or "(admin)", t.label, f"{t.created_at:%Y-%m-%d %H:%M}",
                      f"{t.expires_at:%Y-%m-%d %H:%M}" if t.expires_at else "", "yes" if t.revoked else "")
    console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: int = typer.Argument(..., help="the id `token list` shows"),
                 store: str = _store_option(), catalog: Optional[str] = _catalog_option(),
                 as_json: bool = json_option()) -> None:
    """Revoke a token: refused by the registry API and the gateway from their next cache refresh."""
    if not _direct_catalog(store, catalog).revoke_token(token_id):
        fail(f"no token with id {token_id}", EXIT_BAD_INPUT)
    if as_json:
        print_json({"id": token_id, "revoked": True})
        return
    console.print(f"token {token_id} revoked")


# -- exports (work on the store directly: they need the files and the base model) --------------
export_app = typer.Typer(help="Export a registry version: merged model, or GGUF for Ollama.",
                         no_args_is_help=True)


@export_app.command("merged")
def export_merged_cmd(ref: str = typer.Argument(..., help="serve name or alias ref"),
                      out: Path = typer.Option(..., help="new folder for the merged model"),
                      store: str = _store_option(), catalog: Optional[str] = _catalog_option(),
                      as_json: bool = json_option()) -> None:
    """Write base + adapter merged into a standalone transformers model folder."""
    from farm.registry.core import open_registry
    from farm.serving.export import export_merged

    info, folder = _guarded(lambda: export_merged(open_registry(store, catalog, create=False), ref, out))
    if as_json:
        print_json({"serve_name": info.serve_name, "base_model": info.base_model, "folder": str(folder)})
        return
    console.print(f"{info.serve_name} merged into {info.base_model} -> {folder}")


@export_app.command("ollama")
def export_ollama_cmd(ref: str = typer.Argument(..., help="serve name or alias ref"),
                      out: Path = typer.Option(..., help="new folder for the GGUF adapter and Modelfile"),
                      base: str = typer.Option(..., "--base", help="the base as Ollama loads it: a GGUF file of the "
                                               "base model (llama.cpp's convert_hf_to_gguf.py writes one), or an "
                                               "Ollama model name (llama3.2:1b)"),
                      store: str = _store_option(), catalog: Optional[str] = _catalog_option(),
                      as_json: bool = json_option()) -> None:
    """Write the adapter as a GGUF LoRA plus a Modelfile (FROM <base>, ADAPTER ./<file>.gguf)."""
    from farm.registry.core import open_registry
    from farm.serving.export import export_gguf

    info, gguf_path, modelfile = _guarded(lambda: export_gguf(open_registry(store, catalog, create=False), ref, out,
                                                              base))
    if as_json:
        print_json({"serve_name": info.serve_name, "gguf": str(gguf_path), "modelfile": str(modelfile)})
        return
    console.print(f"{info.serve_name} -> {gguf_path} and {modelfile}")
