"""Shared fixtures: real services (Postgres, Redis, an S3-compatible server) and settings.

Every test that needs a service gets its own database / Redis db / bucket, so tests never see
each other's data. Services are the ones .ci/run starts (Postgres on 127.0.0.1:5432 with trust
auth, Redis on 127.0.0.1:6379); the S3-compatible server (moto) is started here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("CHATSPACE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("CHATSPACE_TEST_REDIS", "redis://127.0.0.1:6379")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _pg_admin():
    from sqlalchemy import create_engine

    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture
def pg_url():
    """A fresh, empty Postgres database for one test; dropped afterwards."""
    from sqlalchemy import text

    name = f"cs_test_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with admin.connect() as c:
        c.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
        ), {"n": name})
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


# Logical databases 1..15, handed out round-robin: a test's database goes back to the end of
# the line once it is flushed (after the test's workers were stopped: fixtures that start them
# depend on this one and are torn down first). Handing each out once skipped every Redis test
# after the 15th in a full run (12 of them at stop 24, worker OOM/cancel/kill tests among them).
_redis_dbs = list(range(1, 16))


@contextlib.contextmanager
def redis_db():
    """Take a free Redis logical database (1..15), flushed, and give it back flushed."""
    import redis

    if not _redis_dbs:  # only if 15 tests or modules held one at once
        pytest.fail("no free Redis logical database: more than 15 tests hold one at once")
    db = _redis_dbs.pop(0)
    url = f"{REDIS_BASE}/{db}"
    r = redis.Redis.from_url(url)
    r.flushdb()
    try:
        yield url
    finally:
        r.flushdb()
        _redis_dbs.append(db)


@pytest.fixture
def redis_url():
    """A flushed Redis logical database for one test."""
    with redis_db() as url:
        yield url


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server (moto) on a free port for the whole test session."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A new bucket on the test S3 server, with CHATSPACE_S3_* pointing at it."""
    import boto3

    bucket = f"cs-{uuid.uuid4().hex[:10]}"
    boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    ).create_bucket(Bucket=bucket)
    monkeypatch.setenv("CHATSPACE_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("CHATSPACE_S3_BUCKET", bucket)
    monkeypatch.setenv("CHATSPACE_S3_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("CHATSPACE_S3_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("CHATSPACE_S3_REGION", "us-east-1")
    _clear_settings()
    yield bucket
    _clear_settings()


def _clear_settings():
    from app.settings import get_settings

    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, monkeypatch):
    """Every test starts from the embedded default under its own data dir."""
    for key in list(os.environ):
        if key.startswith("CHATSPACE_") and not key.startswith("CHATSPACE_TEST_"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CHATSPACE_DATA_DIR", str(tmp_path / "data"))
    _clear_settings()
    yield
    _clear_settings()
