"""The whole service, for real, on private servers the scenarios may break.

``stack`` gives each scenario: a fresh database on a PRIVATE PostgreSQL cluster (one per
session, run as the ``postgres`` user; a scenario may restart it), a private Redis, a bucket
on the S3-compatible server (moto) reached through a switchable TCP proxy, the status API as
a real server process (``chatspace-jobs api`` with the real Celery enqueue), and real Celery
worker processes (``workers.cli.spawn_worker``) started on demand.

Workers here use the transformers backend (``CHATSPACE_ENGINE_BACKEND=hf``) on the tiny
generated Qwen3: these scenarios test the service's mechanics (leases, reconciler, retries,
manifests), not kernels, and the HF backend starts in seconds on a 2-core CI box. The vLLM
path is covered by tests/integration (test_worker_e2e) and tests/engine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.reliability.services import PrivatePostgres, PrivateRedis, SwitchableProxy

MODEL, DTYPE = "tiny:qwen3", "float32"
# capture (activations) by default; CHATSPACE_TEST_RELIABILITY_KIND=rollout runs the same scenarios
# on rollout artifacts (responses) — the mechanics under test are the same.
KIND = os.environ.get("CHATSPACE_TEST_RELIABILITY_KIND", "capture")
TOKEN = "rel-token-5b0c9e"


@pytest.fixture(scope="session")
def private_pg():
    pg = PrivatePostgres()
    yield pg
    pg.close()


class Stack:
    def __init__(self, *, pg: PrivatePostgres, db_url: str, redis: PrivateRedis,
                 proxy: SwitchableProxy, s3_direct: str, bucket: str, logs: Path):
        self.pg, self.db_url, self.redis, self.proxy = pg, db_url, redis, proxy
        self.s3_direct, self.bucket, self.logs = s3_direct, bucket, logs
        self.api: subprocess.Popen | None = None
        self.api_url = ""
        self.workers: list[subprocess.Popen] = []
        self.http: httpx.Client | None = None

    # -- processes ------------------------------------------------------------------------
    def start_api(self) -> None:
        port = free_port()
        with open(self.logs / "api.log", "ab") as out:  # the child keeps its own copy
            self.api = subprocess.Popen(
                [sys.executable, "-c", "from cli.main import main; main()", "api", "--host",
                 "127.0.0.1", "--port", str(port)],
                cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.api_url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.api_url, timeout=30,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"the API exited: {self.log_tail()}")
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the API did not answer: {self.log_tail()}")

    def start_worker(self, name: str, *, model: str | None = MODEL, **env) -> subprocess.Popen:
        """A real ``celery worker`` process (own session), extra CHATSPACE_* env applied;
        ``model=None`` starts an any-model worker."""
        from workers.cli import spawn_worker

        saved = {k: os.environ.get(k) for k in env}
        os.environ.update({k: str(v) for k, v in env.items()})
        try:
            with open(self.logs / f"{name}.log", "ab") as out:  # the child keeps its own copy
                proc = spawn_worker(name=name, model=model, dtype=DTYPE if model else None,
                                    stdout=out,
                                    stderr=subprocess.STDOUT)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.workers.append(proc)
        return proc

    def wait_worker_ready(self, name: str, timeout: float = 90) -> None:
        """Until the worker's heartbeat says its engine is loaded (state idle)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                rows = self.http.get("/workers").json().get("workers", [])
                if any(w["name"] == name and w.get("alive") and w.get("state") == "idle"
                       for w in rows):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"worker {name} not ready after {timeout}s\n{self.log_tail()}")

    @staticmethod
    def kill(proc: subprocess.Popen, sig=signal.SIGTERM, group: bool = True) -> None:
        if proc.poll() is not None:
            return
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
            proc.wait(30)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    # -- jobs -----------------------------------------------------------------------------
    def submit(self, dataset: str = "traits_sample", kind: str = KIND,
               client: httpx.Client | None = None, model: str = MODEL, **params) -> str:
        body = {"kind": kind, "dataset": dataset, "model": model, "dtype": DTYPE,
                "params": {"max_samples": 2, "max_tokens": 4, "batch_size": 2,
                           "temperature": 0.0, "seed": 0, **params}}
        r = (client or self.http).post("/jobs", json=body)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def log_tail(self, n: int = 2500) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}"
                         for p in sorted(self.logs.glob("*.log")))

    def close(self) -> None:
        for p in self.workers:
            self.kill(p)
        if self.api is not None:
            self.kill(self.api)
        if self.http is not None:
            self.http.close()


def _make_bucket(endpoint: str) -> str:
    import boto3

    bucket = f"rel-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test").create_bucket(
        Bucket=bucket)
    return bucket


def datasets_root(root: Path) -> Path:
    """The shipped samples plus ``one_persona`` (1 persona, 1 question): the burst's job, and
    ``six_personas`` (6 personas, 2 questions): enough items to spread over several workers."""
    import shutil

    from app.datasets import SAMPLES_DIR

    shutil.copytree(SAMPLES_DIR, root)
    one = root / "one_persona"
    (one / "instructions").mkdir(parents=True)
    (one / "instructions" / "terse.json").write_text(json.dumps(
        {"instruction": [{"pos": "Answer in one word.", "neg": "Answer at length."}]}))
    (one / "questions.jsonl").write_text(json.dumps({"question": "Why is the sky blue?",
                                                     "id": 0}) + "\n")
    six = root / "six_personas"
    (six / "instructions").mkdir(parents=True)
    for name in ("brisk", "calm", "dry", "eager", "formal", "gentle"):
        (six / "instructions" / f"{name}.json").write_text(json.dumps(
            {"instruction": [{"pos": f"Answer in a {name} way.", "neg": "Answer plainly."}]}))
    (six / "questions.jsonl").write_text("".join(json.dumps({"question": q, "id": i}) + "\n"
                                                 for i, q in enumerate(("Why is the sky blue?",
                                                                        "What is rain?"))))
    return root


def stack_env(monkeypatch, **values) -> None:
    for k, v in values.items():
        monkeypatch.setenv(k, str(v))
    from app.settings import get_settings

    get_settings.cache_clear()


@pytest.fixture
def stack(private_pg, s3_endpoint, tmp_path, monkeypatch):
    """The running service; scenarios start workers themselves (after any env they need)."""
    from app.db import dispose_all, upgrade

    logs = tmp_path / "logs"
    logs.mkdir()
    db_url = private_pg.create_database(f"rel_{uuid.uuid4().hex[:12]}")
    redis = PrivateRedis(logs)
    proxy = SwitchableProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    bucket = _make_bucket(s3_endpoint)
    stack_env(monkeypatch,
              CHATSPACE_DATABASE_URL=db_url, CHATSPACE_BROKER_URL=redis.url,
              CHATSPACE_S3_ENDPOINT_URL=proxy.url, CHATSPACE_S3_BUCKET=bucket,
              CHATSPACE_S3_ACCESS_KEY_ID="test", CHATSPACE_S3_SECRET_ACCESS_KEY="test",
              CHATSPACE_S3_REGION="us-east-1", CHATSPACE_S3_CONNECT_TIMEOUT_S=2,
              CHATSPACE_S3_MAX_ATTEMPTS=2,
              CHATSPACE_ENGINE_BACKEND="hf",
              CHATSPACE_HEARTBEAT_S=1, CHATSPACE_LEASE_S=5, CHATSPACE_WORKER_STALE_S=4,
              CHATSPACE_REAPER_INTERVAL_S=1,
              CHATSPACE_DATASETS_ROOT=datasets_root(tmp_path / "datasets"),
              CHATSPACE_API_TOKENS=json.dumps([TOKEN]), CHATSPACE_API_TOKEN=TOKEN)
    upgrade(db_url)
    s = Stack(pg=private_pg, db_url=db_url, redis=redis, proxy=proxy, s3_direct=s3_endpoint,
              bucket=bucket, logs=logs)
    try:
        s.start_api()
        yield s
    finally:
        s.close()
        proxy.close()
        redis.stop()
        dispose_all()
