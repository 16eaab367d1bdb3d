"""Gateway overhead: one vLLM server, reached directly and through ``farm gateway``, side by side.

    python jobs/bench/gateway.py [--base-model .farm/base-model] [--requests 64] [--concurrency 8] \
        [--max-tokens 16] [--rounds 5] [--out bench-results/gateway.json]

    further options: [--max-loras 16] [--max-cpu-loras 16] [--startup-timeout 600]
                     [--smoke]  (8 requests, concurrency 2, 1 round, 4 tokens: for the test)

Set-up: the tiny base at ``--base-model`` (built when it has no ``config.json``); 16 real PEFT
LoRA adapters (rank 8, q/v, seeds 1..16, made as ``serving.py`` makes them) published in a
temporary registry (local folder + SQLite) for 4 tenants, 4 each, against the base's absolute
path; one tenant token per tenant. ONE vLLM server (``serving.py``'s: CPU, the registry
resolver, 127.0.0.1, a free port) and the gateway as a separate process
(``python -m farm.cli gateway``, log level warning) with its YAML naming the backend's key
variable (the key itself only in the gateway's environment) and limits too high to refuse.

Every adapter is warmed once directly and once through the gateway (the first request loads
it), then each side runs the plan once unmeasured. Then, ``--rounds`` times, for non-streamed
and streamed ``/v1/completions``, the same plan runs on both sides, one after the other (the
first side alternates by round, so drift touches both alike): ``--requests`` requests,
``--concurrency`` in flight, the 16 adapters round-robin (so tenants interleave), temperature
0, ``--max-tokens`` with ``ignore_eos`` (an answer of another length counts as a failure).
Direct requests carry vLLM's key; gateway requests carry the owning tenant's token.

Reported per mode and side: requests/s, latency p50/p99 (full response; streamed: last byte)
and, streamed, time to the first token. Added latency = gateway percentile minus direct
percentile; throughput ratio = gateway requests/s over direct; the gateway process's user+sys
CPU seconds over its measured runs, per 1,000 requests. Goals (this machine): added p50 under
2 ms, p99 under 10 ms, ratio at least 0.97x. Client, gateway and vLLM share the machine's CPUs,
and p99 of a few hundred requests is close to the maximum: read the p99 as noisy. A benchmark
only reports: exit 0 whether goals are met or not; 1 when a server did not start or any
request failed on either side (the comparison would not hold).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench_common import write_json  # sibling modules (run as a script)
from serving import Server, _environment, _free_port, _load, _pct, ensure_base_model, make_adapters, start_server

TENANTS = ("acme", "globex", "initech", "umbrella")
ADAPTERS_PER_TENANT = 4
GOALS = {"added_p50_ms": 2.0, "added_p99_ms": 10.0, "throughput_ratio": 0.97}
KEY_ENV = "FARM_BENCH_VLLM_KEY"
PROMPTS = ("The customer asked", "Hello, I need help with my order", "Can you reset my password",
           "The delivery arrived damaged and")
MODES = ("non-stream", "stream")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def start_gateway(tmp: Path, base: str, vllm: Server, timeout: float,
                  extra: dict | None = None) -> tuple[Server, str | None]:
    """The gateway in its own process group; (its handle, None or why it is not ready).
    ``extra``: more of the gateway file (the service benchmark adds ``fine_tuning``)."""
    import httpx

    port = _free_port()
    config = {"registry": {"store": str(tmp / "registry")},
              "bases": [{"name": "base", "base_model": base, "served_model_name": "base", "tenants": ["*"],
                         "backends": [{"url": vllm.url, "api_key_env": KEY_ENV}]}],
              "limits": {"default": {"requests_per_minute": 10_000_000, "tokens_per_minute": 1_000_000_000,
                                     "concurrent_requests": 100_000, "max_tokens": 256}}, **(extra or {})}
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "farm.cli", "gateway", "--config", str(tmp / "gateway.yaml"),
            "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, KEY_ENV: vllm.api_key}
    log = tmp / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    gateway = Server(process, f"http://127.0.0.1:{port}", "", log, argv)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{gateway.url}/healthz", timeout=2)
            if answer.status_code == 200 and answer.json().get("status") == "ok":
                return gateway, None
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return gateway, (f"gateway exited with {process.returncode}" if process.poll() is not None
                     else f"gateway not healthy within {timeout:.0f} s")


async def one(client, model: str, token: str, prompt: str, stream: bool, max_tokens: int) -> dict:
    """One completion: latency (last byte), TTFT (streamed), output tokens; errors recorded."""
    body = {"model": model, "prompt": prompt, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    headers = {"Authorization": f"Bearer {token}"}
    start, first, tokens = time.perf_counter(), None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return {"ok": False, "error": f"{model}: {response.status_code} {text[:200]}"}
            if not stream:
                tokens = json.loads(await response.aread())["usage"]["completion_tokens"]
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line[6:].strip() == "[DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and any(c.get("text") for c in chunk.get("choices") or []):
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        tokens = chunk["usage"].get("completion_tokens")
    except Exception as exc:  # noqa: BLE001 - a benchmark records errors, it does not stop
        return {"ok": False, "error": f"{model}: {type(exc).__name__}: {exc}"[:300]}
    end = time.perf_counter()
    if tokens != max_tokens:
        return {"ok": False, "error": f"{model}: {tokens} output tokens, expected {max_tokens}"}
    return {"ok": True, "latency_s": end - start, "ttft_s": (first - start) if first else None}


async def run_load(url: str, plan: list[tuple[str, str, str]], concurrency: int, stream: bool,
                   max_tokens: int) -> dict:
    """``plan`` ((model, token, prompt)) with ``concurrency`` in flight; wall from first to last."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits) as client:
        async def worker():
            while not queue.empty():
                model, token, prompt = queue.get_nowait()
                results.append(await one(client, model, token, prompt, stream, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(plan))))))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "results": results}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def _diff(a, b):
    return None if a is None or b is None else round(a - b, 2)


def side_figures(runs: list[dict]) -> dict:
    results = [r for run in runs for r in run["results"]]
    ok = [r for r in results if r["ok"]]
    wall = sum(run["wall_s"] for run in runs)
    latency, ttft = [r["latency_s"] for r in ok], [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    return {"requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
            "error_samples": [r["error"] for r in results if not r["ok"]][:3], "wall_s": round(wall, 3),
            "requests_per_s": round(len(ok) / wall, 3) if wall else None,
            "latency_p50_ms": _ms(_pct(latency, 0.5)), "latency_p99_ms": _ms(_pct(latency, 0.99)),
            "ttft_p50_ms": _ms(_pct(ttft, 0.5)), "ttft_p99_ms": _ms(_pct(ttft, 0.99)),
            "loadavg": [run["loadavg_after"] for run in runs]}


def report(figures: dict, cpu_per_1000: float | None, args) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(150, Console().width))  # full columns even when piped
    table = Table(title=f"direct vLLM vs through the gateway: 16 adapters of 4 tenants, {args.requests} requests x "
                        f"{args.rounds} round(s) per side, concurrency {args.concurrency}, {args.max_tokens} "
                        f"output tokens, {os.cpu_count()} CPUs")
    for column in ("mode", "side", "ok/requests", "req/s", "p50 ms", "p99 ms", "TTFT p50 ms", "TTFT p99 ms",
                   "added p50 ms", "added p99 ms", "throughput"):
        table.add_column(column, justify="left" if column in ("mode", "side") else "right", no_wrap=True)
    f_ = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    words = {True: "[green]PASS[/green]", False: "[red]MISS[/red]", None: "[yellow]n/a[/yellow]"}
    summary: dict = {}
    for mode in MODES:
        d, g = figures[mode]["direct"], figures[mode]["gateway"]
        ratio = (round(g["requests_per_s"] / d["requests_per_s"], 3)
                 if d["requests_per_s"] and g["requests_per_s"] else None)
        added = {"added_p50_ms": _diff(g["latency_p50_ms"], d["latency_p50_ms"]),
                 "added_p99_ms": _diff(g["latency_p99_ms"], d["latency_p99_ms"]),
                 "added_ttft_p50_ms": _diff(g["ttft_p50_ms"], d["ttft_p50_ms"]),
                 "added_ttft_p99_ms": _diff(g["ttft_p99_ms"], d["ttft_p99_ms"]), "throughput_ratio": ratio}
        met = {key: (None if added[key] is None else
                     added[key] >= goal if key == "throughput_ratio" else added[key] < goal)
               for key, goal in GOALS.items()}
        summary[mode] = {**added, "goals_met": met}
        for side, f in (("direct", d), ("gateway", g)):
            extra = (f_(added["added_p50_ms"]), f_(added["added_p99_ms"]), "-" if ratio is None else f"{ratio:.3f}x") \
                if side == "gateway" else ("", "", "")
            table.add_row(mode, side, f"{f['ok']}/{f['requests']}", f_(f["requests_per_s"]), f_(f["latency_p50_ms"]),
                          f_(f["latency_p99_ms"]), f_(f["ttft_p50_ms"]), f_(f["ttft_p99_ms"]), *extra)
    console.print(table)
    for mode in MODES:
        s, met = summary[mode], summary[mode]["goals_met"]
        console.print(f"{mode}: added p50 {f_(s['added_p50_ms'])} ms {words[met['added_p50_ms']]}, added p99 "
                      f"{f_(s['added_p99_ms'])} ms {words[met['added_p99_ms']]}, throughput "
                      f"{f_(s['throughput_ratio'], 3)}x {words[met['throughput_ratio']]}")
        for side, f in figures[mode].items():
            if f["errors"]:
                console.print(f"[red]{mode} {side}: {f['errors']} failed[/red], e.g. {f['error_samples'][0]}")
    console.print(f"goals: added p50 < {GOALS['added_p50_ms']} ms, added p99 < {GOALS['added_p99_ms']} ms, "
                  f"throughput >= {GOALS['throughput_ratio']}x; gateway CPU (user+sys) per 1,000 requests: "
                  f"{f_(cpu_per_1000, 3)} s")
    peak = max(load[0] for by_side in figures.values() for f in by_side.values() for load in f["loadavg"])
    if peak > (os.cpu_count() or 1):
        console.print(f"[yellow]note: load average reached {peak:.1f} on {os.cpu_count()} CPUs; other processes "
                      "shared the machine, so the figures are noisy[/yellow]")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default=".farm/base-model", help="tiny base model folder (built if missing)")
    parser.add_argument("--requests", type=int, default=64, help="measured requests per side, mode and round")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per request (ignore_eos)")
    parser.add_argument("--rounds", type=int, default=5, help="times both sides run, interleaved")
    parser.add_argument("--max-loras", type=int, default=16, help="adapters in one batch (vLLM --max-loras)")
    parser.add_argument("--max-cpu-loras", type=int, default=16, help="adapters held loaded (vLLM --max-cpu-loras)")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for the servers")
    parser.add_argument("--smoke", action="store_true", help="8 requests, concurrency 2, 1 round, 4 tokens")
    parser.add_argument("--out", default="bench-results/gateway.json", help="JSON result file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.concurrency, args.rounds, args.max_tokens = 8, 2, 1, 4

    load_start = _load()
    print(f"{os.cpu_count()} CPUs, load average {load_start}", flush=True)
    base_dir = ensure_base_model(Path(args.base_model).resolve())
    base = str(base_dir)
    payload: dict = {"benchmark": "gateway", "base_model": base, "goals": GOALS,
                     "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    vllm = gateway = None
    code = 0
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            from farm.registry import open_registry

            folders = make_adapters(base_dir, tmp / "adapters", len(TENANTS) * ADAPTERS_PER_TENANT)
            registry = open_registry(str(tmp / "registry"))
            owned = []  # (serve name, tenant), tenants interleaved: acme, globex, initech, umbrella, acme, ...
            for i, folder in enumerate(folders):
                tenant = TENANTS[i % len(TENANTS)]
                info = registry.publish(tenant, f"a{i // len(TENANTS) + 1}", folder, base_model=base)
                owned.append((info.serve_name, tenant))
            tokens = {t: registry.catalog.create_token(t, label="bench") for t in TENANTS}
            registry.catalog.engine.dispose()
            payload["adapters"] = [name for name, _ in owned]

            vllm = start_server(base, tmp / "registry", tmp / "cache", tmp / "vllm.log", args)
            started = time.perf_counter()
            problem = vllm.wait_ready(args.startup_timeout)
            payload["vllm_startup_s"] = round(time.perf_counter() - started, 1)
            if not problem:
                gateway, problem = start_gateway(tmp, base, vllm, 120)
            if problem:
                log = (gateway or vllm).log_tail()
                print(f"{problem}\n{log}", flush=True)
                payload.update(error=problem, log_tail=log)
                return 1
            print(f"vLLM {vllm.url} ready after {payload['vllm_startup_s']} s; gateway {gateway.url} "
                  f"(pid {gateway.process.pid})", flush=True)

            sides = {"direct": (vllm.url, lambda tenant: vllm.api_key),
                     "gateway": (gateway.url, lambda tenant: tokens[tenant])}
            n = len(owned)  # request i: adapter i mod 16 (round-robin), the same plan on both sides
            plans = {side: [(owned[i % n][0], key(owned[i % n][1]), PROMPTS[(i // n) % len(PROMPTS)])
                            for i in range(args.requests)] for side, (_, key) in sides.items()}
            warm_errors = []
            for side, (url, key) in sides.items():  # the first request of each adapter loads it
                for plan, concurrency in (([(name, key(t), PROMPTS[0]) for name, t in owned], 1),
                                          (plans[side], args.concurrency)):
                    warm = asyncio.run(run_load(url, plan, concurrency, False, args.max_tokens))
                    warm_errors += [f"{side}: {r['error']}" for r in warm["results"] if not r["ok"]]
            payload["warmup_errors"] = warm_errors

            runs = {mode: {"direct": [], "gateway": []} for mode in MODES}
            cpu_total = 0.0
            for round_number in range(1, args.rounds + 1):
                order = ("direct", "gateway") if round_number % 2 else ("gateway", "direct")
                for mode in MODES:
                    for side in order:
                        cpu0 = cpu_seconds(gateway.process.pid)
                        run = asyncio.run(run_load(sides[side][0], plans[side], args.concurrency,
                                                   mode == "stream", args.max_tokens))
                        cpu1 = cpu_seconds(gateway.process.pid)
                        if side == "gateway" and cpu0 is not None and cpu1 is not None:
                            cpu_total += cpu1 - cpu0
                        run["loadavg_after"] = _load()
                        runs[mode][side].append(run)
                        ok = sum(r["ok"] for r in run["results"])
                        print(f"round {round_number} {mode} {side}: {ok}/{len(run['results'])} ok, "
                              f"{run['wall_s']:.2f} s, load {run['loadavg_after'][0]}", flush=True)

            figures = {mode: {side: side_figures(r) for side, r in by_side.items()} for mode, by_side in runs.items()}
            gateway_requests = sum(f["gateway"]["requests"] for f in figures.values())
            cpu_per_1000 = round(1000 * cpu_total / gateway_requests, 3) if gateway_requests else None
            summary = report(figures, cpu_per_1000, args)
            failed = warm_errors or any(f[s]["errors"] for f in figures.values() for s in ("direct", "gateway"))
            if warm_errors:
                print(f"{len(warm_errors)} warm-up request(s) failed, e.g. {warm_errors[0]}", flush=True)
            payload.update(modes={m: {**figures[m], **summary[m]} for m in MODES},
                           gateway_cpu_s=round(cpu_total, 3), gateway_cpu_s_per_1000_requests=cpu_per_1000,
                           failed=bool(failed))
            code = 1 if failed else 0
        finally:
            for server in (gateway, vllm):
                if server is not None:
                    server.stop()
            payload["environment"] = _environment(load_start, _load())
            payload["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_json(payload, args.out)
    return code


if __name__ == "__main__":
    sys.exit(main())
