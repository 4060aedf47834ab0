"""Getting jobs to workers: enqueue after commit, and a reconciler for lost messages.

Postgres is the truth, the broker only a doorbell. :func:`enqueue_job` is called by the API
after the job's transaction committed; it picks the queue (the job's (model, dtype) pool when
a live worker serves it, else the any-model queue when an any-model worker is alive, else the
pool's queue with a ``waiting`` event saying no live worker serves that model — the job is
accepted and visibly waiting, not silently stuck). :func:`reconcile`, run by every worker's
reaper, re-sends jobs that are queued or running with claimable items that no live worker
holds, and wakes idle workers of a pool whose jobs have more queued items than holders — only
into an empty queue, so the broker never holds more messages than there is open work
(:mod:`workers.wakeups`). A duplicate message is harmless: items are taken with leases,
never twice.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import exists, select

from app import jobs
from app.db import session_scope
from app.models import Job, JobItem, Worker, utcnow
from app.queues import ANY_QUEUE, queue_name
from app.settings import get_settings
from app.storage import get_store
from workers import broker, wakeups
from workers.manifest import finish

log = logging.getLogger(__name__)


def _aware(ts: datetime | None) -> datetime | None:
    if ts is not None and ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts


def live_workers(session) -> list:
    cutoff = utcnow() - timedelta(seconds=get_settings().worker_stale_s)
    return [w for w in session.execute(select(Worker)).scalars()
            if w.state != "stopped" and _aware(w.last_heartbeat) and _aware(w.last_heartbeat) >= cutoff]


def choose_queue(session, *, model: str, dtype: str, workers=None) -> tuple[str, bool]:
    """(queue, served): the pool queue if a live worker consumes it, else the any queue if an
    any-model worker lives, else the pool queue with served=False."""
    pool = queue_name(model, dtype)
    workers = live_workers(session) if workers is None else workers
    if any(pool in (w.queues or []) for w in workers):
        return pool, True
    if any(ANY_QUEUE in (w.queues or []) for w in workers):
        return ANY_QUEUE, True
    return pool, False


def enqueue_job(job_id, *, reason: str = "submitted", messages: int | None = None,
                queue: str | None = None, why: str | None = None) -> str:
    """Wake workers for the job (call after the job's row is committed): ``messages`` task
    messages on its queue, by default one per queued item up to the number of live workers
    of the pool (:func:`workers.wakeups.submit_wakeups`), so every idle one claims at once."""
    job_id = str(job_id)
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise ValueError(f"job_id: no job {job_id!r}; commit it before enqueueing")
        chosen, served = choose_queue(s, model=job.model, dtype=job.dtype)
        queue = queue or chosen
        model, dtype = job.model, job.dtype
        if messages is None:
            messages = wakeups.submit_wakeups(s, job_id=job_id, queue=queue)
    for _ in range(max(1, messages)):
        broker.send_job(job_id, queue=queue)
    with session_scope() as s:
        jobs.record_event(s, job_id=job_id, kind="enqueued", data={
            "queue": queue, "reason": reason, "messages": max(1, messages),
            **({"why": why} if why else {})})
        if not served:
            jobs.record_event(s, job_id=job_id, kind="waiting", data={
                "queue": queue, "message": f"no live worker serves {model} ({dtype}); the job "
                f"waits in queue {queue} (start one: chatspace-jobs worker --model {model} "
                f"--dtype {dtype})"})
    log.info("job %s enqueued on %s (%s)", job_id, queue, reason)
    return queue


def pending_jobs(*, model: str | None, dtype: str | None) -> list[str]:
    """Ids of queued/running jobs a worker of (model, dtype) could serve (None = any)."""
    with session_scope() as s:
        q = select(Job.id).where(Job.state.in_(("queued", "running")))
        if model:
            q = q.where(Job.model == model)
        if dtype:
            q = q.where(Job.dtype == dtype)
        return [str(x) for x in s.execute(q).scalars()]


def reconcile() -> list[str]:
    """Wake workers for jobs that lost their message or have idle workers to spare, without
    ever filling a queue that still holds messages (:mod:`workers.wakeups`); then finish
    stranded jobs. Returns the ids of the jobs woken."""
    def queue_of(job, workers) -> str:
        return choose_queue(None, model=job.model, dtype=job.dtype, workers=workers)[0]

    def send(job_id: str, queue: str, n: int, why: str) -> None:
        enqueue_job(job_id, reason="reconciler", messages=n, queue=queue, why=why)

    woken = [w.job_id for w in wakeups.reconcile(queue_of=queue_of, send=send,
                                                 queue_lengths=broker.queue_lengths)]
    finish_stranded()
    return woken


def finish_stranded() -> list[str]:
    """Finish running jobs whose items are all terminal (manifest, then the job's state).

    A worker whose last step (manifest + finish) failed — Postgres restarting at that moment,
    say — leaves such a job with nothing to claim, so re-enqueueing would never finish it.
    """
    with session_scope() as s:
        open_items = exists(select(JobItem.id).where(
            JobItem.job_id == Job.id, JobItem.state.in_(("queued", "running"))))
        stranded = [str(j) for j in s.execute(
            select(Job.id).where(Job.state == "running", ~open_items)).scalars()]
    done = []
    settings = get_settings()
    for job_id in stranded:
        try:
            if finish(job_id, settings=settings, store=get_store(settings)) is not None:
                done.append(job_id)
                log.warning("reconciler finished stranded job %s", job_id)
        except Exception:
            log.exception("reconciler could not finish job %s", job_id)
    return done
