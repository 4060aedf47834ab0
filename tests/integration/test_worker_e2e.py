"""End to end with a real Celery worker process, Postgres, Redis and the S3-compatible server.

Never ``task_always_eager``: the worker is ``celery -A workers.celery_app worker --pool=solo``
started by ``workers.cli.spawn_worker`` in its own process group. The main test runs the
vLLM steering engine (``engine.backend=auto``); the mechanics tests (kill, OOM, cancel) use
the transformers backend, which starts in a second instead of ~20 s.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from tests.integration import worker_helpers as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def services(pg_url, redis_url, s3_bucket, monkeypatch, tmp_path):
    """Production adapters; short heartbeats and leases so a dead worker is found fast."""
    h.fast_fault_env(monkeypatch, pg_url, redis_url)
    procs = []
    yield procs, tmp_path / "logs"
    for p in procs:
        h.stop(p)


def _state_changes(row, to: str) -> list[str]:
    """Personas of the item events that moved an item to ``to``, one entry per move."""
    persona = {i["id"]: i["persona"] for i in row["items"]}
    return [persona[e["item_id"]] for e in row["events"]
            if e["item_id"] is not None and e["to"] == to and e["kind"] == "state"]


def test_capture_job_matches_direct_capture(services):
    from app.settings import get_settings
    from workers.runtime import pick_backend

    assert pick_backend(get_settings()) == "vllm"  # the main test runs the real engine
    procs, logs = services
    job_id = h.submit("capture")
    procs.append(h.start_worker("e2e-a", logs))
    row = h.wait_for(job_id, log_dir=logs, worker=procs[-1])
    assert row["state"] == "succeeded", row
    assert all(i["state"] == "succeeded" for i in row["items"])
    arts = h.check_artifacts(job_id, row)
    for item in row["items"]:  # progress ended complete, counting every stored sample
        assert item["samples_done"] == item["samples_total"] == len(arts[item["persona"]].keys)
    for art in arts.values():
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


def test_warm_worker_runs_jobs_back_to_back_on_one_engine_start(services):
    """Two capture jobs on one worker (the real vLLM engine): the engine starts once, when
    the worker starts; the second job's first persona starts within seconds of its submit,
    and neither job records an engine load, restart or switch."""
    from datetime import UTC

    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Job, JobItem

    procs, logs = services
    procs.append(h.start_worker("e2e-warm", logs))
    rows = []
    for _ in range(2):
        job_id = h.submit("capture", {"max_samples": 3})
        row = h.wait_for(job_id, log_dir=logs, worker=procs[-1])
        assert row["state"] == "succeeded", row
        with session_scope() as s:
            job = s.get(Job, job_id)
            created = job.created_at.replace(tzinfo=UTC)
            started = min(s.execute(select(JobItem.started_at).where(
                JobItem.job_id == job_id)).scalars()).replace(tzinfo=UTC)
        rows.append((row, (started - created).total_seconds()))
    for row, _ in rows:
        kinds = {e["kind"] for e in row["events"]}
        assert not kinds & {"engine_loaded", "engine_restart", "engine_switch"}, kinds
    assert rows[1][1] < 10.0, f"second job's first persona started {rows[1][1]:.1f}s after submit"
    log = (logs / "e2e-warm.log").read_text(errors="replace")
    assert log.count("engine started:") == 1, log[-3000:]


def test_sigkill_mid_job_resumes_every_persona_once(services, monkeypatch):
    """SIGKILL the worker after its first persona; a new process of the SAME name (a
    supervisor restart) must give the dead attempt's lease back, not renew it."""
    procs, logs = services
    monkeypatch.setenv("CHATSPACE_ENGINE_BACKEND", "hf")  # mechanics, not kernels: start fast
    job_id = h.submit("capture", {"batch_size": 1, "max_samples": 4})
    first = h.start_worker("e2e-gpu0", logs)
    procs.append(first)
    h.wait_for(job_id, until=lambda r: {"succeeded", "running"} <= {i["state"]
                                                                    for i in r["items"]},
               log_dir=logs, worker=first, interval=0.05)
    os.kill(first.pid, signal.SIGKILL)  # the worker only, mid-way through the second persona
    first.wait(10)
    row = h.job_row(job_id)
    assert row["state"] == "running", row
    assert any(i["state"] == "running" for i in row["items"]), row  # held by the dead one
    procs.append(h.start_worker("e2e-gpu0", logs))
    row = h.wait_for(job_id, log_dir=logs, worker=procs[-1])
    assert row["state"] == "succeeded", row
    h.check_artifacts(job_id, row)
    done = _state_changes(row, "succeeded")
    assert sorted(done) == sorted(i["persona"] for i in row["items"])  # each exactly once
    lost = [e for e in row["events"] if e["kind"] == "lost"]
    assert len(lost) == 1 and lost[0]["worker"] == "e2e-gpu0", lost
    assert max(i["attempt"] for i in row["items"]) == 2


def test_injected_oom_halves_then_fails_with_figures(services, monkeypatch):
    procs, logs = services
    monkeypatch.setenv("CHATSPACE_ENGINE_BACKEND", "hf")
    monkeypatch.setenv("CHATSPACE_FAULT_OOM", "*:99")
    job_id = h.submit("capture", {"batch_size": 4})
    procs.append(h.start_worker("e2e-oom", logs))
    row = h.wait_for(job_id, log_dir=logs, worker=procs[-1])
    assert row["state"] == "failed" and row["failure_kind"] == "oom", row
    retries = [e["data"] for e in row["events"] if e["kind"] == "oom_retry"]
    assert [r["batch_size"] for r in retries] == [4, 2]
    assert [r["next_batch_size"] for r in retries] == [2, 1]
    final = [e["data"] for e in row["events"] if e["kind"] == "oom_failed"]
    assert len(final) == 1 and final[0]["failed_sizes"] == [4, 2, 1] and "memory" in final[0]
    first, *rest = row["items"]
    assert (first["state"], first["failure_kind"], first["batch_size"]) == ("failed", "oom", 1)
    assert "batch size 1" in first["error"] and "tried 4, 2, 1" in first["error"]
    assert all(i["state"] == "failed" and i["failure_kind"] == "oom" and "not run" in i["error"]
               for i in rest), rest  # the job stops instead of halving every persona again
    assert row["manifest_key"] is None


def test_cancel_stops_between_batches(services, monkeypatch):
    from app import jobs
    from app.db import session_scope

    procs, logs = services
    monkeypatch.setenv("CHATSPACE_ENGINE_BACKEND", "hf")
    # 40 samples one at a time: the first persona runs for seconds after its first sample is
    # in (with 4 it could finish before the cancel was seen: the job then ended with the next
    # personas never started and nothing stopped mid-way)
    job_id = h.submit("capture", {"batch_size": 1, "max_samples": 40, "max_tokens": 48})
    procs.append(h.start_worker("e2e-cancel", logs))
    h.wait_for(job_id, until=lambda r: (r["items"][0]["samples_done"] or 0) >= 1,
               log_dir=logs, worker=procs[-1], interval=0.05)  # first persona under way
    with session_scope() as s:
        jobs.request_cancel(s, job_id=job_id)
    row = h.wait_for(job_id, log_dir=logs, worker=procs[-1], timeout=60)
    assert row["state"] == "cancelled", row
    states = [i["state"] for i in row["items"]]
    assert set(states) <= {"succeeded", "cancelled"} and states[-1] == "cancelled", row
    # the persona in flight stopped at a batch boundary, its remaining samples never ran
    stopped = [i for i in row["items"] if i["state"] == "cancelled" and i["samples_total"]]
    assert stopped and all(i["samples_done"] < i["samples_total"] for i in stopped), row["items"]
    assert row["manifest_key"] is None


def test_rollout_steered_by_an_earlier_capture_on_the_warm_worker(services, monkeypatch):
    """Two jobs on one worker (the engine stays warm): a capture, then a rollout steered by
    its ``pos_neg`` vector, stored as JSONL with the spec used and listed in the manifest."""
    import json

    from app.settings import get_settings
    from app.storage import get_store

    procs, logs = services
    monkeypatch.setenv("CHATSPACE_ENGINE_BACKEND", "hf")
    capture_id = h.submit("capture", {"max_samples": 2})
    procs.append(h.start_worker("e2e-roll", logs))
    assert h.wait_for(capture_id, log_dir=logs, worker=procs[-1])["state"] == "succeeded"
    steer = [{"op": "add", "layer": 2, "scale": 4.0,
              "from": {"job_id": capture_id, "vector": "pos_neg"}}]
    rollout_id = h.submit("rollout", {"max_samples": 2, "steer": steer})
    row = h.wait_for(rollout_id, log_dir=logs, worker=procs[-1])
    assert row["state"] == "succeeded", row
    assert not [e for e in row["events"] if e["kind"] == "engine_switch"]
    store = get_store(get_settings())
    for item in row["items"]:
        assert item["key"].endswith(f"/{item['persona']}.jsonl")
        lines = [json.loads(x) for x in store.get_bytes(
            item["key"], expect_sha256=item["sha256"]).decode().splitlines()]
        assert lines and all(x["persona"] == item["persona"] for x in lines)
        assert all(x["steer"] == [{"op": "add", "layer": 2, "scale": 4.0,
                                   "from": {"job_id": capture_id, "vector": "pos_neg"}}]
                   for x in lines)
        assert all(x["response_tokens"] >= 1 and x["question"] for x in lines)
