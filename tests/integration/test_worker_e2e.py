"""End to end with a real Celery worker process, Postgres, Redis and the S3-compatible server.

Never ``task_always_eager``: the worker is ``celery -A workers.celery_app worker --pool=solo``
started by ``workers.cli.spawn_worker`` in its own process group.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

pytest.importorskip("app.jobs", reason="foundation (app.jobs) not in the tree yet")
pytest.importorskip("workers.engine.hf", reason="engine backends not in the tree yet")

from tests.integration import worker_helpers as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def services(pg_url, redis_url, s3_bucket, monkeypatch, tmp_path):
    """Production adapters; short heartbeats and leases so a dead worker is found fast."""
    from app.db import upgrade

    from app.settings import get_settings

    monkeypatch.setenv("CHATSPACE_DATABASE_URL", pg_url)
    monkeypatch.setenv("CHATSPACE_BROKER_URL", redis_url)
    monkeypatch.setenv("CHATSPACE_HEARTBEAT_S", "1")
    monkeypatch.setenv("CHATSPACE_LEASE_S", "4")
    monkeypatch.setenv("CHATSPACE_WORKER_STALE_S", "4")
    monkeypatch.setenv("CHATSPACE_REAPER_INTERVAL_S", "1")
    get_settings.cache_clear()
    upgrade(pg_url)
    procs = []
    yield procs, tmp_path / "logs"
    for p in procs:
        h.stop(p)


def test_capture_job_matches_direct_capture(services):
    procs, logs = services
    job_id = h.submit("capture")
    procs.append(h.start_worker("e2e-a", logs))
    row = h.wait_for(job_id, log_dir=logs)
    assert row["state"] == "succeeded", row
    assert all(i["state"] == "done" for i in row["items"])
    arts = h.check_artifacts(job_id)
    assert set(arts) == {i["persona"] for i in row["items"]}
    for persona, art in arts.items():
        ref = h.reference_vectors(art)
        # Same conversations re-read by the transformers backend in fp32. The engines differ
        # only in kernels (vLLM CPU attention vs torch SDPA) and summation order: differences
        # are ~1e-6 relative; 1e-3 bounds them while any span or layer mix-up (O(1)) fails.
        scale = max(1.0, float(np.abs(ref["activations"]).max()))
        np.testing.assert_allclose(art.activations, ref["activations"], rtol=1e-3,
                                   atol=1e-3 * scale)
        assert set(art.vectors) == set(ref["vectors"])
        for name, vec in ref["vectors"].items():
            np.testing.assert_allclose(art.vectors[name], vec, rtol=1e-3, atol=1e-3 * scale)


def test_sigkill_mid_job_resumes_every_persona_once(services, monkeypatch):
    procs, logs = services
    monkeypatch.setenv("CHATSPACE_ENGINE_BACKEND", "hf")  # mechanics, not kernels: start fast
    job_id = h.submit("capture", {"batch_size": 1, "max_samples": 6})
    first = h.start_worker("e2e-killed", logs)
    procs.append(first)
    h.wait_for(job_id, until=lambda r: any(i["state"] == "done" for i in r["items"]),
               log_dir=logs)
    os.kill(first.pid, signal.SIGKILL)  # the worker only: engine children become orphans
    first.wait(10)
    row = h.job_row(job_id)
    assert row["state"] == "running", row
    procs.append(h.start_worker("e2e-rescuer", logs))
    row = h.wait_for(job_id, log_dir=logs)
    assert row["state"] == "succeeded", row
    arts = h.check_artifacts(job_id)
    assert sorted(arts) == sorted(i["persona"] for i in row["items"])
    completed = [e["data"].get("persona") for e in row["events"] if e["kind"] == "item_done"]
    if completed:  # when the service layer records completions, each persona exactly once
        assert sorted(completed) == sorted(set(completed))


def test_injected_oom_halves_then_fails_with_figures(services, monkeypatch):
    procs, logs = services
    monkeypatch.setenv("CHATSPACE_ENGINE_BACKEND", "hf")
    monkeypatch.setenv("CHATSPACE_FAULT_OOM", "*:99")
    job_id = h.submit("capture", {"batch_size": 4})
    procs.append(h.start_worker("e2e-oom", logs))
    row = h.wait_for(job_id, log_dir=logs)
    assert row["state"] == "failed" and row["failure_kind"] == "oom", row
    retries = [e["data"] for e in row["events"] if e["kind"] == "oom_retry"]
    assert [r["batch_size"] for r in retries] == [4, 2]
    assert [r["next_batch_size"] for r in retries] == [2, 1]
    final = [e["data"] for e in row["events"] if e["kind"] == "oom_failed"]
    assert final and final[0]["failed_sizes"] == [4, 2, 1] and "memory" in final[0]
