"""Tell running vLLM servers that an alias moved, so the next request resolves it again.

vLLM caches an adapter under the name a request used: ``acme.support@production`` keeps
serving the version it first resolved to until ``POST /v1/unload_lora_adapter`` names it.
Serve names (``acme.support.v3``) never need this: their weights never change.

Servers come from ``FARM_VLLM_SERVERS``, a JSON list without secrets::

    [{"url": "http://10.0.0.5:8000", "base_model": "meta-llama/Llama-3.1-8B",
      "api_key_env": "FARM_VLLM_API_KEY"}]

``api_key_env`` names the variable holding that server's API key. Failures are logged, never
raised: an alias move in the registry must not fail because a server is down (a restarted
server has an empty cache anyway).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

logger = logging.getLogger("farm.serving.notify")

SERVERS_ENV = "FARM_VLLM_SERVERS"


@dataclass(frozen=True)
class Server:
    url: str
    base_model: str
    api_key_env: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What one server answered for one name: ``unloaded``, ``not-loaded`` or ``failed``."""

    url: str
    lora_name: str
    result: str
    status: int | None = None
    detail: str = ""


def servers_from_env(env: Mapping[str, str] | None = None) -> list[Server]:
    """The servers ``FARM_VLLM_SERVERS`` lists (empty if unset); bad entries are logged and skipped."""
    env = os.environ if env is None else env
    raw = env.get(SERVERS_ENV)
    if not raw:
        return []
    try:
        entries = json.loads(raw)
        if not isinstance(entries, list):
            raise ValueError("expected a JSON list")
    except ValueError as exc:
        logger.error("%s is not a JSON list of servers: %s", SERVERS_ENV, exc)
        return []
    servers = []
    for entry in entries:
        if (not isinstance(entry, dict) or not isinstance(entry.get("url"), str)
                or not isinstance(entry.get("base_model"), str)
                or not isinstance(entry.get("api_key_env", ""), (str, type(None)))):
            logger.error("%s: skipping %r (needs url, base_model and optionally api_key_env)", SERVERS_ENV, entry)
            continue
        servers.append(Server(entry["url"].rstrip("/"), entry["base_model"], entry.get("api_key_env") or None))
    return servers


def unload_everywhere(lora_names: Iterable[str], base_model: str, *, servers: Iterable[Server] | None = None,
                      env: Mapping[str, str] | None = None, timeout: float = 5.0,
                      transport=None) -> list[Outcome]:
    """Unload ``lora_names`` on every server of ``base_model``; returns what each answered."""
    import httpx

    env = os.environ if env is None else env
    servers = servers_from_env(env) if servers is None else list(servers)
    names = list(lora_names)
    outcomes: list[Outcome] = []
    for server in servers:
        if server.base_model != base_model:
            continue
        headers = {}
        if server.api_key_env:
            key = env.get(server.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            else:
                logger.warning("%s: %s is not set; calling without an API key", server.url, server.api_key_env)
        with httpx.Client(timeout=timeout, transport=transport, headers=headers) as client:
            outcomes += [_unload(client, server.url, name) for name in names]
    return outcomes


def _unload(client, url: str, name: str) -> Outcome:
    import httpx

    try:
        response = client.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name})
    except httpx.HTTPError as exc:
        logger.warning("%s: could not unload %s: %s", url, name, exc)
        return Outcome(url, name, "failed", detail=str(exc))
    if response.is_success:
        logger.info("%s: unloaded %s", url, name)
        return Outcome(url, name, "unloaded", response.status_code)
    if response.status_code in (400, 404):  # not loaded there: nothing to forget
        return Outcome(url, name, "not-loaded", response.status_code, response.text[:500])
    logger.warning("%s: unloading %s answered %s: %s", url, name, response.status_code, response.text[:500])
    return Outcome(url, name, "failed", response.status_code, response.text[:500])


def notify_alias_moved(tenant: str, adapter: str, alias: str, base_model: str, **kwargs) -> list[Outcome]:
    """``tenant.adapter@alias`` moved (or was deleted): servers of ``base_model`` forget it.

    Keyword arguments go to ``unload_everywhere`` (``servers``, ``env``, ``timeout``, ``transport``).
    """
    return unload_everywhere([f"{tenant}.{adapter}@{alias}"], base_model, **kwargs)
