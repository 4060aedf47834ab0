"""Heartbeats and the reaper on real Postgres, concurrently: no deadlock.

A heartbeat updates its worker's row and then extends the leases of its items in one
transaction. The reaper used to lock the items of a worker it thought dead and then that
worker's row — the opposite order — so a heartbeat arriving just as the reaper gave up on its
worker deadlocked with it (Postgres aborts one after ``deadlock_timeout``). The first test
forces exactly that interleaving; the second runs heartbeats, claims and reapers in threads
for a few seconds with a staleness threshold so short that workers are reaped and revived
all the time.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import timedelta

from sqlalchemy import select, text

from app import jobs
from app.db import make_engine, session_factory, session_scope, upgrade
from app.models import JobItem, Worker


def _setup(url: str, personas: int, workers: list[str]):
    upgrade(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    with session_scope(factory) as s:
        job = jobs.create_job(s, kind="capture", dataset="d", model="m", dtype="float32",
                              params={}, personas=[f"p{i}" for i in range(personas)], queue="q")
        for name in workers:
            jobs.heartbeat(s, name=name, lease_s=60, state="idle")
    return engine, factory, job.id


def _waiting_on_lock(factory, pid: int) -> bool:
    with session_scope(factory) as s:
        return s.execute(text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :p"),
                         {"p": pid}).scalar() == "Lock"


def test_heartbeat_arriving_while_the_reaper_reaps_its_worker(pg_url):
    engine, factory, job_id = _setup(pg_url, 1, ["w1"])
    with session_scope(factory) as s:
        item = jobs.claim_item(s, job_id=job_id, worker="w1", lease_s=60)
        item_id = item.id
        s.get(Worker, "w1").heartbeat_at = jobs._now() - timedelta(seconds=120)  # looks dead
    reaper_pid: list[int] = []
    row_locked, reaper_done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def heartbeat():
        try:
            with session_scope(session_factory(make_engine(pg_url))) as s:
                jobs.upsert_worker(s, name="w1", state="busy")  # the worker row is locked now
                row_locked.set()
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not reaper_done.is_set():
                    if reaper_pid and _waiting_on_lock(factory, reaper_pid[0]):
                        break  # the reaper waits on us: the old order deadlocks next
                    time.sleep(0.02)
                jobs.extend_leases(s, worker="w1", lease_s=60)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reap():
        try:
            row_locked.wait(10)
            with session_scope(session_factory(make_engine(pg_url))) as s:
                reaper_pid.append(s.execute(text("SELECT pg_backend_pid()")).scalar())
                jobs.reap_dead_workers(s, stale_s=30)
                jobs.reap_expired(s)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            reaper_done.set()

    threads = [threading.Thread(target=heartbeat), threading.Thread(target=reap)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, [f"{type(e).__name__}: {e}"[:300] for e in errors]
    with session_scope(factory) as s:
        item = s.get(JobItem, item_id)
        worker = s.get(Worker, "w1")
        # the heartbeat won: its worker is alive and keeps its item
        assert (item.state, item.lease_owner, worker.state) == ("running", "w1", "busy")
        assert item.lease_expires_at > jobs._now() + timedelta(seconds=30)
    engine.dispose()


def test_heartbeats_claims_and_reapers_in_threads(pg_url):
    names = [f"w{i}" for i in range(4)]
    engine, factory, job_id = _setup(pg_url, 40, names)
    stop = threading.Event()
    errors: list[str] = []
    counts = {"heartbeats": 0, "reaps": 0, "reaped": 0}

    def worker(name: str):
        f = session_factory(make_engine(pg_url))
        rnd = random.Random(name)
        while not stop.is_set():
            try:
                with session_scope(f) as s:
                    if not s.execute(select(JobItem.id).where(
                            JobItem.lease_owner == name)).first():
                        jobs.claim_item(s, job_id=job_id, worker=name, lease_s=60)
                with session_scope(f) as s:
                    jobs.upsert_worker(s, name=name, state="busy")
                    time.sleep(rnd.uniform(0, 0.01))  # widen the window between the two
                    jobs.extend_leases(s, worker=name, lease_s=60)
                counts["heartbeats"] += 1
            except Exception as exc:  # noqa: BLE001 - collected, asserted empty
                errors.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
            time.sleep(rnd.uniform(0, 0.02))

    def reaper(seed: int):
        f = session_factory(make_engine(pg_url))
        rnd = random.Random(seed)
        while not stop.is_set():
            try:
                with session_scope(f) as s:
                    dead = jobs.reap_dead_workers(s, stale_s=0.015)
                    jobs.reap_expired(s, max_attempts=10**6)
                counts["reaps"] += 1
                counts["reaped"] += len(dead)
            except Exception as exc:  # noqa: BLE001 - collected, asserted empty
                errors.append(f"reaper{seed}: {type(exc).__name__}: {exc}"[:300])
            time.sleep(rnd.uniform(0, 0.01))

    threads = [threading.Thread(target=worker, args=(n,)) for n in names]
    threads += [threading.Thread(target=reaper, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(4.0)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:5]
    assert counts["heartbeats"] > 20 and counts["reaps"] > 20, counts
    assert counts["reaped"] > 0, counts  # the race was exercised
    with session_scope(factory) as s:  # every running item has a holder and a lease
        for item in s.execute(select(JobItem).where(JobItem.state == "running")).scalars():
            assert item.lease_owner in names and item.lease_expires_at is not None, item.id
    engine.dispose()
