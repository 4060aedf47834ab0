"""Redis and Postgres restarted under a running job.

Redis (``--save '' --appendonly no``) comes back empty: every queued message is gone. No job
may be lost: Postgres is the truth and the workers' reconciler re-sends queued/running work.
Postgres restarted mid-job: the worker must ride it out (pre-ping, retries with backoff) and
finish the job, with every persona stored once.
"""

from __future__ import annotations

import time

import pytest

from tests.reliability.checks import TERMINAL, StatusPoller, verify_jobs, wait_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _first_item_done(job):
    return lambda r: r[job]["state"] in TERMINAL or any(
        i["state"] == "succeeded" for i in r[job]["items"])


def test_redis_restart_loses_no_job(stack):
    running = stack.submit(max_samples=3, batch_size=1, max_tokens=6)
    waiting = [stack.submit() for _ in range(2)]  # still in Redis when it dies
    jobs = [running, *waiting]
    stack.start_worker("rel-redis")
    with StatusPoller(stack.http, jobs) as poll:
        wait_jobs(jobs, timeout=150, until=_first_item_done(running), logs=stack.log_tail)
        stack.redis.restart(down_s=1.0)
        t0 = time.monotonic()
        final = wait_jobs(jobs, timeout=180, logs=stack.log_tail)
        recovery = time.monotonic() - t0
    fig = verify_jobs(jobs, scenario="Redis restarted mid-job")
    resent = [e for j in jobs for e in final[j]["events"]
              if e["kind"] == "enqueued" and e["data"].get("reason") == "reconciler"]
    assert resent, "no job came back through the reconciler"
    assert not poll.errors, poll.errors[:5]
    fig.recovery_s, fig.p99_ms = round(recovery, 1), poll.p99_ms()
    fig.notes.append(f"reconciler re-sends: {len(resent)}")
    fig.record()
    assert fig.lost == 0 and fig.duplicates == 0, fig


def test_postgres_restart_worker_rides_it_out(stack):
    job = stack.submit(max_samples=4, batch_size=1, max_tokens=6)
    worker = stack.start_worker("rel-pg")
    with StatusPoller(stack.http, [job]) as poll:
        wait_jobs([job], timeout=150, until=_first_item_done(job), logs=stack.log_tail)
        stack.pg.stop("fast")
        time.sleep(3.0)
        stack.pg.start()
        t0 = time.monotonic()
        wait_jobs([job], timeout=90, logs=stack.log_tail)
        recovery = time.monotonic() - t0
    fig = verify_jobs([job], scenario="Postgres restarted mid-job")
    assert worker.poll() is None, "the worker died with its database"
    fig.recovery_s, fig.p99_ms = round(recovery, 1), poll.p99_ms()
    fig.notes.append(f"status API errors while the database was down: {len(poll.errors)}")
    fig.record()
    assert fig.lost == 0 and fig.duplicates == 0, fig
