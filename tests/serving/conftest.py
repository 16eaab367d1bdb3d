"""Real vLLM servers for the serving tiers, started as ``farm serve --run`` starts them.

``vllm_server`` is ONE server for the whole session (about a minute to start on 2 CPUs),
shared by ``test_vllm.py`` and ``test_gateway.py``; ``start_vllm`` starts others (the gateway
tier's second base). Every server runs ``python -m farm.serving.vllm_server`` on 127.0.0.1 and a
free port, in its own process group, and is stopped by PID group when its fixture ends.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from farm.registry import open_registry
from farm.serving.vllm_command import build_serve_command

from ..conftest import REPO
from ..registry.conftest import make_lora_adapter

PROMPT = "The customer asked"
MAX_TOKENS = 12
STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Billing:
    """A tenant's metered usage as ``farm usage --json`` reports it, from the hour the test began."""

    def __init__(self, gateway, store: Path, tenant: str):
        from farm.registry.catalog import utcnow

        self.gateway, self.store, self.tenant = gateway, store, tenant
        self.since = utcnow().replace(minute=0, second=0, microsecond=0).isoformat()

    def total(self) -> dict:
        """Flush the gateway's meter, then the CLI's totals for the tenant."""
        import json

        from typer.testing import CliRunner

        from farm.cli import app

        self.gateway.meter.flush()
        result = CliRunner().invoke(app, ["usage", "--tenant", self.tenant, "--since", self.since, "--json",
                                          "--store", str(self.store)])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["total"]


def until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos is not None and eos in ids else ids


def peft_greedy(base_model_dir: Path, adapter: Path | None, prompt: str = PROMPT,
                max_tokens: int = MAX_TOKENS) -> tuple[list[int], list[int]]:
    """(prompt ids, new ids) of transformers (+ the adapter: PEFT, or the farm's bottleneck
    implementation) greedy generation in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from farm.models import load_adapter

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    if adapter is not None:
        model = load_adapter(model, adapter)  # PEFT's, or the farm's bottleneck adapters
    model.eval()
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False)
    prompt_ids = encoded["input_ids"][0].tolist()
    return prompt_ids, until_eos(out[0, len(prompt_ids):].tolist(), tokenizer.eos_token_id)


class VllmServer:
    """A running vLLM server, its registry, the adapters published to it, and its log."""

    def __init__(self, url: str, api_key: str, base_model: str, registry, adapters: dict[str, Path],
                 process: subprocess.Popen, log: Path, eos: int | None):
        self.url, self.api_key, self.base_model, self.registry = url, api_key, base_model, registry
        self.adapters, self.process, self.log, self.eos = adapters, process, log, eos
        self.http = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {api_key}"})

    def complete(self, model: str) -> httpx.Response:
        return self.http.post("/v1/completions", json={
            "model": model, "prompt": PROMPT, "temperature": 0, "max_tokens": MAX_TOKENS,
            "return_token_ids": True})

    def greedy(self, model: str) -> tuple[list[int], list[int]]:
        response = self.complete(model)
        assert response.status_code == 200, f"{model}: {response.status_code} {response.text}"
        choice = response.json()["choices"][0]
        return choice["prompt_token_ids"], until_eos(choice["token_ids"], self.eos)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """Stop the server's process group (its engine core and workers too)."""
        self.http.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def launch_vllm(root: Path, base_model: Path, registry_store: Path, served_model_name: str = "base",
                max_lora_rank_of: list[int | None] = (8,)) -> tuple[subprocess.Popen, str, str, Path]:
    """Start one server (not waiting); returns (process, url, api key, log path)."""
    root.mkdir(parents=True, exist_ok=True)
    api_key = secrets.token_urlsafe(24)
    port = free_port()
    command = build_serve_command(
        str(base_model), ranks=list(max_lora_rank_of), registry_env={"FARM_REGISTRY_STORE": str(registry_store)},
        cache_dir=root / "cache", api_key=api_key, port=port, max_loras=2, max_cpu_loras=4, device="cpu",
        served_model_name=served_model_name, max_model_len=2048)  # room for streams long enough to cut mid-way
    log = root / "vllm.log"
    env = {**os.environ, **command.env}
    for name in ("FARM_REGISTRY_URL", "FARM_REGISTRY_TOKEN", "FARM_REGISTRY_CATALOG"):
        env.pop(name, None)  # the plugin must read this test's store
    with log.open("wb") as out:
        process = subprocess.Popen(command.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return process, f"http://127.0.0.1:{port}", api_key, log


def wait_healthy(server: VllmServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"vLLM exited with {server.process.returncode} during start-up:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"vLLM did not answer /health within {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}")
        time.sleep(1)


def start_vllm(root: Path, base_model: Path, registry, adapters: dict[str, Path] | None = None,
               served_model_name: str = "base") -> VllmServer:
    """Start a server for ``base_model`` over ``registry``'s store and wait until it is healthy."""
    from transformers import AutoTokenizer

    process, url, key, log = launch_vllm(root, base_model, Path(registry.store.root), served_model_name)
    server = VllmServer(url, key, str(base_model), registry, adapters or {}, process, log,
                        AutoTokenizer.from_pretrained(base_model).eos_token_id)
    try:
        wait_healthy(server)
    except BaseException:
        server.stop()
        raise
    return server


def co_trained_adapter(base_model_dir: Path, root: Path) -> Path:
    """hooli's adapter from a pack co-trained with acme (rank 8, q/k/v/o, a few strong steps)."""
    from farm.spec import parse_spec
    from farm.train.cotrain import cotrain

    sweep = parse_spec({
        "name": "c", "base_model": {"name_or_path": str(base_model_dir)}, "output_dir": str(root),
        "defaults": {"lora": {"rank": 8, "dropout": 0.0}, "data": {"max_seq_len": 128},
                     "train": {"max_steps": 10, "batch_size": 4, "learning_rate": 3e-2, "checkpoint_every": 100}},
        "tenants": [{"name": n, "data": {"path": str(REPO / "jobs" / "data" / f"{n}.jsonl")}} for n in ("hooli", "acme")]})
    results = cotrain(list(sweep.jobs.values()), slots=2, resume=False)
    return Path(results["hooli"].adapter_dir)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory, base_model_dir):
    """ONE vLLM server for every real-server test of the session, with a registry of adapters."""
    root = tmp_path_factory.mktemp("vllm")
    base = str(base_model_dir)  # what adapters are published against == the server's --model
    registry = open_registry(str(root / "registry"))
    adapters = {}
    for tenant, adapter, seed, rank, aliases in [
            ("acme", "support", 1, 8, ("latest", "production")), ("acme", "support", 2, 8, ("latest",)),
            ("globex", "helpdesk", 3, 8, ("latest",)), ("initech", "small", 5, 4, ("latest",))]:
        folder = make_lora_adapter(base_model_dir, root / f"{tenant}-{adapter}-{seed}", rank=rank, seed=seed)
        info = registry.publish(tenant, adapter, folder, base_model=base, aliases=aliases)
        adapters[info.serve_name] = folder
    assert not registry.resolve("initech.small.v1").servable_by_vllm
    # One adapter of a co-training pack: published and served like any other.
    folder = co_trained_adapter(base_model_dir, root / "cotrain")
    adapters[registry.publish("hooli", "cotrained", folder, base_model=base).serve_name] = folder
    server = start_vllm(root, base_model_dir, registry, adapters)
    try:
        yield server
    finally:
        server.stop()
