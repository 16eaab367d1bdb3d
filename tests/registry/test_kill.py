"""A registry server killed (SIGKILL) at random points of 20 publishes loses nothing and duplicates nothing.

Each round starts ``farm registry serve`` as its own process, starts a publish through the Python
client (which sends an idempotency key), kills the server after a random delay (before, during
or after the upload and commit), starts a new server on the same store and retries with the same
key. Afterwards: every version is complete, no publish became two versions, and ``gc`` leaves
no upload spool behind.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from farm.registry import open_registry
from farm.registry.client import RegistryClient

from ..conftest import REPO
from .test_api import ARCH, BASE_MODEL

ROUNDS = 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(store: Path, admin: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FARM_REGISTRY_")}
    environment["FARM_REGISTRY_ADMIN_TOKEN"] = admin
    server = subprocess.Popen([sys.executable, "-m", "farm.cli", "registry", "serve", "--port", str(port),
                               "--store", str(store), "--max-upload-mb", "64"], env=environment, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "registry server did not start"
        time.sleep(0.05)


def _kill(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(30)


@pytest.mark.slow
def test_killed_publishes_leave_no_partial_version_no_spool_and_no_duplicate(tmp_path):
    from .test_api import _save_lora

    folder = _save_lora(tmp_path / "adapter", 8, 0)
    store = tmp_path / "store"
    open_registry(str(store))  # the store and its catalog exist before the first server
    admin = "farm_kill-test-admin-token-0123456789"
    rng = random.Random(7)
    keys = []
    for round_ in range(ROUNDS):
        server, url = _start(store, admin)
        key = f"kill-test-{round_:02d}"
        keys.append(key)
        outcome: dict = {}

        def publish(url=url, key=key, outcome=outcome):
            try:
                outcome["info"] = RegistryClient(url, admin).publish(
                    "acme", "support", folder, base_model=BASE_MODEL, base_architecture=ARCH,
                    idempotency_key=key, attempts=1)
            except Exception as exc:  # the kill: any transport error
                outcome["error"] = exc

        thread = threading.Thread(target=publish)
        thread.start()
        time.sleep(rng.uniform(0.0, 0.6))
        _kill(server)
        thread.join(60)
        server, url = _start(store, admin)
        try:
            retried = RegistryClient(url, admin).publish("acme", "support", folder, base_model=BASE_MODEL,
                                                         base_architecture=ARCH, idempotency_key=key)
            if "info" in outcome:  # the first answer arrived: the retry names the same version
                assert retried.serve_name == outcome["info"].serve_name
        finally:
            _kill(server)
    registry = open_registry(str(store), create=False)
    versions = registry.search(status=None, limit=500)[0]
    assert len(versions) == ROUNDS  # one version per key: no retry made a second one
    for info in versions:
        registry.download(info.serve_name, tmp_path / "check" / info.serve_name)  # complete, sha256 intact
    assert len(registry.store.scan().versions) == ROUNDS
    registry.gc(older_than_s=0)
    assert registry.store.stale_uploads(0) == [] and registry.store.orphans(0) == []
    assert not any((store / ".uploads").iterdir())  # uploads spool inside the store, which gc covers
