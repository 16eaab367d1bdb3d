"""Registry reference -> verified local adapter folder, or a refusal: what every serving backend asks.

``FarmResolverCore`` is shared by the vLLM resolver plugin (``farm.serving.vllm_plugin``) and
the transformers backend (``farm.serving.transformers_server``): the same lookup by immutable
serve name, the same base-model and servability checks, the same sha256-verified local copy,
the same tensor checks against the server's own base. ``backend`` says whose servability
counts: ``vllm`` refuses what vLLM cannot load (with the registry's reason) and ranks above the
server's ``--max-lora-rank``; ``transformers`` serves every method the farm knows.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from farm.registry.interface import RegistryAPI

logger = logging.getLogger("farm.serving.resolver")

DEFAULT_CACHE_DIR = "~/.cache/farm-vllm"


class AdapterRefused(ValueError):
    """The registry has this version, but this server must not serve it (HTTP 400 in vLLM)."""


# -- where versions come from: any RegistryAPI (the registry itself, or its HTTP API) -------------
def source_from_env(env: Mapping[str, str] | None = None) -> Callable[[], "RegistryAPI"] | None:
    """A factory of the registry the environment names (HTTP API first, else a store); None if neither.

    A factory, not the registry: the plugin is loaded in every vLLM process, and only the one
    that resolves adapters should open a catalog or a connection pool.
    """
    env = os.environ if env is None else env
    url, store = env.get("FARM_REGISTRY_URL"), env.get("FARM_REGISTRY_STORE")
    if url:
        token = env.get("FARM_REGISTRY_TOKEN") or None

        def remote():
            from farm.registry.client import RegistryClient

            return RegistryClient(url, token)

        remote.where = url
        return remote
    if store:
        catalog = env.get("FARM_REGISTRY_CATALOG") or None

        def local():
            from farm.registry.core import open_registry

            return open_registry(store, catalog, create=False)

        local.where = store
        return local
    return None


def cache_dir_from_env(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("FARM_VLLM_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser().resolve()


# -- the local cache ------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class AdapterCache:
    """One folder per immutable serve name; reused only when every manifest sha256 matches."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, serve_name: str) -> Path:
        from farm.registry.names import parse_ref

        if parse_ref(serve_name).version is None:  # also refuses anything path-like
            raise ValueError(f"{serve_name!r} is not a serve name")
        return self.root / serve_name

    @staticmethod
    def verified(folder: Path, files: Mapping[str, Mapping[str, Any]]) -> bool:
        if not folder.is_dir() or not files:
            return False
        for name, entry in files.items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != entry.get("size", path.stat().st_size):
                return False
            if _sha256(path) != entry["sha256"]:
                return False
        return True

    def materialize(self, source: "RegistryAPI", info: Mapping[str, Any]) -> Path:
        """A verified local copy of ``info``'s version: reused, or downloaded and renamed in."""
        final = self.path(info["serve_name"])
        if self.verified(final, info["files"]):
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{info['serve_name']}-", dir=self.root))
        try:
            staged = work / "adapter"
            source.download(info["serve_name"], staged)  # by serve name: never an alias that moves
            if not self.verified(staged, info["files"]):
                raise RuntimeError(f"{info['serve_name']}: downloaded files differ from the manifest")
            if final.exists():
                logger.warning("farm registry: replacing a damaged copy of %s", info["serve_name"])
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(staged, final)
            except OSError:  # another process renamed its copy in first
                if not self.verified(final, info["files"]):
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return final


# -- resolving ------------------------------------------------------------------------------------
class FarmResolverCore:
    """Serve name -> (version, verified local adapter folder); None when unknown; ``AdapterRefused``
    when this backend must not serve it."""

    def __init__(self, open_source: Callable[[], "RegistryAPI"], cache: AdapterCache,
                 max_lora_rank: int | None = None, backend: Literal["vllm", "transformers"] = "vllm"):
        self.open_source, self.cache, self.max_lora_rank = open_source, cache, max_lora_rank
        self.backend = backend
        self._source: "RegistryAPI | None" = None
        self._lock = threading.Lock()
        self._checked: set[tuple[str, str]] = set()  # (base, serve name) whose tensors passed

    @property
    def source(self) -> "RegistryAPI":
        """The registry, opened on first use (the plugin is loaded in every vLLM process)."""
        with self._lock:
            if self._source is None:
                self._source = self.open_source()
            return self._source

    def lookup(self, serve: str) -> dict | None:
        """The version a serve name names (``VersionInfo.to_dict()``), or None when unknown."""
        from farm.registry.core import NotFound

        try:
            return self.source.resolve(serve).to_dict()
        except NotFound:
            return None

    def resolve(self, base_model_name: str, lora_name: str) -> tuple[dict, Path] | None:
        """``(version, folder)``; None when unknown; ``AdapterRefused`` when it must not be served."""
        from farm.registry.names import NameError_, parse_ref

        try:
            ref = parse_ref(lora_name)
        except NameError_:
            return None  # not a registry reference: other resolvers, or vLLM's 404
        if ref.version is None:
            raise AdapterRefused(f"{lora_name}: alias references are resolved by farm gateway; "
                                 f"send the version's serve name (tenant.adapter.vN)")
        info = self.lookup(lora_name)
        if info is None:
            return None
        shown = info["serve_name"]
        if info["base_model"] != base_model_name:
            raise AdapterRefused(
                f"adapter {shown} was trained for base model {info['base_model']!r}, "
                f"but this server serves base model {base_model_name!r}")
        if self.backend not in info["servable_by"]:
            shown_backend = {"vllm": "vLLM"}.get(self.backend, self.backend)
            raise AdapterRefused(f"adapter {shown} cannot be served by {shown_backend}: {info['not_servable_reason']}")
        rank = info.get("rank")
        if self.max_lora_rank is not None and rank is not None and rank > self.max_lora_rank:
            raise AdapterRefused(f"adapter {shown} has rank {rank}, above this server's "
                                 f"--max-lora-rank {self.max_lora_rank}; restart it with a larger one")
        folder = self.cache.materialize(self.source, info)
        self._check_weights(base_model_name, shown, folder)
        return info, folder

    def _check_weights(self, base_model_name: str, shown: str, folder: Path) -> None:
        """Finite tensors shaped like this server's base modules, once per serve name."""
        import json

        from farm.registry.tensors import base_module_shapes, check_adapter_weights
        from farm.registry.validate import CONFIG_FILE, WEIGHTS_FILE, PublishError

        key = (base_model_name, folder.name)
        if key in self._checked:
            return
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
            check_adapter_weights(folder / WEIGHTS_FILE, config, base_module_shapes(base_model_name))
        except (PublishError, ValueError, OSError) as exc:
            raise AdapterRefused(f"adapter {shown} cannot be served: {exc}") from None
        self._checked.add(key)
