"""Work spreads over every idle worker of a pool within seconds of a submit and of a retry.

Three real workers, ready and idle; a six-persona job. A submit used to send one broker
message, so one worker ran the job alone until the reconciler re-sent it (every
``worker_stale_s``: 30 s in production, 4 s here); after a retry one worker ran all six
personas while the other idled. Measured from the database's own event times: the job's
submit (or retry) event to each worker's first claim.
"""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from tests.reliability.checks import TERMINAL, verify_jobs, wait_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
WORKERS = [f"rel-spread-{i}" for i in range(3)]
# The last worker's first claim comes at most this long after the first worker's: below the
# 4 s reconciler period of this stack, which is what a second worker used to wait for (and a
# third for twice that). From the submit itself the first claim takes 1-3 s on a loaded
# 2-core machine (message, task start, store client, claim), so that bound is looser.
SPREAD_BOUND_S = 2.5
CLAIM_BOUND_S = 10.0


def _events(job_id: str) -> list:
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import JobEvent

    with session_scope() as s:
        return [(e.kind, e.item_id, e.to_state, e.worker, e.message, e.at) for e in s.execute(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).scalars()]


def _first_claims(job_id: str, since: datetime) -> dict[str, datetime]:
    out: dict[str, datetime] = {}
    for kind, item, to, worker, _msg, at in _events(job_id):
        if kind == "state" and item is not None and to == "running" and at >= since:
            out.setdefault(worker, at)
    return out


def _wait_all_claimed(job_id: str, since: datetime, timeout: float = 60) -> dict[str, datetime]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        claims = _first_claims(job_id, since)
        if set(WORKERS) <= set(claims):
            return claims
        time.sleep(0.2)
    return _first_claims(job_id, since)


def _mark(job_id: str, message: str) -> datetime:
    """When the job's last state event with ``message`` (submitted, retry) was written."""
    return [at for kind, item, _to, _w, msg, at in _events(job_id)
            if kind == "state" and item is None and msg == message][-1]


def test_every_idle_worker_claims_within_seconds_of_submit_and_retry(stack):
    for name in WORKERS:
        stack.start_worker(name)
    for name in WORKERS:
        stack.wait_worker_ready(name, timeout=240)
    job = stack.submit(dataset="six_personas", max_samples=4, batch_size=1, max_tokens=8)
    submitted = _mark(job, "submitted")
    claims = _wait_all_claimed(job, submitted)
    after_submit = {w: round((at - submitted).total_seconds(), 2) for w, at in claims.items()}

    stack.http.post(f"/jobs/{job}/cancel")
    wait_jobs([job], timeout=120, logs=stack.log_tail)
    for name in WORKERS:  # ready again (cleanup after the cancelled job)
        stack.wait_worker_ready(name, timeout=120)
    r = stack.http.post(f"/jobs/{job}/retry")
    assert r.status_code == 200, r.text
    retried = _mark(job, "retry")
    claims = _wait_all_claimed(job, retried)
    after_retry = {w: round((at - retried).total_seconds(), 2) for w, at in claims.items()}
    final = wait_jobs([job], timeout=240, logs=stack.log_tail)[job]
    assert final["state"] in TERMINAL

    assert set(after_submit) == set(WORKERS), (after_submit, stack.log_tail())
    assert set(after_retry) == set(WORKERS), (after_retry, stack.log_tail())
    fig = verify_jobs([job], scenario=f"spread over {len(WORKERS)} idle workers")
    slowest_submit, slowest_retry = max(after_submit.values()), max(after_retry.values())
    spread_submit = round(slowest_submit - min(after_submit.values()), 2)
    spread_retry = round(slowest_retry - min(after_retry.values()), 2)
    n = len(WORKERS)
    fig.measures = {
        f"s until all {n} idle workers claimed, after submit": slowest_submit,
        f"s until all {n} idle workers claimed, after retry": slowest_retry,
        f"s between the first and the last of {n} workers' first claims, submit / retry":
            f"{spread_submit} / {spread_retry}"}
    fig.notes.append(f"first claim per worker after submit {after_submit}, after retry "
                     f"{after_retry}")
    fig.record()
    assert fig.lost == 0 and fig.duplicates == 0, fig
    assert spread_submit < SPREAD_BOUND_S and spread_retry < SPREAD_BOUND_S, fig.notes
    assert slowest_submit < CLAIM_BOUND_S and slowest_retry < CLAIM_BOUND_S, fig.notes
