"""The registry's bytes: immutable version folders on a local disk or S3, via pyarrow.fs.

Layout under the store root::

    adapters/<tenant>/<adapter>/v<N>/adapter_config.json
                                    /adapter_model.safetensors
                                    /manifest.json          sha256 + size of every file, and metadata

Publication is atomic for readers. On a file system the version is written under a temporary
name and renamed into place in one step. On an object store, where there is no rename, the
files are written first and ``manifest.json`` last; a folder without a manifest is not a
version, readers ignore it and ``gc`` removes it. Paths are built here from validated names
and numbers only; the store never takes a path from a caller.

S3 settings come from the environment: ``AWS_ENDPOINT_URL`` (any S3-compatible endpoint,
``http://host:port``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from farm.registry.names import check_name

MANIFEST = "manifest.json"
CHUNK = 1 << 20
FILE_ID = re.compile(r"file-[0-9a-f]{24}")  # farm.service.records.new_id("file")
FILE_NAME = re.compile(r"file-[0-9a-f]{24}\.(jsonl|parquet)")


class IntegrityError(RuntimeError):
    """A stored file does not match the sha256 or size its manifest records."""


def s3_filesystem_from_env() -> pafs.S3FileSystem:
    """An S3 file system configured from the standard AWS environment variables."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kwargs: dict = {"region": os.environ.get("AWS_REGION", "us-east-1"), "allow_bucket_creation": True}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                      secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
    return pafs.S3FileSystem(**kwargs)


class MissingStore(FileNotFoundError):
    """A store that a read was pointed at does not exist (reads never create one)."""


def open_filesystem(uri: str, create: bool = True) -> tuple[pafs.FileSystem, str, bool]:
    """(file system, root path inside it, is_object_store) for a local path or ``s3://`` URI.

    ``create=False`` (every read): a local folder that does not exist is ``MissingStore``.
    """
    if uri.startswith("s3://"):
        bucket_and_prefix = uri[len("s3://"):].strip("/")
        if not bucket_and_prefix:
            raise ValueError(f"{uri!r}: an S3 store needs a bucket")
        return s3_filesystem_from_env(), bucket_and_prefix, True
    if "://" in uri:
        raise ValueError(f"{uri!r}: stores are local folders or s3://bucket/prefix")
    root = Path(uri).expanduser().resolve()
    if not create and not root.is_dir():
        raise MissingStore(f"no registry store at {root} (check --store / FARM_REGISTRY_STORE)")
    root.mkdir(parents=True, exist_ok=True)
    return pafs.LocalFileSystem(), str(root), False


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


RECORDS = "records"


@dataclass
class StoreScan:
    """What ``Store.scan`` found: versions, state records per adapter, and what it skipped."""

    versions: list["StoredVersion"] = field(default_factory=list)
    #: every version number with a folder, readable or not: never to be allocated again
    taken: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    records: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class StoredVersion:
    """A version folder found in the store, with its manifest."""

    tenant: str
    adapter: str
    version: int
    manifest: dict


class Store:
    """Immutable adapter versions under one root (a local folder or ``s3://bucket/prefix``)."""

    def __init__(self, uri: str, create: bool = True):
        self.uri = uri
        self.fs, self.root, self.object_store = open_filesystem(uri, create)
        if self.object_store:
            bucket = self.root.split("/", 1)[0]
            if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                if not create:
                    raise MissingStore(f"no bucket {bucket!r} for store {uri}")
                self.fs.create_dir(bucket)

    # -- paths (built from validated parts only) ---------------------------------------------
    def _adapter_dir(self, tenant: str, adapter: str) -> str:
        return f"{self.root}/adapters/{check_name('tenant', tenant)}/{check_name('adapter', adapter)}"

    def version_dir(self, tenant: str, adapter: str, version: int) -> str:
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"invalid version number {version!r}")
        return f"{self._adapter_dir(tenant, adapter)}/v{version}"

    # -- writing -----------------------------------------------------------------------------
    def write_version(self, tenant: str, adapter: str, version: int, files: dict[str, Path],
                      manifest: dict) -> dict:
        """Write a version's files and manifest atomically; returns the manifest written.

        ``manifest`` gets a ``files`` entry (sha256 and size of every file) added here.
        Raises ``FileExistsError`` if the version already exists: versions are immutable.
        """
        final = self.version_dir(tenant, adapter, version)
        if self.fs.get_file_info(final).type != pafs.FileType.NotFound:
            raise FileExistsError(f"{tenant}/{adapter} v{version} already exists in the store")
        manifest = {**manifest, "files": {name: {"sha256": sha256_file(path), "size": path.stat().st_size}
                                          for name, path in sorted(files.items())}}
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        if self.object_store:
            for name, path in files.items():
                self._upload(path, f"{final}/{name}")
            self._put(f"{final}/{MANIFEST}", body)  # last: the commit marker
        else:
            tmp = f"{self._adapter_dir(tenant, adapter)}/.tmp-v{version}-{uuid.uuid4().hex[:12]}"
            self.fs.create_dir(tmp)
            for name, path in files.items():
                self._upload(path, f"{tmp}/{name}")
            self._put(f"{tmp}/{MANIFEST}", body)
            os.rename(tmp, final)  # one atomic step; fails if `final` appeared meanwhile
        return manifest

    def _upload(self, source: Path, destination: str) -> None:
        with source.open("rb") as src, self.fs.open_output_stream(destination) as dst:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                dst.write(chunk)

    def _put(self, destination: str, data: bytes) -> None:
        with self.fs.open_output_stream(destination) as dst:
            dst.write(data)

    # -- reading -----------------------------------------------------------------------------
    def read_manifest(self, tenant: str, adapter: str, version: int, strict: bool = False) -> dict | None:
        """The manifest of a complete version, or None (missing or incomplete).

        ``strict``: a manifest that is not a JSON object raises ``ValueError`` instead of None.
        """
        try:
            with self.fs.open_input_stream(f"{self.version_dir(tenant, adapter, version)}/{MANIFEST}") as s:
                raw = s.read()
        except (FileNotFoundError, OSError):
            return None
        try:
            manifest = json.loads(raw)
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as exc:
            if strict:
                raise ValueError(f"manifest is not valid JSON ({exc})") from None
            return None
        return manifest

    def iter_file(self, tenant: str, adapter: str, version: int, name: str) -> Iterator[bytes]:
        """Stream one file of a version in chunks (the name must be listed in the manifest)."""
        manifest = self.read_manifest(tenant, adapter, version)
        if manifest is None or name not in manifest["files"]:
            raise FileNotFoundError(f"{tenant}/{adapter} v{version} has no file {name!r}")
        with self.fs.open_input_stream(f"{self.version_dir(tenant, adapter, version)}/{name}") as stream:
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    return
                yield chunk

    def download(self, tenant: str, adapter: str, version: int, destination: Path) -> dict:
        """Copy a version into ``destination`` and check every sha256; returns the manifest."""
        manifest = self.read_manifest(tenant, adapter, version)
        if manifest is None:
            raise FileNotFoundError(f"{tenant}/{adapter} v{version} is not in the store")
        destination.mkdir(parents=True, exist_ok=True)
        for name, expected in manifest["files"].items():
            digest, size = hashlib.sha256(), 0
            target = destination / name
            with target.open("wb") as out:
                for chunk in self.iter_file(tenant, adapter, version, name):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            if digest.hexdigest() != expected["sha256"] or size != expected["size"]:
                target.unlink()
                raise IntegrityError(f"{tenant}/{adapter} v{version}/{name}: sha256 or size differs "
                                     "from the manifest; the stored copy is damaged")
        (destination / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return manifest

    def scan(self) -> StoreScan:
        """Every complete version, every state record, and what could not be read (for reindex).

        Nothing that fails to parse stops the scan or is touched: it is listed in ``skipped``
        with its path and the reason.
        """
        scan = StoreScan()
        for tenant in self._children(f"{self.root}/adapters"):
            for adapter in self._children(f"{self.root}/adapters/{tenant}"):
                base = f"{self.root}/adapters/{tenant}/{adapter}"
                try:
                    check_name("tenant", tenant), check_name("adapter", adapter)
                except ValueError as exc:
                    scan.skipped.append((base, str(exc)))
                    continue
                for entry in self._children(base):
                    if not (entry.startswith("v") and entry[1:].isdigit() and not entry[1:].startswith("0")):
                        continue
                    scan.taken.setdefault((tenant, adapter), set()).add(int(entry[1:]))
                    try:
                        manifest = self.read_manifest(tenant, adapter, int(entry[1:]), strict=True)
                    except ValueError as exc:
                        scan.skipped.append((f"{base}/{entry}/{MANIFEST}", str(exc)))
                        continue
                    if manifest is not None:
                        scan.versions.append(StoredVersion(tenant, adapter, int(entry[1:]), manifest))
                scan.records[(tenant, adapter)] = self._read_records(base, scan.skipped)
        return scan

    # -- state records (append-only: what the catalog holds that a lost catalog must get back) --
    def append_record(self, tenant: str, adapter: str, record: dict) -> None:
        """Append one small JSON record (an alias move, a status change) for ``tenant/adapter``.

        Names sort in time order; each is written whole (rename on a file system, one PUT on
        an object store), so a crash leaves either the record or nothing.
        """
        folder = f"{self._adapter_dir(tenant, adapter)}/{RECORDS}"
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        body = json.dumps(record, sort_keys=True).encode()
        if self.object_store:
            self._put(f"{folder}/{name}", body)
            return
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{name}.tmp"
        self._put(tmp, body)
        os.rename(tmp, f"{folder}/{name}")

    def records(self, tenant: str, adapter: str) -> list[dict]:
        """The state records of ``tenant/adapter``, oldest first (unreadable ones left out)."""
        return self._read_records(self._adapter_dir(tenant, adapter), [])

    def _read_records(self, base: str, skipped: list[tuple[str, str]]) -> list[dict]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(f"{base}/{RECORDS}", allow_not_found=True))
        except OSError:
            return []
        records = []
        for info in sorted((i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".json")
                            and not i.base_name.startswith(".")), key=lambda i: i.base_name):
            try:
                with self.fs.open_input_stream(info.path) as stream:
                    record = json.loads(stream.read())
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                records.append(record)
            except (OSError, ValueError) as exc:
                skipped.append((info.path, f"unreadable record: {exc}"))
        return records

    def _children(self, path: str) -> list[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError:
            return []
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    # -- tenants' uploaded files (the fine-tuning service's) ----------------------------------
    def put_tenant_file(self, tenant: str, file_id: str, suffix: str, source: Path) -> str:
        """Store an uploaded file as ``files/<tenant>/<file_id><suffix>`` (never the caller's
        name) in one atomic step; returns that path relative to the root."""
        if not FILE_ID.fullmatch(file_id) or suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"invalid stored file name {file_id!r}{suffix!r}")
        relative = f"files/{check_name('tenant', tenant)}/{file_id}{suffix}"
        final = f"{self.root}/{relative}"
        if self.object_store:
            self._upload(source, final)  # one PUT: visible whole or not at all
        else:
            self.fs.create_dir(f"{self.root}/files/{tenant}")
            tmp = f"{self.root}/files/{tenant}/.tmp-{uuid.uuid4().hex[:12]}"
            self._upload(source, tmp)
            os.replace(tmp, final)
        return relative

    def tenant_file_uri(self, relative: str) -> str:
        """The URI training reads a stored file from (a local path, or ``s3://...``)."""
        self._check_tenant_file(relative)
        return f"s3://{self.root}/{relative}" if self.object_store else f"{self.root}/{relative}"

    def remove_tenant_file(self, relative: str) -> None:
        self._check_tenant_file(relative)
        try:
            self.fs.delete_file(f"{self.root}/{relative}")
        except (FileNotFoundError, OSError):
            pass  # already gone: deleting is idempotent

    @staticmethod
    def _check_tenant_file(relative: str) -> None:
        parts = relative.split("/")
        if len(parts) != 3 or parts[0] != "files" or not FILE_NAME.fullmatch(parts[2]):
            raise ValueError(f"not a stored tenant file: {relative!r}")
        check_name("tenant", parts[1])

    # -- upload spool ------------------------------------------------------------------------
    def spool_root(self) -> Path:
        """Local folder where uploads wait for publishing: inside a local store (``.uploads``,
        which the version scan never reads), or a folder of its own per object store."""
        if self.object_store:
            digest = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
            return Path(tempfile.gettempdir()) / "farm-registry-uploads" / digest
        return Path(self.root) / ".uploads"

    def new_spool(self) -> Path:
        """An empty folder for one upload; removed by its request, or by ``gc`` after a crash."""
        root = self.spool_root()
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="upload-", dir=root))

    def stale_uploads(self, older_than_s: float) -> list[Path]:
        """Upload folders untouched for ``older_than_s`` (their request died with its server)."""
        root, now = self.spool_root(), time.time()
        if not root.is_dir():
            return []
        stale = []
        for folder in sorted(root.iterdir()):
            stamps = [p.stat().st_mtime for p in [folder, *folder.rglob("*")]]
            if folder.name.startswith("upload-") and now - max(stamps) >= older_than_s:
                stale.append(folder)
        return stale

    # -- maintenance -------------------------------------------------------------------------
    def orphans(self, older_than_s: float = 3600.0) -> list[str]:
        """Incomplete folders: temporary ones, and (on object stores) versions without manifest.

        Only those older than ``older_than_s`` count, so a publish in progress is not an orphan.
        """
        found: list[str] = []
        now = time.time()
        for tenant in self._children(f"{self.root}/adapters"):
            for adapter in self._children(f"{self.root}/adapters/{tenant}"):
                base = f"{self.root}/adapters/{tenant}/{adapter}"
                for entry in self._children(base):
                    path = f"{base}/{entry}"
                    incomplete = entry.startswith(".tmp-") or (
                        entry.startswith("v") and self.fs.get_file_info(f"{path}/{MANIFEST}").type
                        == pafs.FileType.NotFound)
                    if incomplete and now - self._newest_mtime(path) >= older_than_s:
                        found.append(path)
        return found

    def _newest_mtime(self, path: str) -> float:
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        stamps = [i.mtime.timestamp() for i in infos if i.mtime is not None]
        return max(stamps) if stamps else 0.0

    def remove(self, path: str) -> None:
        """Delete a folder the store itself reported (orphans, deleted versions)."""
        if not path.startswith(f"{self.root}/adapters/"):
            raise ValueError(f"refusing to delete {path!r}: outside the store's adapters")
        self.fs.delete_dir(path)

    def delete_version(self, tenant: str, adapter: str, version: int) -> None:
        """Remove a version's files: manifest first, so it stops being a version at once."""
        folder = self.version_dir(tenant, adapter, version)
        try:
            self.fs.delete_file(f"{folder}/{MANIFEST}")
        except (FileNotFoundError, OSError):
            pass
        if self.fs.get_file_info(folder).type != pafs.FileType.NotFound:
            self.fs.delete_dir(folder)
