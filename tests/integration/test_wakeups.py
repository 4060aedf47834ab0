"""Wake-ups on real Postgres and Redis: how many messages a submit sends, and that the
reconciler refills only an empty queue, so the queue stays bounded by the open work.

Workers here are rows (a heartbeat, the queues they consume, what they hold); the broker and
the database are real, and the queue length is Redis's own count. The end-to-end behaviour
(idle workers all claiming within seconds, the queue length during a burst) is measured with
real worker processes in tests/reliability/test_spread.py.
"""

from __future__ import annotations

import threading

import pytest
import redis

from app import jobs
from app.db import default_factory, dispose_all, session_scope, upgrade
from app.queues import queue_name

MODEL, DTYPE = "tiny:qwen3", "float32"
QUEUE = queue_name(MODEL, DTYPE)


@pytest.fixture
def env(pg_url, redis_url, monkeypatch):
    from app.settings import get_settings

    monkeypatch.setenv("CHATSPACE_DATABASE_URL", pg_url)
    monkeypatch.setenv("CHATSPACE_BROKER_URL", redis_url)
    get_settings.cache_clear()
    upgrade(pg_url)
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()
    dispose_all()


def _scope():
    return session_scope(default_factory())


def _job(n: int) -> str:
    with _scope() as s:
        return jobs.create_job(s, kind="capture", dataset="d", model=MODEL, dtype=DTYPE,
                               personas=[f"p{i}" for i in range(n)], queue=QUEUE).id


def _workers(*names: str, state: str = "idle") -> None:
    with _scope() as s:
        for name in names:
            jobs.heartbeat(s, name=name, lease_s=60, state=state, queues=[QUEUE])


def _enqueued(job_id: str) -> list[dict]:
    with _scope() as s:
        return [e.data for e in jobs.list_events(s, job_id=job_id) if e.kind == "enqueued"]


def test_submit_wakes_one_worker_per_item_up_to_the_live_pool(env):
    from workers.dispatch import enqueue_job

    lonely = _job(4)
    enqueue_job(lonely)  # no live worker: one message, and a waiting event
    assert env.llen(QUEUE) == 1
    env.delete(QUEUE)
    _workers("w1", "w2", "w3")
    big, small = _job(6), _job(2)
    enqueue_job(big)
    assert env.llen(QUEUE) == 3  # every live worker of the pool gets one
    enqueue_job(small, reason="retry")
    assert env.llen(QUEUE) == 5  # no more than the job has items
    assert _enqueued(big)[-1] == {"queue": QUEUE, "reason": "submitted", "messages": 3}
    assert _enqueued(small)[-1]["messages"] == 2 and _enqueued(small)[-1]["reason"] == "retry"


def test_reconciler_refills_only_an_empty_queue(env):
    from workers.dispatch import enqueue_job, reconcile

    _workers("w1", "w2", "w3")
    job = _job(6)
    enqueue_job(job)
    assert env.llen(QUEUE) == 3
    for _ in range(5):  # messages waiting: workers will take them, nothing more is sent
        assert reconcile() == []
    assert env.llen(QUEUE) == 3

    env.flushdb()  # the broker lost them (a Redis restart)
    assert reconcile() == [job]
    assert env.llen(QUEUE) == 3  # one for the job, two more for the other idle workers
    assert _enqueued(job)[-1] == {"queue": QUEUE, "reason": "reconciler", "messages": 3,
                                  "why": "no live holder"}
    for _ in range(5):
        reconcile()
    assert env.llen(QUEUE) == 3  # bounded: never more than the open work


def test_reconciler_wakes_idle_workers_for_a_job_one_worker_holds(env):
    from workers.dispatch import reconcile

    _workers("w1", "w2", "w3")
    job = _job(5)
    with _scope() as s:
        jobs.claim_item(s, job_id=job, worker="w1", lease_s=60)
    _workers("w1", state="busy")
    assert reconcile() == [job]
    assert env.llen(QUEUE) == 2  # w2 and w3; w1 holds an item and is not woken
    assert _enqueued(job)[-1]["why"] == "idle workers"
    with _scope() as s:  # everything claimed: nothing left to wake anyone for
        for w in ("w2", "w3", "w2", "w3"):
            jobs.claim_item(s, job_id=job, worker=w, lease_s=60)
    env.flushdb()
    assert reconcile() == []
    assert env.llen(QUEUE) == 0


def test_reconcilers_in_parallel_send_once(env):
    from workers.dispatch import reconcile

    _workers("w1", "w2")
    jobs_ = [_job(1) for _ in range(5)]
    results: list[list[str]] = []
    barrier = threading.Barrier(4)

    def run():
        barrier.wait()
        results.append(reconcile())

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    woken = [j for r in results for j in r]
    assert sorted(woken) == sorted(jobs_), results  # each job once, by one reconciler
    assert env.llen(QUEUE) == 5
