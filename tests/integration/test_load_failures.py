"""A worker that cannot load a job's model: the error is on the job at once, and after a
bounded number of failed loads the job fails with it (Postgres and SQLite)."""

from __future__ import annotations

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
