"""One real finished capture job for the results and browser tests, made once per session:
a fresh Postgres database, a Redis db, a bucket on the S3-compatible test server, and a real
Celery worker process (transformers backend: it starts in seconds) running a 3-persona
``traits_sample`` capture of the tiny Qwen3. Tests apply ``env`` to see the same services."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

TOKEN = "tok-results-5e1d7c2a"


@dataclass
class FinishedJob:
    job_id: str
    env: dict[str, str]
    prefix: str
    logs: Path

    def apply(self, monkeypatch) -> None:
        from app.settings import get_settings

        for k, v in self.env.items():
            monkeypatch.setenv(k, v)
        get_settings.cache_clear()


def _database() -> tuple[str, callable]:
    from sqlalchemy import text

    from tests.conftest import PG_ADMIN_URL, _pg_admin

    name = f"cs_test_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))

    def drop():
        with admin.connect() as c:
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = :n"), {"n": name})
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()

    return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}", drop


def _submit(settings) -> str:
    """As ``chatspace-jobs submit`` records it (with its artifact prefix), then enqueued."""
    from app import jobs
    from app.artifacts import job_prefix
    from app.db import session_scope
    from tests.integration import worker_helpers as h
    from workers.dispatch import enqueue_job

    with session_scope() as s:
        job = jobs.create_job(s, kind="capture", dataset=h.DATASET, model=h.MODEL,
                              dtype=h.DTYPE, params=dict(h.PARAMS))
        job.artifact_prefix = job_prefix(settings, model=h.MODEL, dataset=h.DATASET,
                                         dtype=h.DTYPE, job_id=str(job.id))
        job_id = str(job.id)
    enqueue_job(job_id)
    return job_id


@pytest.fixture(scope="session")
def finished_job(s3_endpoint, tmp_path_factory):
    import boto3

    from app.db import dispose_all, upgrade
    from app.settings import get_settings
    from tests.conftest import redis_db
    from tests.integration import worker_helpers as h

    pg_url, drop = _database()
    bucket = f"cs-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test").create_bucket(
        Bucket=bucket)
    data = tmp_path_factory.mktemp("finished-job")
    logs = data / "logs"
    worker = None
    # a Redis database is held while the worker runs; the results are read without it
    with redis_db() as redis_url, pytest.MonkeyPatch.context() as mp:
        env = {"CHATSPACE_DATABASE_URL": pg_url, "CHATSPACE_BROKER_URL": redis_url,
               "CHATSPACE_S3_ENDPOINT_URL": s3_endpoint, "CHATSPACE_S3_BUCKET": bucket,
               "CHATSPACE_S3_ACCESS_KEY_ID": "test", "CHATSPACE_S3_SECRET_ACCESS_KEY": "test",
               "CHATSPACE_S3_REGION": "us-east-1", "CHATSPACE_DATA_DIR": str(data / "data"),
               "CHATSPACE_ENGINE_BACKEND": "hf", "CHATSPACE_ENGINE_MAX_MODEL_LEN": "512",
               "CHATSPACE_HEARTBEAT_S": "1", "CHATSPACE_API_TOKENS": f'["{TOKEN}"]'}
        for k, v in env.items():
            mp.setenv(k, v)
        get_settings.cache_clear()
        try:
            upgrade(pg_url)
            job_id = _submit(get_settings())
            worker = h.start_worker("results-w", logs)
            row = h.wait_for(job_id, log_dir=logs, worker=worker, timeout=240)
            assert row["state"] == "succeeded", row
            h.check_artifacts(job_id, row)
            from app.artifacts import job_prefix

            prefix = job_prefix(get_settings(), model=h.MODEL, dataset=h.DATASET,
                                dtype=h.DTYPE, job_id=job_id)
        finally:
            if worker is not None:
                h.stop(worker)
            dispose_all()
            get_settings.cache_clear()
    yield FinishedJob(job_id, env, prefix, logs)
    dispose_all()
    drop()
