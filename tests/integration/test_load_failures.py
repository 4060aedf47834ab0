"""A worker that cannot load a job's model: the error is on the job at once, and after a
bounded number of failed loads the job fails with it (Postgres and SQLite), for
single-stage and pipeline jobs alike."""

from __future__ import annotations

import pytest

from app import jobs
from app.db import session_scope

OOM = "Free memory on device (3.1/79.2 GiB) is less than desired GPU memory utilization"


def _job(factory, n: int = 3) -> str:
    with session_scope(factory) as s:
        return jobs.create_job(s, kind="capture", dataset="d", model="org/big", dtype="bfloat16",
                               personas=[f"p{i}" for i in range(n)], queue="q").id


def _fail_load(factory, job_id: str, worker: str = "gpu0", max_failures: int = 3):
    with session_scope(factory) as s:
        job = jobs.record_load_failure(s, job_id=job_id, worker=worker, error=OOM,
                                       max_failures=max_failures)
        return job.state, job.error


def test_the_error_shows_at_once_and_the_job_fails_after_the_bound(factory):
    job_id = _job(factory)
    for n in (1, 2):
        state, error = _fail_load(factory, job_id)
        assert state == "queued" and OOM in error and "gpu0" in error and "org/big" in error
    with session_scope(factory) as s:
        events = [e for e in jobs.list_events(s, job_id=job_id) if e.kind == "load_failed"]
        assert [e.data["failures"] for e in events] == [1, 2]
        assert all(OOM in e.message and e.worker == "gpu0" for e in events)
    state, error = _fail_load(factory, job_id)
    assert state == "failed" and error.startswith("3 failed model loads") and OOM in error
    with session_scope(factory) as s:
        job = jobs.get_job(s, job_id=job_id)
        assert job.failure_kind == "error"
        prog = jobs.progress(s, job_id=job_id)
        assert prog["counts"]["failed"] == 3 and all(OOM in i["error"] for i in prog["items"])
        # a retry starts the count again
        jobs.retry_job(s, job_id=job_id)
    state, error = _fail_load(factory, job_id)
    assert state == "queued", error


def test_a_job_another_worker_runs_does_not_fail(factory):
    job_id = _job(factory)
    with session_scope(factory) as s:
        jobs.claim_item(s, job_id=job_id, worker="gpu1", lease_s=60)
    for _ in range(4):
        state, _error = _fail_load(factory, job_id)
        assert state == "running"  # gpu1 loaded it and runs it
    with session_scope(factory) as s:
        assert jobs.progress(s, job_id=job_id)["counts"]["queued"] == 2


def test_a_finished_job_is_left_alone(factory):
    job_id = _job(factory, 1)
    with session_scope(factory) as s:
        jobs.request_cancel(s, job_id=job_id)
    assert _fail_load(factory, job_id)[0] == "cancelled"


class _Worker:
    """A worker as the job loop sees it, around a real engine runtime (transformers backend)
    whose model cannot be loaded here: not a local folder, the hub offline."""

    name = "gpu-lf"

    def __init__(self, settings):
        from workers.runtime import EngineRuntime

        self.settings = settings
        self.runtime = EngineRuntime(worker_name=self.name, gpu_index=None, settings=settings)

    def busy(self, job_id: str) -> None:
        pass

    def idle(self) -> None:
        pass


@pytest.mark.parametrize("db", ["postgres", "sqlite"])
def test_a_pipeline_job_records_failed_loads_like_a_single_stage_job(db, request, monkeypatch,
                                                                     tmp_path):
    """The pipeline loop takes the single-stage path for a model that cannot load: each
    delivery records a ``load_failed`` event and the job's last error without claiming an
    item (no attempt spent), and after ``max_load_failures`` the job fails with the reason;
    before, the failures went through item retries and the job ended with a generic error."""
    from sqlalchemy import select

    from app import stages
    from app.db import dispose_all, upgrade
    from app.models import JobItem
    from app.settings import get_settings
    from workers.jobloop import execute_job

    url = (request.getfixturevalue("pg_url") if db == "postgres"
           else f"sqlite:///{tmp_path / 'jobs.db'}")
    monkeypatch.setenv("CHATSPACE_DATABASE_URL", url)
    monkeypatch.setenv("CHATSPACE_ENGINE_BACKEND", "hf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import (an earlier test imported it): the
    # constant too, or each load waits out the hub's retries (5 x 60 s where the hub's host
    # neither answers nor refuses)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    get_settings.cache_clear()
    upgrade(url)
    model = "org/no-such-model"
    with session_scope() as s:
        job_id = stages.create_pipeline_job(
            s, dataset="traits_sample", model=model, dtype="float32",
            params={"stages": ["generate", "capture", "vectors"], "max_samples": 1},
            items=stages.plan(["generate", "capture", "vectors"], ["curious", "optimistic"]),
            queue="q").id
    worker = _Worker(get_settings())
    try:
        for n in (1, 2, 3):
            out = execute_job(job_id, worker=worker)
            assert out == {"job_id": job_id, "ran": 0,
                           "reason": "the model could not be loaded"}, out
            with session_scope() as s:
                job = jobs.get_job(s, job_id=job_id)
                events = [e for e in jobs.list_events(s, job_id=job_id)
                          if e.kind == "load_failed"]
                items = s.execute(select(JobItem).where(JobItem.job_id == job_id)).scalars().all()
                assert [e.data["failures"] for e in events] == list(range(1, n + 1))
                assert all(f"worker gpu-lf could not load {model}" in e.message
                           and "no-such-model" in e.message for e in events)
                assert all(i.attempt == 0 for i in items)  # nothing claimed, no attempt spent
                if n < 3:
                    assert job.state == "queued" and f"could not load {model}" in job.error
                    assert all(i.state == "queued" for i in items)
        with session_scope() as s:
            job = jobs.get_job(s, job_id=job_id)
            items = s.execute(select(JobItem).where(JobItem.job_id == job_id)).scalars().all()
            assert job.state == "failed" and job.failure_kind == "error"
            assert job.error.startswith("3 failed model loads") and model in job.error
            assert len(items) == 6 and all(i.state == "failed" for i in items)
        assert execute_job(job_id, worker=worker)["reason"] == "job is failed"
    finally:
        dispose_all()
