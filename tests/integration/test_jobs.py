"""Job lifecycle through the service layer, on Postgres and on SQLite."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from app import jobs
from app.db import session_scope
from app.errors import InvalidTransition, JobNotFound, SpecInvalid
from app.models import Artifact, JobItem

PERSONAS = ["curious", "optimistic", "sycophantic"]


def _submit(factory, personas=PERSONAS, **kw) -> str:
    with session_scope(factory) as s:
        return jobs.create_job(s, kind="capture", dataset="traits_sample", model="m",
                               dtype="float32", params={"layers": [1, 2]}, personas=personas,
                               queue="q", **kw).id


def _claim(factory, job_id, worker="w1", lease_s=60):
    with session_scope(factory) as s:
        item = jobs.claim_item(s, job_id=job_id, worker=worker, lease_s=lease_s)
        return None if item is None else (item.id, item.attempt, item.persona)


def _complete(factory, claim, worker="w1"):
    item_id, attempt, persona = claim
    with session_scope(factory) as s:
        jobs.complete_item(s, item_id=item_id, attempt=attempt, worker=worker,
                           artifact_key=f"a/{persona}.safetensors", artifact_sha256="f" * 64)


def _states(factory, job_id) -> dict[str, str]:
    with session_scope(factory) as s:
        return {i["persona"]: i["state"] for i in jobs.progress(s, job_id=job_id)["items"]}


def test_lifecycle_to_succeeded(factory):
    job_id = _submit(factory)
    with session_scope(factory) as s:
        assert jobs.jobs_needing_dispatch(s) == [job_id]
        assert jobs.get_job(s, job_id=job_id).state == "queued"
    claims = []
    for expected in PERSONAS:  # items come out in submission order
        claims.append(_claim(factory, job_id))
        assert claims[-1][2] == expected
    assert _claim(factory, job_id) is None
    with session_scope(factory) as s:
        assert jobs.jobs_needing_dispatch(s) == []
        assert jobs.get_job(s, job_id=job_id).state == "running"
        jobs.progress(s, item_id=claims[0][0], done=3, total=8)
    for claim in claims[:2]:
        _complete(factory, claim)
    with session_scope(factory) as s:
        assert jobs.finish_job_if_done(s, job_id=job_id) is None  # one still running
        p = jobs.progress(s, job_id=job_id)
        assert p["counts"]["succeeded"] == 2 and p["counts"]["running"] == 1
        assert p["items"][0]["samples_done"] == 3 and p["items"][0]["samples_total"] == 8
    _complete(factory, claims[2])
    with session_scope(factory) as s:
        # a worker that read the items before the last one finished writes no manifest: it
        # must not end the job, or the job would read succeeded before the manifest is stored
        assert jobs.finish_job_if_done(s, job_id=job_id) is None
        assert jobs.get_job(s, job_id=job_id).state == "running"
    with session_scope(factory) as s:
        job = jobs.finish_job_if_done(s, job_id=job_id, manifest_key="a/manifest.json")
        assert job.state == "succeeded" and job.items_done == 3 and job.items_failed == 0
        assert job.manifest_key == "a/manifest.json"
        assert job.started_at is not None and job.finished_at is not None
        assert jobs.finish_job_if_done(s, job_id=job_id) is None  # already finished
        job_events = [(e.from_state, e.to_state) for e in jobs.list_events(s, job_id=job_id)
                      if e.kind == "state" and e.item_id is None]
        assert job_events == [(None, "queued"), ("queued", "running"), ("running", "succeeded")]


def test_failure_then_retry_keeps_succeeded_items(factory):
    job_id = _submit(factory)
    first, second, third = (_claim(factory, job_id) for _ in PERSONAS)
    _complete(factory, first)
    with session_scope(factory) as s:
        jobs.fail_item(s, item_id=second[0], attempt=second[1], worker="w1", failure_kind="oom",
                       error="CUDA out of memory at batch 2", requeue=False, batch_size=2,
                       memory={"used": 10, "total": 11})
    _complete(factory, third)
    with session_scope(factory) as s:
        job = jobs.finish_job_if_done(s, job_id=job_id)
        assert (job.state, job.failure_kind, job.items_done, job.items_failed) == (
            "failed", "oom", 2, 1)
        assert "optimistic" in job.error and "out of memory" in job.error
        failed = s.get(JobItem, second[0])
        assert (failed.batch_size, failed.failure_kind) == (2, "oom")
        ev = [e for e in jobs.list_events(s, job_id=job_id) if e.item_id == second[0]][-1]
        assert ev.data["batch_size"] == 2 and ev.data["memory"]["used"] == 10

    with session_scope(factory) as s:
        job = jobs.retry_job(s, job_id=job_id)
        assert (job.state, job.retries, job.items_done, job.items_failed) == ("queued", 1, 2, 0)
        assert job.failure_kind is None and job.error is None
    assert _states(factory, job_id) == {"curious": "succeeded", "optimistic": "queued",
                                        "sycophantic": "succeeded"}
    with session_scope(factory) as s:
        assert s.get(JobItem, first[0]).artifact_key == "a/curious.safetensors"
    again = _claim(factory, job_id)
    assert again[2] == "optimistic" and again[1] == second[1] + 1
    assert _claim(factory, job_id) is None
    _complete(factory, again)
    with session_scope(factory) as s:
        assert jobs.finish_job_if_done(s, job_id=job_id,
                                       manifest_key="a/manifest.json").state == "succeeded"
        with pytest.raises(InvalidTransition):
            jobs.retry_job(s, job_id=job_id)


def test_requeue_on_failure_records_the_attempt(factory):
    job_id = _submit(factory, personas=["a"])
    claim = _claim(factory, job_id)
    with session_scope(factory) as s:
        item = jobs.fail_item(s, item_id=claim[0], attempt=claim[1], worker="w1",
                              failure_kind="oom", error="oom", requeue=True, batch_size=4)
        assert (item.state, item.batch_size, item.lease_owner) == ("queued", 4, None)
        assert jobs.get_job(s, job_id=job_id).items_failed == 0
    assert _claim(factory, job_id)[1] == 2


def test_cancel_queued_job(factory):
    job_id = _submit(factory)
    with session_scope(factory) as s:
        job = jobs.request_cancel(s, job_id=job_id)
        assert job.state == "cancelled" and job.cancel_requested
    assert set(_states(factory, job_id).values()) == {"cancelled"}
    assert _claim(factory, job_id) is None
    with session_scope(factory) as s:
        assert jobs.request_cancel(s, job_id=job_id).state == "cancelled"  # idempotent
        assert jobs.retry_job(s, job_id=job_id).state == "queued"
    assert set(_states(factory, job_id).values()) == {"queued"}
    with session_scope(factory) as s:
        assert not jobs.get_job(s, job_id=job_id).cancel_requested


def test_cancel_running_job_waits_for_its_worker(factory):
    job_id = _submit(factory)
    running = _claim(factory, job_id)
    with session_scope(factory) as s:
        job = jobs.request_cancel(s, job_id=job_id)
        assert job.state == "running" and job.cancel_requested
    assert _claim(factory, job_id, worker="w2") is None
    with session_scope(factory) as s:
        assert jobs.jobs_needing_dispatch(s) == []
        item = jobs.release_item(s, item_id=running[0], attempt=running[1], worker="w1")
        assert item.state == "cancelled"
        assert jobs.finish_job_if_done(s, job_id=job_id).state == "cancelled"


def test_cancel_finished_job_is_refused(factory):
    job_id = _submit(factory, personas=["a"])
    _complete(factory, _claim(factory, job_id))
    with session_scope(factory) as s:
        jobs.finish_job_if_done(s, job_id=job_id, manifest_key="a/manifest.json")
    with pytest.raises(InvalidTransition, match="succeeded"), session_scope(factory) as s:
        jobs.request_cancel(s, job_id=job_id)


def test_release_without_cancel_requeues(factory):
    job_id = _submit(factory, personas=["a"])
    claim = _claim(factory, job_id)
    with session_scope(factory) as s:
        assert jobs.release_item(s, item_id=claim[0], attempt=claim[1],
                                 worker="w1").state == "queued"
        assert jobs.jobs_needing_dispatch(s) == [job_id]


def test_reap_expired_requeues_then_fails_as_lost(factory):
    job_id = _submit(factory, personas=["a", "b"])
    claim_a = _claim(factory, job_id, lease_s=30)
    with session_scope(factory) as s:
        assert jobs.reap_expired(s, now=jobs._now() + timedelta(seconds=20)) == []
        assert jobs.extend_leases(s, worker="w1", lease_s=120) == 1
        assert jobs.reap_expired(s, now=jobs._now() + timedelta(seconds=60)) == []
        assert jobs.reap_expired(s, now=jobs._now() + timedelta(seconds=121)) == [job_id]
        lost = [e for e in jobs.list_events(s, job_id=job_id) if e.kind == "lost"]
        assert len(lost) == 1 and lost[0].item_id == claim_a[0] and lost[0].worker == "w1"
        assert s.get(JobItem, claim_a[0]).failure_kind == "lost"
    _complete(factory, _claim(factory, job_id))  # a, second attempt
    claim_b = _claim(factory, job_id)
    with session_scope(factory) as s:  # b's worker dies on its last allowed attempt
        assert jobs.reap_expired(s, now=jobs._now() + timedelta(seconds=61),
                                 max_attempts=1) == []
        job = jobs.get_job(s, job_id=job_id)
        assert (job.state, job.failure_kind) == ("failed", "lost")
        assert s.get(JobItem, claim_b[0]).state == "failed"


def test_dead_workers_are_reaped(factory):
    job_id = _submit(factory, personas=["a"])
    with session_scope(factory) as s:
        jobs.upsert_worker(s, name="w1", state="busy", host="h1", pid=11, gpu=0,
                           queues=["q"], memory={"used": 5, "total": 10}, model="m")
        jobs.upsert_worker(s, name="w2", state="idle")
    claim = _claim(factory, job_id)
    later = jobs._now() + timedelta(seconds=45)
    with session_scope(factory) as s:
        jobs.upsert_worker(s, name="w2", state="idle", heartbeat_at=later)
        assert jobs.reap_dead_workers(s, stale_s=30, now=later) == ["w1"]
        assert jobs.reap_dead_workers(s, stale_s=30, now=later) == []  # stopped stays stopped
        workers = {w.name: w for w in jobs.list_workers(s)}
        assert workers["w1"].state == "stopped" and workers["w2"].state == "idle"
        assert (workers["w1"].hostname, workers["w1"].gpu, workers["w1"].gpu_mem_used) == (
            "h1", "0", 5)
        assert jobs.reap_expired(s, now=later) == [job_id]
    assert _claim(factory, job_id, worker="w2")[0] == claim[0]


def test_upsert_worker_rejects_unknown_fields(factory):
    with pytest.raises(ValueError, match="gpu_temp"), session_scope(factory) as s:
        jobs.upsert_worker(s, name="w", gpu_temp=80)
    with pytest.raises(ValueError, match="state"), session_scope(factory) as s:
        jobs.upsert_worker(s, name="w", state="napping")


def test_create_job_validates_input(factory):
    for kw, field in (({"kind": "train"}, "kind"), ({"personas": []}, "personas"),
                      ({"personas": ["a", "a"]}, "personas")):
        args = {"kind": "capture", "personas": ["a"], **kw}
        with pytest.raises(SpecInvalid) as exc, session_scope(factory) as s:
            jobs.create_job(s, dataset="d", model="m", dtype="float32", params={},
                            queue="q", **args)
        assert exc.value.field == field
    with pytest.raises(JobNotFound), session_scope(factory) as s:
        jobs.get_job(s, job_id="missing")


def test_create_job_defaults_personas_and_queue_from_dataset(factory):
    with session_scope(factory) as s:
        job = jobs.create_job(s, kind="capture", dataset="traits_sample", model="Org/M-1",
                              dtype="float16", params={})
        items = s.execute(select(JobItem.persona).where(JobItem.job_id == job.id)
                          .order_by(JobItem.position)).scalars().all()
        # the default persona first: captured once per job for every vector against it
        assert items == ["default", "curious", "optimistic", "sycophantic"]
        assert job.queue == "chatspace.org_m-1.float16"
        rollout = jobs.create_job(s, kind="rollout", dataset="traits_sample", model="Org/M-1",
                                  dtype="float16", params={})
        assert rollout.items_total == 3


def test_list_jobs_filters_and_artifacts_upsert(factory):
    a, b = _submit(factory), _submit(factory, personas=["x"])
    with session_scope(factory) as s:
        jobs.request_cancel(s, job_id=b)
        assert [j.id for j in jobs.list_jobs(s, state="cancelled")] == [b]
        assert {j.id for j in jobs.list_jobs(s, model="m")} == {a, b}
        assert jobs.list_jobs(s, dataset="other") == []
        assert len(jobs.list_jobs(s, limit=1)) == 1
        jobs.record_artifact(s, job_id=a, key="k", sha256="1" * 64, size=3, meta={"n": 1})
        jobs.record_artifact(s, job_id=a, key="k", sha256="2" * 64, size=4, meta={"n": 2})
        rows = s.execute(select(Artifact).where(Artifact.key == "k")).scalars().all()
        assert len(rows) == 1 and (rows[0].sha256, rows[0].size, rows[0].meta) == (
            "2" * 64, 4, {"n": 2})
        ev = jobs.record_event(s, job_id=a, kind="engine_restart", data={"why": "dirty"})
        assert jobs.list_events(s, job_id=a, after_id=ev.id - 1)[0].data == {"why": "dirty"}
