"""The real test servers (tests/servers.py) start, serve and clean up.

Nothing here is skipped: if PostgreSQL or SeaweedFS cannot start, the fixture raises and the
tests fail with the server's log tail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from pyarrow import fs as pafs

from .servers import PostgresServer, SeaweedS3Server, free_port, free_ports


def _port_closed(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


@pytest.fixture(scope="module")
def postgres_server():
    with PostgresServer() as server:
        folder, port = server.dir, server.port
        yield server
    assert not folder.exists(), f"{folder} left behind"
    assert _port_closed(port), f"PostgreSQL still listening on {port}"


@pytest.fixture(scope="module")
def s3_server():
    with SeaweedS3Server() as server:
        folder, port, proc = server.dir, server.port, server.proc
        yield server
    assert proc.poll() is not None, "weed server still running"
    assert not folder.exists(), f"{folder} left behind"
    assert _port_closed(port), f"S3 still listening on {port}"


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = free_ports(8)
    assert len(set(ports)) == 8
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


# -- PostgreSQL -------------------------------------------------------------------------------

def test_postgres_url(postgres_server):
    assert postgres_server.url == (
        f"postgresql+psycopg://postgres@127.0.0.1:{postgres_server.port}/farm")


def test_postgres_table_round_trip(postgres_server):
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_server.url)
    try:
        with engine.begin() as conn:
            assert conn.execute(text("SELECT current_database()")).scalar_one() == "farm"
            assert conn.execute(text("SHOW server_version_num")).scalar_one() >= "150000"
            conn.execute(text("CREATE TABLE adapters (tenant text PRIMARY KEY, rank int NOT NULL)"))
            conn.execute(text("INSERT INTO adapters VALUES (:t, :r)"),
                         [{"t": "acme", "r": 8}, {"t": "globex", "r": 16}])
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT tenant, rank FROM adapters ORDER BY tenant")).all()
        assert [tuple(r) for r in rows] == [("acme", 8), ("globex", 16)]
    finally:
        engine.dispose()


def test_postgres_listens_only_on_loopback(postgres_server):
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_server.url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW listen_addresses")).scalar_one() == "127.0.0.1"
    finally:
        engine.dispose()


# -- SeaweedFS S3 -----------------------------------------------------------------------------

def test_s3_attributes(s3_server):
    assert s3_server.endpoint == f"127.0.0.1:{s3_server.port}"
    assert s3_server.uri.startswith(f"s3://{s3_server.bucket}/prefix-")
    assert s3_server.env["AWS_ENDPOINT_URL"] == f"http://{s3_server.endpoint}"
    assert s3_server.env["AWS_ACCESS_KEY_ID"] == s3_server.access_key
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key
    assert s3_server.env["AWS_REGION"] == "us-east-1"


def test_s3_object_round_trip(s3_server):
    fs = s3_server.filesystem()
    base = s3_server.uri.removeprefix("s3://")
    key = f"{base}/adapters/acme/adapter_config.json"
    payload = json.dumps({"r": 8, "lora_alpha": 16}).encode() * 100

    with fs.open_output_stream(key) as out:
        out.write(payload)
    with fs.open_input_stream(key) as src:
        assert src.read() == payload

    listed = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = {i.path: i.size for i in listed if i.type == pafs.FileType.File}
    assert files == {key: len(payload)}

    fs.delete_file(key)
    assert fs.get_file_info(key).type == pafs.FileType.NotFound
    remaining = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    assert [i for i in remaining if i.type == pafs.FileType.File] == []


def test_s3_wrong_secret_is_refused(s3_server):
    retry = pafs.AwsStandardS3RetryStrategy(max_attempts=1)
    bad_secret = s3_server.filesystem(secret_key="not-" + s3_server.secret_key,
                                      retry_strategy=retry)
    key = f"{s3_server.uri.removeprefix('s3://')}/forbidden-{uuid.uuid4().hex}"
    with pytest.raises(OSError, match="SIGNATURE_DOES_NOT_MATCH|ACCESS_DENIED"):
        with bad_secret.open_output_stream(key) as out:
            out.write(b"nope")
    bad_key = s3_server.filesystem(access_key="AKUNKNOWN000000000", retry_strategy=retry)
    with pytest.raises(OSError, match="INVALID_ACCESS_KEY_ID|ACCESS_DENIED"):
        bad_key.get_file_info(pafs.FileSelector(s3_server.bucket, recursive=True))
    # nothing was written by either
    assert s3_server.filesystem().get_file_info(key).type == pafs.FileType.NotFound


def test_s3_env_configures_a_client_process(s3_server):
    """A separate process given only ``env`` (and the URI) reaches the server."""
    key = f"{s3_server.uri}/from-env.txt"
    code = (
        "import sys; from pyarrow import fs\n"
        "f, path = fs.FileSystem.from_uri(sys.argv[1])\n"
        "with f.open_output_stream(path) as o: o.write(b'env-ok')\n"
        "print(f.open_input_stream(path).read().decode())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.env)
    proc = subprocess.run([sys.executable, "-c", code, key], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "env-ok"
    s3_server.filesystem().delete_file(key.removeprefix("s3://"))
