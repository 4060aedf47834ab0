"""A worker SIGKILLed mid-job; a new worker finishes it, recomputing at most what was in flight.

The kill hits the worker process only (as the OOM killer would): its lease stops being
extended, the new worker's reaper finds it dead after ``worker_stale_s``, returns its items to
the queue and the reconciler re-sends the job. Personas already stored are never recomputed.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.reliability.checks import TERMINAL, StatusPoller, job_state, verify_jobs, wait_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_sigkill_mid_job_new_worker_completes(stack):
    job = stack.submit(max_samples=3, batch_size=1, max_tokens=6)
    first = stack.start_worker("rel-kill-a")
    with StatusPoller(stack.http, [job]) as poll:
        wait_jobs([job], timeout=150, logs=stack.log_tail, until=lambda r: r[job]["state"]
                  in TERMINAL or any(i["state"] == "succeeded" for i in r[job]["items"]))
        stack.kill(first, signal.SIGKILL, group=False)
        killed_at = time.monotonic()
        row = job_state(job)
        in_flight = [i["persona"] for i in row["items"] if i["state"] == "running"]
        done_before = {i["persona"]: i["attempt"] for i in row["items"]
                       if i["state"] == "succeeded"}
        assert row["state"] == "running", row["state"]
        stack.start_worker("rel-kill-b")
        final = wait_jobs([job], timeout=180, logs=stack.log_tail)[job]
        recovery = time.monotonic() - killed_at
    fig = verify_jobs([job], scenario="worker SIGKILL mid-job")
    recomputed = [i["persona"] for i in final["items"] if i["attempt"] > 1]
    assert len(recomputed) <= len(in_flight), (recomputed, in_flight)
    for persona, attempt in done_before.items():  # stored personas were not run again
        assert next(i["attempt"] for i in final["items"] if i["persona"] == persona) == attempt
    assert not poll.errors, poll.errors[:5]
    fig.recovery_s, fig.p99_ms = round(recovery, 1), poll.p99_ms()
    fig.notes.append(f"in flight at kill: {len(in_flight)}, recomputed: {len(recomputed)}")
    fig.record()
    assert fig.lost == 0 and fig.duplicates == 0, fig
