"""A worker restarted under the same name gives back what its killed predecessor held.

Leases are keyed by worker name and names are stable across restarts (one per GPU), so
without :func:`app.jobs.release_worker_items` the new process's heartbeat would keep the dead
attempt's leases alive forever and those personas would never run again.
"""

from __future__ import annotations

import pytest

from app import jobs
from app.db import session_scope, upgrade
from app.models import JobItem


def _job(factory, personas) -> str:
    with session_scope(factory) as s:
        return jobs.create_job(s, kind="capture", dataset="traits_sample", model="m",
                               dtype="float32", personas=personas, queue="q").id


def _claim(factory, job_id, worker):
    with session_scope(factory) as s:
        item = jobs.claim_item(s, job_id=job_id, worker=worker, lease_s=600)
        return item.id, item.attempt


def test_restart_requeues_only_this_workers_items(factory):
    job_id = _job(factory, ["a", "b", "c"])
    a = _claim(factory, job_id, "gpu0")
    b = _claim(factory, job_id, "gpu1")
    with session_scope(factory) as s:
        assert jobs.release_worker_items(s, worker="gpu0") == [job_id]
        assert jobs.release_worker_items(s, worker="gpu0") == []  # nothing held any more
        item_a, item_b = s.get(JobItem, a[0]), s.get(JobItem, b[0])
        assert (item_a.state, item_a.lease_owner, item_a.failure_kind) == ("queued", None, "lost")
        assert (item_b.state, item_b.lease_owner) == ("running", "gpu1")
        assert jobs.extend_leases(s, worker="gpu0", lease_s=600) == 0
        lost = [e for e in jobs.list_events(s, job_id=job_id) if e.kind == "lost"]
        assert [(e.item_id, e.worker) for e in lost] == [(a[0], "gpu0")]
    again = _claim(factory, job_id, "gpu0")  # the restarted worker runs it again
    assert again == (a[0], a[1] + 1)
    with session_scope(factory) as s, pytest.raises(Exception, match="no longer holds"):
        jobs.complete_item(s, item_id=a[0], attempt=a[1], worker="gpu0",
                           artifact_key="k", artifact_sha256="0" * 64)


def test_restart_cancels_or_fails_instead_when_due(factory):
    job_id = _job(factory, ["a"])
    _claim(factory, job_id, "gpu0")
    with session_scope(factory) as s:
        assert jobs.release_worker_items(s, worker="gpu0", max_attempts=1) == []
        job = jobs.get_job(s, job_id=job_id)
        assert (job.state, job.failure_kind) == ("failed", "lost")
    other = _job(factory, ["x", "y"])
    _claim(factory, other, "gpu0")
    with session_scope(factory) as s:
        jobs.request_cancel(s, job_id=other)
        assert jobs.release_worker_items(s, worker="gpu0") == []
        assert jobs.get_job(s, job_id=other).state == "cancelled"


def test_worker_start_releases_only_a_dead_namesakes_items():
    """Through the worker's own start-up step, on the embedded default: a live process
    of the same name keeps its items; once it is dead they are released and re-sent."""
    import os
    import socket
    import subprocess
    import sys

    from app.settings import get_settings
    from workers import gpu
    from workers.lifecycle import WorkerServices

    settings = get_settings()
    upgrade(settings.db_url)
    factory = None  # the default factory: what the worker itself uses
    job_id = _job(factory, ["a"])
    item_id, _ = _claim(factory, job_id, "w-gpu0")
    namesake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                env={**os.environ, gpu.WORKER_ENV: "w-gpu0"})
    try:
        with session_scope() as s:
            jobs.upsert_worker(s, name="w-gpu0", host=socket.gethostname(), pid=namesake.pid,
                               state="busy")
        services = WorkerServices(name="w-gpu0", gpu_index=None, model=None, dtype=None,
                                  queues=["q"], max_jobs=None, exit_when_idle=False)
        assert services.release_previous_items() == []
        with session_scope() as s:
            assert s.get(JobItem, item_id).state == "running"
    finally:
        namesake.kill()
        namesake.wait()
    assert services.release_previous_items() == [job_id]
    with session_scope() as s:
        assert s.get(JobItem, item_id).state == "queued"
        assert "enqueued" in [e.kind for e in jobs.list_events(s, job_id=job_id)]
