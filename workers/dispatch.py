"""Getting jobs to workers: enqueue after commit, and a reconciler for lost messages.

Postgres is the truth, the broker only a doorbell. :func:`enqueue_job` is called by the API
after the job's transaction committed; it picks the queue (the job's (model, dtype) pool when
a live worker serves it, else the any-model queue when an any-model worker is alive, else the
pool's queue with a ``waiting`` event saying no live worker serves that model — the job is
accepted and visibly waiting, not silently stuck). :func:`reconcile`, run by every worker's
reaper, re-sends jobs that are queued or running with claimable items that no live worker
holds — after a Redis flush or restart, a lost filesystem message, or a worker death — at
most once per ``worker_stale_s`` per job. A duplicate message is harmless: items are taken
with leases, never twice.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import exists, select

from app import jobs
from app.db import session_scope
from app.models import Job, JobEvent, JobItem, Worker, utcnow
from app.queues import ANY_QUEUE, queue_name
from app.settings import get_settings
from app.storage import get_store
from workers import broker
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


def choose_queue(session, *, model: str, dtype: str) -> tuple[str, bool]:
    """(queue, served): the pool queue if a live worker consumes it, else the any queue if an
    any-model worker lives, else the pool queue with served=False."""
    pool = queue_name(model, dtype)
    workers = live_workers(session)
    if any(pool in (w.queues or []) for w in workers):
        return pool, True
    if any(ANY_QUEUE in (w.queues or []) for w in workers):
        return ANY_QUEUE, True
    return pool, False


def enqueue_job(job_id, *, reason: str = "submitted") -> str:
    """Send the job's task to its queue (call after the job's row is committed)."""
    job_id = str(job_id)
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise ValueError(f"job_id: no job {job_id!r}; commit it before enqueueing")
        queue, served = choose_queue(s, model=job.model, dtype=job.dtype)
        model, dtype = job.model, job.dtype
    broker.send_job(job_id, queue=queue)
    with session_scope() as s:
        jobs.record_event(s, job_id=job_id, kind="enqueued", data={"queue": queue,
                                                                    "reason": reason})
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
    """Re-enqueue jobs with claimable items that no live worker holds. Returns their ids."""
    resent = []
    with session_scope() as s:
        candidates = [str(j) for j in jobs.jobs_needing_dispatch(s)]
        recent = {}
        if candidates:
            rows = s.execute(select(JobEvent.job_id, JobEvent.created_at).where(
                JobEvent.job_id.in_(candidates), JobEvent.kind == "enqueued")).all()
            for jid, ts in rows:
                ts = _aware(ts)
                if str(jid) not in recent or ts > recent[str(jid)]:
                    recent[str(jid)] = ts
    cutoff = utcnow() - timedelta(seconds=get_settings().worker_stale_s)
    for job_id in candidates:
        if recent.get(job_id) and recent[job_id] > cutoff:
            continue
        try:
            enqueue_job(job_id, reason="reconciler")
            resent.append(job_id)
        except Exception:
            log.exception("reconciler could not re-enqueue job %s", job_id)
    finish_stranded()
    return resent


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
