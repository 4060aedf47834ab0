"""A worker that cannot load its engine says so on the jobs waiting for it.

Seen in the field: a worker whose engine could not start (not enough free GPU memory, a model
vLLM cannot serve) left its jobs ``queued`` for minutes with no error anywhere but its own
log. Here every failed load becomes a ``load_failed`` event with the error text on each job
it was for, the job's last error (``status``, ``--wait`` and the API show it), and after
``max_load_failures`` failed loads with nothing running the job fails with that reason
(:func:`app.jobs.record_load_failure`).

Two places load an engine: a worker serving one model loads it at start, before it takes
any message (:func:`preload`: a bounded number of tries, each failure recorded on the jobs of
its pool, then the worker exits); a job whose model is not loaded loads it when its message
arrives (:func:`record`, called by the job loop, which then drops the message — the
reconciler wakes a worker for the job again).
"""

from __future__ import annotations

import logging
import time
import traceback

log = logging.getLogger(__name__)


def describe(exc: BaseException) -> str:
    """The error as one readable text: its type and message, and the innermost cause's (vLLM
    wraps the engine core's real error in a generic one)."""
    parts = [f"{type(exc).__name__}: {exc}".strip()]
    inner = exc.__cause__ or exc.__context__
    seen = {id(exc)}
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        last = inner
        inner = inner.__cause__ or inner.__context__
    if len(seen) > 1:
        parts.append(f"caused by {type(last).__name__}: {last}".strip())
    text = "; ".join(parts)
    if len(text) < 20:  # a bare exception type says nothing: add where it came from
        text += " at " + " <- ".join(
            f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})"
            for f in traceback.extract_tb(exc.__traceback__)[-2:])
    return text[:1500]


def record(job_ids, *, worker: str, exc: BaseException) -> list[str]:
    """Record one failed load on each job; returns the ids of the jobs that failed for good."""
    from app import jobs
    from app.db import session_scope

    failed = []
    text = describe(exc)
    for job_id in job_ids:
        try:
            with session_scope() as s:
                job = jobs.record_load_failure(s, job_id=str(job_id), worker=worker, error=text)
                if job.state == "failed":
                    failed.append(str(job_id))
        except Exception:  # the worker's own log still has the load error
            log.exception("could not record the failed load on job %s", job_id)
    if failed:
        log.error("worker %s: jobs %s failed: their model could not be loaded (%s)", worker,
                  ", ".join(failed), text)
    return failed


def waiting_jobs(model: str | None, dtype: str | None) -> list[str]:
    """Active jobs with queued items a worker of (model, dtype) would serve."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Job, JobItem

    with session_scope() as s:
        q = (select(Job.id).where(Job.state.in_(("queued", "running")),
                                  Job.cancel_requested.is_(False),
                                  select(JobItem.id).where(JobItem.job_id == Job.id,
                                                           JobItem.state == "queued").exists())
             .order_by(Job.created_at))
        if model:
            q = q.where(Job.model == model)
        if dtype:
            q = q.where(Job.dtype == dtype)
        return [str(j) for j in s.execute(q).scalars()]


def preload(load, *, worker: str, model: str, dtype: str, tries: int, delay_s: float,
            sleep=time.sleep) -> None:
    """``load()`` up to ``tries`` times, ``delay_s`` × the try number apart (memory held by a
    dying predecessor may come back meanwhile); each failure is recorded on the jobs waiting
    for this (model, dtype). Raises the last error when every try failed."""
    for attempt in range(1, tries + 1):
        try:
            load()
            return
        except Exception as exc:
            log.error("worker %s: loading %s (%s) failed (try %d of %d): %s", worker, model,
                      dtype, attempt, tries, describe(exc))
            record(waiting_jobs(model, dtype), worker=worker, exc=exc)
            if attempt == tries:
                raise
            sleep(delay_s * attempt)
