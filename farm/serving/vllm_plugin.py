"""vLLM LoRA resolver backed by the farm registry (entry point ``vllm.general_plugins:farm_registry``).

A request's ``model`` is an immutable serve name (``acme.support.v3``). Alias references
(``acme.support@production``) are refused: vLLM caches an adapter under the name it was asked
for, so an alias would keep its first version after it moved. ``farm gateway`` resolves aliases
per request and sends the serve name. vLLM asks resolvers only when it runs with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``; ``farm.serving.vllm_server`` turns that on and
closes the routes that switch would open.

Environment (read once, when vLLM loads the plugin):

    FARM_REGISTRY_URL + FARM_REGISTRY_TOKEN   the registry's HTTP API (takes precedence), or
    FARM_REGISTRY_STORE [+ FARM_REGISTRY_CATALOG]   the store and catalog directly
    FARM_VLLM_CACHE_DIR       local copies, one folder per serve name (default ~/.cache/farm-vllm)
    FARM_VLLM_MAX_LORA_RANK   the server's --max-lora-rank, to refuse larger adapters clearly

What vLLM 0.32 answers:

    not a registry reference, unknown version  -> None                 -> 404
    an alias reference, other base model, not servable, rank too big,
    tensors not finite or not shaped like the base's modules
                                                 -> AdapterRefused (4xx) -> 400 naming the reason
    found                                        -> LoRARequest at a sha256-checked local copy

The plugin is imported in every vLLM process; nothing heavy is imported at module level and
``register()`` never raises.
"""

from __future__ import annotations

import asyncio
import logging
import os

from farm.serving.resolver import (  # noqa: F401  (AdapterCache, source_from_env: this module's API)
    DEFAULT_CACHE_DIR, AdapterCache, AdapterRefused, FarmResolverCore, cache_dir_from_env, source_from_env)

logger = logging.getLogger("vllm.farm_registry")

#: Entry-point name (what ``VLLM_PLUGINS`` names) and the name the resolver registers under.
PLUGIN_NAME = "farm_registry"
RESOLVER_NAME = "farm-registry"


def _make_resolver(core: FarmResolverCore):
    """The ``LoRAResolver`` subclass, built only inside vLLM (importing vLLM is slow)."""
    from vllm.exceptions import VLLMClientError
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class FarmAdapterRefused(VLLMClientError, AdapterRefused):
        """An ``AdapterRefused`` that vLLM answers with 400 and its message."""

    class FarmRegistryResolver(LoRAResolver):
        def __init__(self, core: FarmResolverCore):
            self.core = core

        async def resolve_lora(self, base_model_name: str, lora_name: str):
            try:
                # The registry is synchronous (SQLAlchemy, httpx, file I/O): off the event loop.
                found = await asyncio.to_thread(self.core.resolve, base_model_name, lora_name)
            except AdapterRefused as exc:
                logger.info("farm registry: refused %s: %s", lora_name, exc)
                raise FarmAdapterRefused(str(exc)) from None
            if found is None:
                return None
            info, folder = found
            logger.info("farm registry: %s -> %s at %s", lora_name, info["serve_name"], folder)
            # vLLM replaces lora_int_id with its own counter; any id >= 1 is accepted here.
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(folder),
                               base_model_name=base_model_name)

    return FarmRegistryResolver(core)


def register() -> None:
    """Entry point: register the resolver. Runs in every vLLM process, maybe twice; never raises."""
    try:
        source = source_from_env()
        if source is None:
            logger.warning("farm registry resolver not registered: set FARM_REGISTRY_URL (+ "
                           "FARM_REGISTRY_TOKEN) or FARM_REGISTRY_STORE")
            return
        from vllm.lora.resolver import LoRAResolverRegistry

        if RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
            return
        rank = os.environ.get("FARM_VLLM_MAX_LORA_RANK")
        core = FarmResolverCore(source, AdapterCache(cache_dir_from_env()), int(rank) if rank else None)
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, _make_resolver(core))
        logger.info("farm registry resolver registered (registry %s, cache %s)", source.where, core.cache.root)
    except Exception:  # a broken plugin must not take the server down
        logger.exception("farm registry resolver could not be registered")
