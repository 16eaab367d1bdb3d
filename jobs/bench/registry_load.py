"""Registry load: serving reads over HTTP against a catalog of 10,000 versions in 500 tenants.

    python jobs/bench/registry_load.py [--tenants 500] [--versions 10000] [--requests 2000] \
        [--clients 8] [--catalog sqlite|URL] [--out bench-results/registry_load.json]

What it measures: the latency of the reads a serving fleet and its operators make, against a
catalog the size of a busy farm, through the real HTTP API (``farm.registry.api.create_app``
under uvicorn, one worker process, on 127.0.0.1). It does not measure publishing.

Populating (fast, so the run takes minutes, not hours):

  1. one tiny real LoRA adapter folder is written (``adapter_model.safetensors`` with q_proj and
     v_proj ``lora_A``/``lora_B`` tensors, ``adapter_config.json`` with peft_type LORA, r 8);
  2. the first adapters (``--publish`` versions, a few hundred) go through ``Registry.publish``
     (validation, store write, catalog insert, ``latest`` moved); its throughput is reported;
  3. every other version is written straight into the catalog in bulk (tenant, adapter,
     number, version, metric and alias rows, with manifests shaped like the published ones and
     random ``eval_loss_after``), so ``--versions`` versions across ``--tenants`` tenants exist:
     ``--adapters`` adapters per tenant, the versions spread evenly over them, a ``latest``
     alias on each adapter and a ``production`` alias on every third. Those bulk versions have
     no files in the store (the reads measured here never touch the store; a file download
     of one would answer 404).

The store is a temporary folder; the catalog is SQLite inside it (``--catalog sqlite``, the
default) or the SQLAlchemy URL given (``--catalog postgresql+psycopg://...``): the database
must hold no tenants, adapters or versions yet; the rows the benchmark adds are deleted at the
end (its tokens too), unless ``--keep-catalog``.

The API runs in a subprocess (uvicorn, 1 worker, log level warning so no access log) with an
admin token and one tenant token per client created in the catalog. ``--clients`` threads,
each with its own keep-alive ``httpx.Client``, then run these mixes one after another, each
after ``--warmup`` unmeasured requests, ``--requests`` measured requests split among the clients:

  healthz        GET /healthz: the floor (HTTP stack and clients only, no catalog); no goal
  get            GET /v1/versions/{serve_name} for random existing serve names (admin token)
  search         GET /v1/versions?tenant=<random>&metric=eval_loss_after<=X
                 &sort=metric:eval_loss_after&limit=20, X random in [1.0, 3.0] (admin token)
  search-tenant  the same page with each client's tenant token and no tenant parameter
                 (the token scopes the search)
  search-all     the same metric filter and sort across all tenants (admin; the worst case)

Reported per mix: p50, p95, p99 and max latency as the client sees it (queueing in the one
server process included), requests/s, errors (non-200 answers and transport errors), mean
items per page, the server's mean time per request (its Prometheus histogram, taken in the
ASGI middleware, so waiting for the thread pool and the GIL counts) and its CPU time per
request (the cost of one request, whatever the queueing). Also, in this process and without
HTTP: SQL statements and milliseconds per ``Registry.resolve`` and per ``Registry.search``
page, which separate the catalog's cost from the HTTP layer's. Goals: p99 under 50 ms for a get and under 200 ms for a
search page, on 2 CPUs (client and server share them). The load average is recorded before
and after every mix: other work on the machine shows there. Missed latency goals are reported,
not failed; the benchmark exits 1 when a side fails: a mix with errors (non-200 answers or
transport errors) or a reindex that skipped versions it should have indexed.

``--smoke``: a catalog of 40 versions in 4 tenants, 40 requests per mix from 2 clients, a
reindex of 20: checks that every part still runs (the test tier runs it).

Reindex (``--reindex-versions``, default ``--versions``; 0 skips it): that many versions are
written to a store of their own (files, manifests, a ``production`` alias record per adapter)
and ``Registry.reindex`` rebuilds an empty catalog from them; its time is reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GET_GOAL_MS = 50.0
SEARCH_GOAL_MS = 200.0
BASE_MODEL = "meta-llama/Llama-3.1-8B"
BASE_ARCHITECTURE = "LlamaForCausalLM"
OTHER_BASE_MODELS = ("Qwen/Qwen2.5-7B-Instruct", "mistralai/Mistral-7B-v0.3")
ADAPTER_NAMES = ("support", "summarize", "sql", "triage", "classify", "extract", "translate", "faq",
                 "routing", "tone", "redact", "search")
METRIC = "eval_loss_after"
PAGE_SIZE = 20
TOKEN_LABEL = "registry_load bench"
MIXES = ("healthz", "get", "search", "search-tenant", "search-all")
ROUTES = {"healthz": "/healthz", "get": "/v1/versions/{ref}", "search": "/v1/versions",
          "search-tenant": "/v1/versions", "search-all": "/v1/versions"}

SERVER_CODE = r"""
import sys
import uvicorn
from farm.registry.api import create_app
from farm.registry.core import open_registry

store, catalog, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
app = create_app(open_registry(store, catalog))
uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning", access_log=False)
"""


# -- helpers ---------------------------------------------------------------------------------


from bench_common import write_json  # noqa: E402  (sibling module; run as a script)

def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), ``q`` in [0, 100]."""
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _write_tiny_adapter(folder: Path, rank: int = 8, hidden: int = 64, layers: int = 2) -> Path:
    """A small but real PEFT LoRA adapter folder (safetensors + adapter_config.json)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(layers):
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=generator) * 0.02
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 16,
              "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "bias": "none",
              "base_model_name_or_path": BASE_MODEL, "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


# -- the catalog's contents ------------------------------------------------------------------


def _layout(tenants: int, versions: int, adapters_per_tenant: int) -> list[tuple[str, str, int]]:
    """(tenant, adapter, version count) for every adapter; the counts add up to ``versions``."""
    adapters = [(f"tenant-{t:04d}", ADAPTER_NAMES[a % len(ADAPTER_NAMES)] + ("" if a < len(ADAPTER_NAMES)
                                                                            else f"-{a}"))
                for t in range(tenants) for a in range(adapters_per_tenant)]
    base, extra = divmod(versions, len(adapters))
    return [(tenant, adapter, base + (1 if i < extra else 0)) for i, (tenant, adapter) in enumerate(adapters)]


def _metadata(rng: random.Random, tenant: str, adapter: str, number: int) -> dict:
    """Metrics, training settings and lineage of one version (what a sweep would record)."""
    after = round(rng.uniform(0.6, 3.2), 4)
    return {
        "metrics": {"eval_loss_before": round(after + rng.uniform(0.2, 1.5), 4), METRIC: after,
                    "train_loss": round(after * rng.uniform(0.8, 1.0), 4), "train_tokens": rng.randint(10**5, 10**7),
                    "train_seconds": round(rng.uniform(30, 3600), 1)},
        "training": {"steps": rng.choice((200, 500, 1000)), "learning_rate": rng.choice((1e-4, 2e-4, 5e-4)),
                     "batch_size": rng.choice((4, 8, 16)), "grad_accum": rng.choice((1, 2, 4)),
                     "seed": rng.randint(0, 2**31 - 1), "precision": "bf16"},
        "lineage": {"sweep_id": f"sweep-{tenant}-{(number - 1) // 2 + 1}",
                    "dataset_fingerprint": f"{rng.getrandbits(64):016x}",
                    "spec": f"jobs/configs/{tenant}.yaml", "tenant_spec_hash": f"{rng.getrandbits(64):016x}"},
    }


def _publish_real(registry, layout, budget: int, adapter_dir: Path, rng: random.Random) -> tuple[dict, set]:
    """Publish whole adapters through ``Registry.publish`` until ``budget`` versions are done."""
    done, latencies, published = 0, [], set()
    files = {p.name: p for p in adapter_dir.iterdir() if p.is_file()}
    started = time.perf_counter()
    for tenant, adapter, count in layout:
        if done + count > budget and done > 0:
            break
        for number in range(1, count + 1):
            meta = _metadata(rng, tenant, adapter, number)
            t0 = time.perf_counter()
            registry.publish(tenant, adapter, files, base_model=BASE_MODEL, base_architecture=BASE_ARCHITECTURE,
                             metrics=meta["metrics"], training=meta["training"], lineage=meta["lineage"],
                             detect_architecture=False)
            latencies.append(time.perf_counter() - t0)
        published.add((tenant, adapter))
        done += count
    seconds = time.perf_counter() - started
    latencies.sort()
    return {"versions": done, "adapters": len(published), "seconds": round(seconds, 3),
            "versions_per_s": round(done / seconds, 2) if seconds else None,
            "p50_ms": round(1000 * _percentile(latencies, 50), 2) if latencies else None,
            "p99_ms": round(1000 * _percentile(latencies, 99), 2) if latencies else None}, published


def _bulk_insert(catalog, layout, published: set, template: dict, rng: random.Random,
                 chunk: int = 2000) -> dict:
    """Write every unpublished adapter's versions straight into the catalog's tables."""
    from sqlalchemy import insert, select

    from farm.registry.catalog import (
        AdapterRow,
        AliasRow,
        MetricRow,
        NumberRow,
        TenantRow,
        VersionRow,
    )
    from farm.registry.names import serve_name

    started = time.perf_counter()
    now = datetime.now(timezone.utc)
    todo = [(t, a, n) for t, a, n in layout if (t, a) not in published]
    counts = {"tenants": 0, "adapters": 0, "versions": 0, "metrics": 0, "aliases": 0}
    with catalog.sessions.begin() as session:
        tenant_ids = dict(session.execute(select(TenantRow.name, TenantRow.id)).all())
        new_tenants = sorted({t for t, _, _ in todo} - set(tenant_ids))
        if new_tenants:
            ids = session.scalars(insert(TenantRow).returning(TenantRow.id, sort_by_parameter_order=True),
                                  [{"name": t, "created_at": now - timedelta(days=120)} for t in new_tenants]).all()
            tenant_ids.update(zip(new_tenants, ids))
        counts["tenants"] = len(new_tenants)
        adapter_ids = session.scalars(
            insert(AdapterRow).returning(AdapterRow.id, sort_by_parameter_order=True),
            [{"tenant_id": tenant_ids[t], "name": a, "created_at": now - timedelta(days=100)}
             for t, a, _ in todo]).all()
        counts["adapters"] = len(adapter_ids)

        versions, numbers, metadata = [], [], []
        for (tenant, adapter, count), adapter_id in zip(todo, adapter_ids):
            created = now - timedelta(days=rng.uniform(30, 90))
            for number in range(1, count + 1):
                created += timedelta(hours=rng.uniform(1, 240))
                meta = _metadata(rng, tenant, adapter, number)
                base_model = BASE_MODEL if rng.random() < 0.7 else rng.choice(OTHER_BASE_MODELS)
                rank = rng.choice((8, 16, 32))
                settings = {**template["method_settings"], "r": rank, "lora_alpha": 2 * rank}
                manifest = {**template, "tenant": tenant, "adapter": adapter, "version": number,
                            "serve_name": serve_name(tenant, adapter, number), "created_at": created.isoformat(),
                            "base_model": base_model, "method_settings": settings,
                            "metrics": meta["metrics"], "training": meta["training"],
                            "lineage": {"code_version": template["lineage"].get("code_version"), **meta["lineage"]}}
                size = sum(entry["size"] for entry in manifest["files"].values())
                versions.append({
                    "adapter_id": adapter_id, "number": number, "serve_name": manifest["serve_name"],
                    "base_model": base_model, "method": manifest["method"], "rank": rank,
                    "servable_by_vllm": manifest["servable_by_vllm"],
                    "not_servable_reason": manifest.get("not_servable_reason"),
                    "sweep_id": meta["lineage"]["sweep_id"],
                    "dataset_fingerprint": meta["lineage"]["dataset_fingerprint"],
                    "size_bytes": size, "status": "active", "created_at": created, "manifest": manifest})
                numbers.append({"adapter_id": adapter_id, "number": number})
                metadata.append((adapter_id, number, count, meta["metrics"]))
        version_ids: list[int] = []
        for at in range(0, len(versions), chunk):
            version_ids += session.scalars(
                insert(VersionRow).returning(VersionRow.id, sort_by_parameter_order=True),
                versions[at:at + chunk]).all()
        counts["versions"] = len(version_ids)
        for at in range(0, len(numbers), chunk):
            session.execute(insert(NumberRow), numbers[at:at + chunk])
        metric_rows, alias_rows = [], []
        latest: dict[int, tuple[int, int]] = {}
        by_number: dict[tuple[int, int], int] = {}
        for version_id, (adapter_id, number, count, metrics) in zip(version_ids, metadata):
            for name, value in metrics.items():
                metric_rows.append({"version_id": version_id, "name": name, "value": float(value)})
            by_number[(adapter_id, number)] = version_id
            if number == count:
                latest[adapter_id] = (version_id, count)
        for index, (adapter_id, (version_id, count)) in enumerate(latest.items()):
            alias_rows.append({"adapter_id": adapter_id, "name": "latest", "version_id": version_id, "updated_at": now})
            if index % 3 == 0 and count > 1:  # an older version promoted to production
                alias_rows.append({"adapter_id": adapter_id, "name": "production",
                                   "version_id": by_number[(adapter_id, count - 1)], "updated_at": now})
        for at in range(0, len(metric_rows), chunk * 4):
            session.execute(insert(MetricRow), metric_rows[at:at + chunk * 4])
        session.execute(insert(AliasRow), alias_rows)
        counts["metrics"], counts["aliases"] = len(metric_rows), len(alias_rows)
    if catalog.engine.dialect.name == "sqlite":
        with catalog.engine.connect() as connection:
            connection.exec_driver_sql("ANALYZE")
    else:
        with catalog.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("ANALYZE")
    counts["seconds"] = round(time.perf_counter() - started, 3)
    counts["versions_per_s"] = round(counts["versions"] / counts["seconds"], 1) if counts["seconds"] else None
    return counts


def _reindex_bench(layout, adapter_dir: Path, template: dict, rng: random.Random, root: Path, limit: int) -> dict:
    """Write ``limit`` versions (files, manifests, an alias record per adapter) into a store of
    their own, then time ``Registry.reindex`` rebuilding an empty catalog from it."""
    from farm.registry.core import open_registry
    from farm.registry.names import serve_name
    from farm.registry.validate import folder_files

    registry = open_registry(str(root / "reindex-store"))
    files = folder_files(adapter_dir)
    written, started = 0, time.perf_counter()
    for tenant, adapter, count in layout:
        for number in range(1, count + 1):
            if written >= limit:
                break
            meta = _metadata(rng, tenant, adapter, number)
            manifest = {**{k: v for k, v in template.items() if k != "files"}, "tenant": tenant,
                        "adapter": adapter, "version": number, "serve_name": serve_name(tenant, adapter, number),
                        "metrics": meta["metrics"], "training": meta["training"],
                        "lineage": {"code_version": template["lineage"].get("code_version"), **meta["lineage"]}}
            registry.store.write_version(tenant, adapter, number, files, manifest)
            written += 1
        if written and number > 1:
            registry.store.append_record(tenant, adapter, {"kind": "alias", "alias": "production",
                                                           "version": number - 1, "at": "2026-11-30T00:00:00"})
    write_seconds = time.perf_counter() - started
    started = time.perf_counter()
    report = registry.reindex()
    seconds = time.perf_counter() - started
    indexed = registry.search(status=None, limit=1)[1]
    registry.catalog.engine.dispose()
    return {"versions": report.versions, "indexed": indexed, "skipped": len(report.skipped),
            "write_seconds": round(write_seconds, 1), "reindex_seconds": round(seconds, 2),
            "versions_per_s": round(report.versions / seconds, 1) if seconds else None}


def _catalog_is_empty(catalog) -> bool:
    from sqlalchemy import func, select

    from farm.registry.catalog import AdapterRow, NumberRow, TenantRow, VersionRow

    with catalog.sessions() as session:
        return all(not session.scalar(select(func.count()).select_from(table))
                   for table in (TenantRow, AdapterRow, NumberRow, VersionRow))


def _clean_catalog(catalog) -> None:
    """Delete everything the benchmark added to a catalog that was empty at the start."""
    from sqlalchemy import delete

    from farm.registry.catalog import (
        AdapterRow,
        AliasRow,
        MetricRow,
        NumberRow,
        TenantRow,
        TokenRow,
        VersionRow,
    )

    with catalog.sessions.begin() as session:
        for table in (AliasRow, MetricRow, VersionRow, NumberRow, AdapterRow, TenantRow):
            session.execute(delete(table))
        session.execute(delete(TokenRow).where(TokenRow.label == TOKEN_LABEL))


# -- in-process cost (no HTTP) ---------------------------------------------------------------


def _in_process(registry, serve_names: list[str], tenants: list[str], rng: random.Random, calls: int = 200) -> dict:
    """SQL statements and milliseconds per resolve / search page, in this process, one thread."""
    from sqlalchemy import event

    statements = {"n": 0}

    def count(*_args, **_kwargs):
        statements["n"] += 1

    event.listen(registry.catalog.engine, "before_cursor_execute", count)
    result = {}
    try:
        for name, call in (
            ("resolve", lambda: registry.resolve(rng.choice(serve_names))),
            ("search", lambda: registry.search(tenant=rng.choice(tenants),
                                               metric_filters=[(METRIC, "<=", rng.uniform(1.0, 3.0))],
                                               sort=f"metric:{METRIC}", limit=PAGE_SIZE)),
            ("search-all", lambda: registry.search(metric_filters=[(METRIC, "<=", rng.uniform(1.0, 3.0))],
                                                   sort=f"metric:{METRIC}", limit=PAGE_SIZE)),
        ):
            for _ in range(10):  # warm caches
                call()
            statements["n"] = 0
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            times.sort()
            result[name] = {"sql_statements_per_call": statements["n"] / calls,
                            "p50_ms": round(1000 * _percentile(times, 50), 3),
                            "p99_ms": round(1000 * _percentile(times, 99), 3)}
    finally:
        event.remove(registry.catalog.engine, "before_cursor_execute", count)
    return result


# -- the server ------------------------------------------------------------------------------


class Server:
    """The registry API under uvicorn in a subprocess (one worker)."""

    def __init__(self, store: str, catalog_url: str, log: Path, admin_token: str):
        self.admin_token = admin_token  # /metrics needs it
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with log.open("wb") as out:
            self.process = subprocess.Popen([sys.executable, "-c", SERVER_CODE, store, catalog_url, str(self.port)],
                                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        tail = self.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the registry API did not come up on {self.url}:\n{tail}")

    def cpu_seconds(self) -> float | None:
        return _process_cpu_seconds(self.process.pid)

    def server_seconds(self, route: str) -> tuple[float, float]:
        """(sum of seconds, count) of GET ``route`` in the server's latency histogram."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=10,  # behind an admin token
                         headers={"Authorization": f"Bearer {self.admin_token}"}).text
        found = {}
        for kind in ("sum", "count"):
            pattern = re.compile(rf'^farm_registry_request_seconds_{kind}\{{(.*)\}} (\S+)$', re.MULTILINE)
            for labels, value in pattern.findall(text):
                if 'method="GET"' in labels and f'route="{route}"' in labels:
                    found[kind] = float(value)
        return found.get("sum", 0.0), found.get("count", 0.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- load --------------------------------------------------------------------------------------


def _request_maker(mix: str, serve_names: list[str], tenants: list[str], admin: str, tenant_tokens: list[tuple]):
    """A function (client index, rng) -> (path, params, headers) for one request of ``mix``."""
    admin_headers = {"Authorization": f"Bearer {admin}"}

    def page(rng, tenant=None):
        params = [("metric", f"{METRIC}<={rng.uniform(1.0, 3.0):.3f}"), ("sort", f"metric:{METRIC}"),
                  ("limit", str(PAGE_SIZE))]
        return [("tenant", tenant)] + params if tenant else params

    if mix == "healthz":
        return lambda i, rng: ("/healthz", None, None)
    if mix == "get":
        return lambda i, rng: (f"/v1/versions/{rng.choice(serve_names)}", None, admin_headers)
    if mix == "search":
        return lambda i, rng: ("/v1/versions", page(rng, rng.choice(tenants)), admin_headers)
    if mix == "search-tenant":
        return lambda i, rng: ("/v1/versions", page(rng),
                               {"Authorization": f"Bearer {tenant_tokens[i % len(tenant_tokens)][1]}"})
    if mix == "search-all":
        return lambda i, rng: ("/v1/versions", page(rng), admin_headers)
    raise ValueError(mix)


def _run_load(clients, make, total: int, seed: int) -> dict:
    """``total`` requests split among ``clients`` (one thread each); latencies and errors."""
    import httpx

    shares = [total // len(clients) + (1 if i < total % len(clients) else 0) for i in range(len(clients))]
    latencies: list[list[float]] = [[] for _ in clients]
    errors: list[list[str]] = [[] for _ in clients]
    items: list[list[int]] = [[] for _ in clients]
    barrier = threading.Barrier(len(clients) + 1)

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        client = clients[index]
        barrier.wait()
        for _ in range(shares[index]):
            path, params, headers = make(index, rng)
            t0 = time.perf_counter()
            try:
                response = client.get(path, params=params, headers=headers)
                elapsed = time.perf_counter() - t0
                if response.status_code != 200:
                    errors[index].append(f"{response.status_code}: {response.text[:200]}")
                elif path == "/v1/versions":
                    items[index].append(len(response.json()["items"]))
            except httpx.HTTPError as exc:
                elapsed = time.perf_counter() - t0
                errors[index].append(f"{type(exc).__name__}: {exc}")
            latencies[index].append(elapsed)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    all_latencies = sorted(x for per in latencies for x in per)
    all_errors = [e for per in errors for e in per]
    all_items = [n for per in items for n in per]

    def ms(q):
        value = _percentile(all_latencies, q)
        return round(1000 * value, 2) if value is not None else None

    return {"requests": len(all_latencies), "errors": len(all_errors), "error_samples": all_errors[:5],
            "wall_seconds": round(wall, 3), "requests_per_s": round(len(all_latencies) / wall, 1) if wall else None,
            "p50_ms": ms(50), "p95_ms": ms(95), "p99_ms": ms(99), "max_ms": ms(100),
            "mean_ms": round(1000 * sum(all_latencies) / len(all_latencies), 2) if all_latencies else None,
            "mean_items_per_page": round(sum(all_items) / len(all_items), 2) if all_items else None}


def _measure_mix(server: Server, clients, mix: str, make, args) -> dict:
    route = ROUTES[mix]
    _run_load(clients, make, args.warmup, seed=args.seed + 7)
    load_before = _loadavg()
    server_sum0, server_count0 = server.server_seconds(route)
    cpu0 = server.cpu_seconds()
    figures = _run_load(clients, make, args.requests, seed=args.seed + 11)
    cpu1 = server.cpu_seconds()
    server_sum1, server_count1 = server.server_seconds(route)
    served = server_count1 - server_count0
    figures.update({
        "mix": mix,
        "server_mean_ms": round(1000 * (server_sum1 - server_sum0) / served, 2) if served else None,
        "server_cpu_ms_per_request": (round(1000 * (cpu1 - cpu0) / figures["requests"], 2)
                                      if cpu0 is not None and cpu1 is not None and figures["requests"] else None),
        "server_cpu_share": (round((cpu1 - cpu0) / figures["wall_seconds"], 2)
                             if cpu0 is not None and cpu1 is not None and figures["wall_seconds"] else None),
        "loadavg_before": load_before, "loadavg_after": _loadavg(),
    })
    return figures


# -- report ----------------------------------------------------------------------------------


def _goals(mixes: dict) -> dict:
    goals = {}
    for mix, figures in mixes.items():
        if mix == "healthz":
            continue
        limit = GET_GOAL_MS if mix == "get" else SEARCH_GOAL_MS
        p99 = figures.get("p99_ms")
        goals[mix] = {"goal_p99_ms": limit, "p99_ms": p99,
                      "met": (p99 < limit and figures["errors"] == 0) if p99 is not None else None}
    return goals


def _report(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(160, Console().width))
    env = payload["environment"]
    pop = payload["populate"]
    console.print(f"catalog: {env['catalog_dialect']} ({env['catalog_version']}), "
                  f"{pop['total_versions']:,} versions in {pop['total_tenants']:,} tenants, "
                  f"{pop['total_adapters']:,} adapters")
    pub = pop["publish"]
    console.print(f"populate: {pub['versions']} versions via Registry.publish in {pub['seconds']:.1f} s "
                  f"({pub['versions_per_s']} /s, p50 {pub['p50_ms']} ms, p99 {pub['p99_ms']} ms); "
                  f"{pop['bulk']['versions']:,} bulk rows in {pop['bulk']['seconds']:.1f} s")
    table = Table(title=f"registry load: {payload['config']['clients']} concurrent clients over HTTP, "
                        f"1 uvicorn worker, {env['cpus_available']} CPUs")
    columns = ("mix", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms",
               "srv mean ms", "srv CPU ms/req", "items/page", "load 1m")
    for column in columns:
        table.add_column(column, justify="left" if column == "mix" else "right", no_wrap=True)
    for mix, f in payload["mixes"].items():
        def num(value, fmt="{:,.1f}"):
            return fmt.format(value) if value is not None else "-"
        table.add_row(mix, f"{f['requests']:,}", str(f["errors"]), num(f["requests_per_s"]), num(f["p50_ms"]),
                      num(f["p95_ms"]), num(f["p99_ms"]), num(f["max_ms"]), num(f["server_mean_ms"]),
                      num(f["server_cpu_ms_per_request"]), num(f["mean_items_per_page"]),
                      f"{f['loadavg_before'][0] if f['loadavg_before'] else '-'}"
                      f" -> {f['loadavg_after'][0] if f['loadavg_after'] else '-'}")
    console.print(table)
    inproc = payload["in_process"]
    console.print("in process (no HTTP, one thread): " + "; ".join(
        f"{name} {v['sql_statements_per_call']:.1f} SQL statements, p50 {v['p50_ms']:.2f} ms"
        for name, v in inproc.items()))
    reindex = payload.get("reindex")
    if reindex:
        console.print(f"reindex: {reindex['versions']:,} versions (files, manifests, records) rebuilt into an empty "
                      f"catalog in {reindex['reindex_seconds']} s, {reindex['versions_per_s']} versions/s, "
                      f"{reindex['skipped']} skipped; {reindex['indexed']:,} indexed")
    words = {True: "[green]PASS[/green]", False: "[red]MISS[/red]", None: "[yellow]n/a[/yellow]"}
    for mix, goal in payload["goals"].items():
        what = "get" if mix == "get" else "search page"
        p99 = goal["p99_ms"]
        console.print(f"  goal {mix:<14} p99 < {goal['goal_p99_ms']:.0f} ms ({what}): "
                      f"{p99 if p99 is not None else '-'} ms  {words[goal['met']]}")


# -- driver ------------------------------------------------------------------------------------


#: ``--smoke``: every part runs, on a catalog small enough for the test tier
SMOKE = {"tenants": 4, "versions": 40, "adapters": 2, "publish": 6, "requests": 40, "warmup": 4, "clients": 2,
         "reindex_versions": 20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=500)
    parser.add_argument("--versions", type=int, default=10_000, help="versions in all (published + bulk)")
    parser.add_argument("--adapters", type=int, default=4, help="adapters per tenant")
    parser.add_argument("--publish", type=int, default=300,
                        help="about this many versions go through Registry.publish (whole adapters)")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per mix")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests before each mix")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated, of {', '.join(MIXES)}")
    parser.add_argument("--catalog", default="sqlite",
                        help="'sqlite' (a file in the temporary store) or a SQLAlchemy URL (an empty database)")
    parser.add_argument("--keep-catalog", action="store_true", help="leave the rows in a --catalog URL database")
    parser.add_argument("--reindex-versions", type=int, default=None,
                        help="versions written to a store of their own to time reindex (default --versions; 0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-results/registry_load.json", help="JSON result file")
    parser.add_argument("--smoke", action="store_true", help="a small catalog and few requests: checks it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    unknown = [m for m in mixes if m not in MIXES]
    if unknown:
        parser.error(f"unknown mix {unknown}: use {', '.join(MIXES)}")
    if args.tenants * args.adapters > args.versions:
        parser.error("--versions must be at least --tenants x --adapters (one version per adapter)")

    import fastapi
    import httpx
    import sqlalchemy
    import sqlalchemy.exc
    import uvicorn

    from farm.registry.catalog import Catalog
    from farm.registry.core import Registry
    from farm.registry.store import Store

    rng = random.Random(args.seed)
    load_start = _loadavg()
    # uvicorn's "auto" picks uvloop and httptools when installed (a large share of a get's cost)
    server_kind = ("uvicorn, 1 worker, log level warning, loop "
                   + ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio") + ", http "
                   + ("httptools" if importlib.util.find_spec("httptools") else "h11"))
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    store_dir = tmp / "store"
    catalog_url = f"sqlite:///{store_dir / 'catalog.sqlite'}" if args.catalog == "sqlite" else args.catalog
    store_dir.mkdir(parents=True)
    catalog = Catalog(catalog_url)
    registry = Registry(Store(str(store_dir)), catalog)
    server = None
    clients: list = []
    external = args.catalog != "sqlite"
    if external and not _catalog_is_empty(catalog):
        print(f"{catalog_url}: the catalog already holds tenants or versions; give an empty database")
        shutil.rmtree(tmp, ignore_errors=True)
        return 2
    try:
        # -- populate ---------------------------------------------------------------------------
        layout = _layout(args.tenants, args.versions, args.adapters)
        adapter_dir = _write_tiny_adapter(tmp / "adapter")
        print(f"populating: {args.versions:,} versions, {args.tenants} tenants x {args.adapters} adapters "
              f"({catalog.engine.dialect.name} catalog)", flush=True)
        publish, published = _publish_real(registry, layout, args.publish, adapter_dir, rng)
        print(f"  Registry.publish: {publish['versions']} versions in {publish['seconds']:.1f} s", flush=True)
        first = next((t, a) for t, a, _ in layout if (t, a) in published)
        template = registry.catalog.get_version(first[0], first[1], number=1).manifest
        bulk = _bulk_insert(catalog, layout, published, template, rng)
        print(f"  bulk rows: {bulk['versions']:,} versions in {bulk['seconds']:.1f} s", flush=True)
        stats = catalog.stats()
        serve_names = [f"{t}.{a}.v{n}" for t, a, count in layout for n in range(1, count + 1)]
        tenants = sorted({t for t, _, _ in layout})

        in_process = _in_process(registry, serve_names, tenants, random.Random(args.seed + 3))

        # -- serve ------------------------------------------------------------------------------
        admin = catalog.create_token(None, label=TOKEN_LABEL)
        token_tenants = random.Random(args.seed + 5).sample(tenants, min(args.clients, len(tenants)))
        tenant_tokens = [(t, catalog.create_token(t, label=TOKEN_LABEL)) for t in token_tenants]
        server = Server(str(store_dir), catalog_url, tmp / "server.log", admin)
        server.wait()
        print(f"API up on {server.url} (pid {server.process.pid}); running {', '.join(mixes)}", flush=True)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        clients = [httpx.Client(base_url=server.url, timeout=60, limits=limits) for _ in range(args.clients)]
        results = {}
        for mix in mixes:
            make = _request_maker(mix, serve_names, tenants, admin, tenant_tokens)
            results[mix] = _measure_mix(server, clients, mix, make, args)
            f = results[mix]
            print(f"  {mix}: p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, {f['requests_per_s']} req/s, "
                  f"{f['errors']} errors", flush=True)
        reindex = None
        if args.reindex_versions != 0:
            count = args.versions if args.reindex_versions is None else args.reindex_versions
            print(f"reindex: writing {count:,} versions to a store of their own", flush=True)
            reindex = _reindex_bench(layout, adapter_dir, template, random.Random(args.seed + 7), tmp, count)
            print(f"  reindex: {reindex['versions']:,} versions in {reindex['reindex_seconds']} s "
                  f"({reindex['skipped']} skipped)", flush=True)
    finally:
        for client in clients:
            client.close()
        if server is not None:
            server.stop()
        if external and not args.keep_catalog:
            try:
                _clean_catalog(catalog)
            except sqlalchemy.exc.SQLAlchemyError as exc:  # report, but keep the figures
                print(f"could not clean {catalog_url}: {exc}")
        dialect = catalog.engine.dialect
        catalog_version = (sqlite3.sqlite_version if dialect.name == "sqlite"
                           else ".".join(map(str, dialect.server_version_info or ())))
        catalog.engine.dispose()
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        cpus_available = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_available = os.cpu_count()
    payload = {
        "benchmark": "registry_load",
        "config": {k: v for k, v in vars(args).items()},
        "populate": {"publish": publish, "bulk": bulk, "total_versions": stats["versions"],
                     "total_tenants": stats["tenants"], "total_adapters": len(layout),
                     "note": "bulk versions are catalog rows only (no files in the store)"},
        "in_process": in_process,
        "mixes": results,
        "reindex": reindex,
        "goals": _goals(results),
        "environment": {
            "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpus_available": cpus_available, "nproc": cpus_available,
            "catalog_dialect": dialect.name, "catalog_version": catalog_version,
            "catalog_url": re.sub(r"//[^@/]*@", "//***@", catalog_url) if external else "sqlite (temporary file)",
            "sqlite": sqlite3.sqlite_version, "sqlalchemy": sqlalchemy.__version__,
            "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__, "httpx": httpx.__version__,
            "server": server_kind,
            "loadavg_start": load_start, "loadavg_end": _loadavg(),
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _report(payload)
    write_json(payload, args.out)
    failed = [f"{mix}: {f['errors']} errors, e.g. {f['error_samples'][:1]}" for mix, f in results.items() if f["errors"]]
    if reindex and reindex["skipped"]:
        failed.append(f"reindex skipped {reindex['skipped']} versions")
    for problem in failed:
        print(f"FAILED {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
