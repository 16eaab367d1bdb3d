"""Python client of the registry's HTTP API (synchronous, httpx): ``RegistryAPI`` over HTTP.

    client = RegistryClient("http://127.0.0.1:8700", token)    # or FARM_REGISTRY_URL / FARM_REGISTRY_TOKEN
    client.search(adapter="support", metric_filters=[("eval_loss", "<=", 3.5)], sort="metric:eval_loss")
    client.resolve("acme.support@production")                   # a VersionInfo, as Registry.resolve
    client.download("acme.support.v3", Path("adapters/acme-support-v3"))
    client.publish("acme", "support", Path("runs/demo/acme/adapter"), base_model="meta-llama/Llama-3.1-8B",
                   metrics={"eval_loss": 1.2})

It answers like ``farm.registry.core.Registry`` (same return types, see
``farm.registry.interface``): a 404 raises ``RegistryNotFound`` (a ``NotFound``), a refused
publish ``RegistryRefused`` (a ``PublishError``); every other non-2xx answer ``RegistryError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from farm.registry.core import NotFound, ReindexReport, VersionInfo
from farm.registry.validate import PublishError, folder_files

CHUNK = 1 << 20


class RegistryError(RuntimeError):
    """The registry answered with an error status."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


class RegistryNotFound(RegistryError, NotFound):
    """404: no such version, or one this token may not see (as ``Registry`` raises ``NotFound``)."""


class RegistryRefused(RegistryError, PublishError):
    """422 on a publish: the adapter was refused (as ``Registry.publish`` raises ``PublishError``)."""

    def __str__(self) -> str:
        return self.detail


def _segment(value: str) -> str:
    return quote(str(value), safe="@")


class RegistryClient:
    """A registry API client; use as a context manager or call ``close()``."""

    def __init__(self, base_url: str | None = None, token: str | None = None, timeout: float = 30,
                 transport: httpx.BaseTransport | None = None):
        base_url = base_url or os.environ.get("FARM_REGISTRY_URL")
        token = token or os.environ.get("FARM_REGISTRY_TOKEN")
        if not base_url:
            raise ValueError("no registry URL: pass base_url or set FARM_REGISTRY_URL")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------------
    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            response.read()  # also for streamed responses
            text = response.text
        except httpx.HTTPError:
            text = ""
        try:
            body = json.loads(text)
            detail = body.get("detail") if isinstance(body, dict) else None
            detail = detail if isinstance(detail, str) else json.dumps(body)
        except ValueError:
            detail = text
        kind = RegistryNotFound if response.status_code == 404 else RegistryError
        raise kind(response.status_code, detail or response.reason_phrase)

    def _request(self, method: str, url: str, **kwargs) -> httpx.Response:
        response = self._http.request(method, url, **kwargs)
        self._raise_for(response)
        return response

    # -- reading ---------------------------------------------------------------------------------
    def search(self, *, status: str | None = "active", metric_filters=(), **filters: Any) -> tuple[list[VersionInfo], int]:
        """A page of versions and the total, as ``Registry.search`` (``status=None``: any status).

        Other filters: tenant, adapter, base_model, method, servable (by vLLM), served_by
        (vllm or transformers), alias, sweep_id,
        created_after, created_before (datetimes), sort, limit, offset.
        """
        params: list[tuple[str, str]] = [("status", "any" if status is None else status)]
        params += [("metric", f"{name}{op}{value!r}") for name, op, value in metric_filters]
        for key, value in filters.items():
            if value is None:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif hasattr(value, "isoformat"):
                value = value.isoformat()
            params.append((key, str(value)))
        page = self._request("GET", "/v1/versions", params=params).json()
        return [VersionInfo(**item) for item in page["items"]], page["total"]

    def resolve(self, reference: str) -> VersionInfo:
        """One version by serve name (``t.a.vN``) or alias reference (``t.a@alias``)."""
        return VersionInfo(**self._request("GET", f"/v1/versions/{_segment(reference)}").json())

    def iter_file(self, ref: str, name: str):
        """Context manager yielding the streamed ``httpx.Response`` of one file."""
        return _Stream(self, f"/v1/versions/{_segment(ref)}/files/{_segment(name)}")

    def download(self, ref: str, dest_dir: Path) -> VersionInfo:
        """Download every file of a version into ``dest_dir`` (created; must not hold files yet).

        Each file is streamed and its sha256 checked against ``X-Content-SHA256`` and the
        version's manifest; everything is written to a temporary folder beside ``dest_dir``
        and renamed into place at the end, so ``dest_dir`` is either complete or absent.
        The version's metadata is written as ``version.json``. Returns the version.
        """
        dest_dir = Path(dest_dir)
        if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
            raise FileExistsError(f"{dest_dir} exists and is not an empty folder")
        version = self.resolve(ref)
        info = version.to_dict()
        # Always download by serve name: an alias could move between files.
        serve = info["serve_name"]
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.tmp-", dir=dest_dir.parent))
        try:
            for name, expected in sorted(info["files"].items()):
                if Path(name).name != name or name.startswith("."):
                    raise RegistryError(502, f"server listed an unsafe file name {name!r}")
                digest, size = hashlib.sha256(), 0
                with self.iter_file(serve, name) as response, (tmp / name).open("wb") as out:
                    header = response.headers.get("X-Content-SHA256")
                    for chunk in response.iter_bytes(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                got = digest.hexdigest()
                if got != expected["sha256"] or (header and got != header) or size != expected["size"]:
                    raise RegistryError(502, f"{serve}/{name}: sha256 or size differs from the manifest "
                                             f"(got {got}, {size} bytes)")
            (tmp / "version.json").write_text(json.dumps(info, indent=2, sort_keys=True))
            if dest_dir.exists():
                dest_dir.rmdir()  # empty (checked above)
            os.rename(tmp, dest_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return version

    # -- writing ---------------------------------------------------------------------------------
    def publish(self, tenant: str, adapter: str, folder: Path, base_model: str, metrics: dict | None = None,
                training: dict | None = None, lineage: dict | None = None,
                aliases: tuple[str, ...] | list[str] = ("latest",), base_architecture: str | None = None,
                timeout: float | None = None, method: str | None = None,
                idempotency_key: str | None = None, attempts: int = 3) -> VersionInfo:
        """Upload every file of ``folder`` (top level) as the next version; returns it.

        ``method``: the PEFT method the trainer used (see ``Registry.publish``). Every publish
        carries an ``Idempotency-Key`` (a new random one unless given): when the connection
        drops before the answer, it is retried up to ``attempts`` times with the same key, and
        a publish that had committed answers with its version instead of making a duplicate.
        """
        folder = Path(folder)
        data = {"base_model": base_model, "aliases": ",".join(aliases)}
        if base_architecture:
            data["base_architecture"] = base_architecture
        if method:
            data["method"] = method
        for key, value in (("metrics", metrics), ("training", training), ("lineage", lineage)):
            if value:
                data[key] = json.dumps(value)
        paths = folder_files(folder)  # symlinks refused, as locally
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        extra = {"timeout": timeout} if timeout is not None else {}
        for attempt in range(1, attempts + 1):
            with contextlib.ExitStack() as stack:
                files = [("files", (name, stack.enter_context(path.open("rb")), "application/octet-stream"))
                         for name, path in paths.items()]
                try:
                    return VersionInfo(**self._request(
                        "POST", f"/v1/adapters/{_segment(tenant)}/{_segment(adapter)}/versions",
                        data=data, files=files, headers=headers, **extra).json())
                except RegistryError as exc:
                    if exc.status == 422:
                        raise RegistryRefused(exc.status, exc.detail) from None
                    raise
                except httpx.TransportError:  # no answer: maybe committed, maybe not; the key tells
                    if attempt == attempts:
                        raise
                    time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def set_alias(self, tenant: str, adapter: str, alias: str, number: int,
                  note: dict | None = None) -> tuple[int | None, int]:
        """Point ``alias`` at version ``number``: (the version it pointed at before or None, number);
        ``note`` is kept with the move in the alias history."""
        body = {"version": number, **({"note": note} if note is not None else {})}
        answer = self._request("PUT", f"/v1/adapters/{_segment(tenant)}/{_segment(adapter)}/aliases/"
                                      f"{_segment(alias)}", json=body).json()
        return answer["previous"], answer["version"]

    def alias_history(self, tenant: str, adapter: str, alias: str | None = None) -> list[dict]:
        """Every move of the adapter's aliases (or of ``alias``), oldest first, with its note."""
        return self._request("GET", f"/v1/adapters/{_segment(tenant)}/{_segment(adapter)}/alias-history",
                             params={"alias": alias} if alias else None).json()

    def delete_alias(self, tenant: str, adapter: str, alias: str) -> None:
        self._request("DELETE", f"/v1/adapters/{_segment(tenant)}/{_segment(adapter)}/aliases/{_segment(alias)}")

    def archive(self, ref: str) -> dict:
        return self._request("POST", f"/v1/versions/{_segment(ref)}/archive").json()

    def delete(self, ref: str) -> None:
        self._request("DELETE", f"/v1/versions/{_segment(ref)}")

    def gc(self, older_than_s: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Remove (or list) what crashed publishes left behind (admin)."""
        return self._request("POST", "/v1/admin/gc", params={"older_than_s": older_than_s,
                                                              "dry_run": "true" if dry_run else "false"}).json()["removed"]

    def reindex(self) -> ReindexReport:
        """Rebuild the catalog from the store (admin)."""
        answer = self._request("POST", "/v1/admin/reindex").json()
        return ReindexReport(versions=answer["versions"], skipped=answer.get("skipped", []))

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()


class _Stream:
    def __init__(self, client: RegistryClient, url: str):
        self.client, self.url, self._cm = client, url, None

    def __enter__(self) -> httpx.Response:
        self._cm = self.client._http.stream("GET", self.url)
        response = self._cm.__enter__()
        try:
            RegistryClient._raise_for(response)
        except BaseException:
            self._cm.__exit__(None, None, None)
            raise
        return response

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)


__all__ = ["RegistryClient", "RegistryError"]
