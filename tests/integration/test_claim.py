"""Claiming on real Postgres: many threads and processes, one job, no item taken twice.

Each claim's transaction is held open a moment after the claim so that claimers overlap;
without ``SKIP LOCKED`` (or with no lock at all) two claimers pick the same row and the
loser's guarded UPDATE finds nothing, which surfaces as an InvalidTransition here.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import select

from app import jobs
from app.db import make_engine, session_factory, session_scope, upgrade
from app.errors import InvalidTransition
from app.models import JobEvent, JobItem

N_ITEMS = 60


def _setup(url: str, n: int = N_ITEMS):
    upgrade(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    with session_scope(factory) as s:
        job = jobs.create_job(s, kind="capture", dataset="d", model="m", dtype="float32",
                              params={}, personas=[f"p{i:03d}" for i in range(n)], queue="q")
        return engine, factory, job.id


def _claim_all(url: str, job_id: str, worker: str, hold_s: float = 0.002) -> list[int]:
    """Claim and complete items until none is left; returns the claimed item ids."""
    engine = make_engine(url)
    factory = session_factory(engine)
    got = []
    try:
        while True:
            with session_scope(factory) as s:
                item = jobs.claim_item(s, job_id=job_id, worker=worker, lease_s=60)
                if item is None:
                    return got
                item_id, attempt = item.id, item.attempt
                time.sleep(hold_s)  # keep the row locked while others look for work
            got.append(item_id)
            with session_scope(factory) as s:
                jobs.complete_item(s, item_id=item_id, attempt=attempt, worker=worker,
                                   artifact_key=f"k/{item_id}", artifact_sha256="0" * 64)
    finally:
        engine.dispose()


def _check_exactly_once(factory, job_id, claimed: dict[str, list[int]]) -> None:
    counts = Counter(i for ids in claimed.values() for i in ids)
    assert counts and max(counts.values()) == 1, "an item was claimed twice"
    with session_scope(factory) as s:
        items = s.execute(select(JobItem).where(JobItem.job_id == job_id)).scalars().all()
        assert set(counts) == {i.id for i in items}
        assert all(i.state == "succeeded" and i.attempt == 1 for i in items)
        claims = s.execute(select(JobEvent).where(JobEvent.job_id == job_id,
                                                  JobEvent.to_state == "running",
                                                  JobEvent.item_id.is_not(None))).scalars().all()
        assert Counter(e.item_id for e in claims) == counts
        for item in items:  # the recorded holder is the worker that got it
            owner = next(w for w, ids in claimed.items() if item.id in ids)
            assert item.artifact_key == f"k/{item.id}"
            assert any(e.worker == owner for e in claims if e.item_id == item.id)
        job = jobs.finish_job_if_done(s, job_id=job_id, manifest_key="k/manifest.json")
        assert job is not None and job.state == "succeeded" and job.items_done == len(items)


def test_threads_claim_each_item_exactly_once(pg_url):
    engine, factory, job_id = _setup(pg_url)
    n_threads = 8
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def run(name: str) -> None:
        try:
            barrier.wait()
            claimed[name] = _claim_all(pg_url, job_id, name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sum(1 for ids in claimed.values() if ids) > 1, "no concurrency happened"
    _check_exactly_once(factory, job_id, claimed)
    engine.dispose()


def _process_main(args):
    url, job_id, name = args
    return name, _claim_all(url, job_id, name)


def test_processes_claim_each_item_exactly_once(pg_url):
    engine, factory, job_id = _setup(pg_url, n=40)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.map(_process_main, [(pg_url, job_id, f"proc{i}") for i in range(3)])
    _check_exactly_once(factory, job_id, dict(results))
    engine.dispose()


def test_stale_worker_cannot_complete_after_takeover(pg_url):
    engine, factory, job_id = _setup(pg_url, n=1)
    with session_scope(factory) as s:
        stale = jobs.claim_item(s, job_id=job_id, worker="old", lease_s=30)
        item_id, old_attempt = stale.id, stale.attempt
    with session_scope(factory) as s:  # the old worker goes silent; its lease runs out
        assert jobs.reap_expired(s, now=jobs._now() + timedelta(seconds=31)) == [job_id]
    with session_scope(factory) as s:
        fresh = jobs.claim_item(s, job_id=job_id, worker="new", lease_s=30)
        assert fresh.id == item_id and fresh.attempt == old_attempt + 1

    for call in (
        lambda s: jobs.complete_item(s, item_id=item_id, attempt=old_attempt, worker="old",
                                     artifact_key="stale", artifact_sha256="1" * 64),
        lambda s: jobs.fail_item(s, item_id=item_id, attempt=old_attempt, worker="old",
                                 failure_kind="error", error="late", requeue=True),
        lambda s: jobs.release_item(s, item_id=item_id, attempt=old_attempt, worker="old"),
    ):
        with pytest.raises(InvalidTransition), session_scope(factory) as s:
            call(s)
    with session_scope(factory) as s:
        assert jobs.extend_leases(s, worker="old", lease_s=30) == 0
        item = s.get(JobItem, item_id)
        assert (item.state, item.lease_owner, item.artifact_key) == ("running", "new", None)
        jobs.complete_item(s, item_id=item_id, attempt=fresh.attempt, worker="new",
                           artifact_key="good", artifact_sha256="2" * 64)
    with session_scope(factory) as s:
        assert s.get(JobItem, item_id).artifact_key == "good"
        assert jobs.finish_job_if_done(s, job_id=job_id,
                                       manifest_key="k/manifest.json").state == "succeeded"
    engine.dispose()
