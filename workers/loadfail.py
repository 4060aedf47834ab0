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
import os
import re
import time
import traceback
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import select

from app import jobs
from app.db import session_scope
from app.models import Job, JobItem

log = logging.getLogger(__name__)
T = TypeVar("T")
# "ValueError: Free memory on device ..." as an engine process logs it (maybe after a prefix)
ERROR_LINE = re.compile(r"\b[A-Z]\w*(Error|Exception): \S")


class LoadFailed(Exception):
    """A failed engine load, with the text to record: the error and, when the engine's own
    processes logged the real cause to the shared stderr, that cause."""

    def __init__(self, text: str, cause: BaseException):
        super().__init__(text)
        self.text = text
        self.cause = cause


def _stderr_file() -> str | None:
    """The file this process's stderr is written to, when it is a regular file (a worker's
    log); None for a terminal or a pipe."""
    try:
        path = os.readlink("/proc/self/fd/2")
    except OSError:
        return None
    return path if os.path.isfile(path) else None


def _errors_since(path: str | None, offset: int, limit: int = 2) -> list[str]:
    """The last ``limit`` distinct error lines written to ``path`` after ``offset``."""
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read(4 * 1024 * 1024).decode(errors="replace")
    except OSError:
        return []
    found: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if ERROR_LINE.search(line) and "workers.loadfail" not in line and line not in found:
            found.append(line)
    return [x[:600] for x in found[-limit:]]


def load(fn: Callable[[], T]) -> T:
    """``fn()`` (an engine load); any failure becomes :class:`LoadFailed` whose text adds
    the error lines the engine's processes wrote to stderr meanwhile. vLLM's engine core
    fails in a child process and the parent only raises "Engine core initialization failed.
    See root cause above": the root cause (out of GPU memory, say) is in that log."""
    path = _stderr_file()
    try:
        offset = os.path.getsize(path) if path else 0
    except OSError:
        path, offset = None, 0
    try:
        return fn()
    except Exception as exc:
        text = describe(exc)
        logged = [x for x in _errors_since(path, offset) if x not in text]
        if logged:
            text = f"{text}; logged: {' | '.join(logged)}"
        raise LoadFailed(text[:2000], exc) from exc


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
    failed = []
    text = exc.text if isinstance(exc, LoadFailed) else describe(exc)
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


def preload(load_fn, *, worker: str, model: str, dtype: str, tries: int, delay_s: float,
            sleep=time.sleep) -> None:
    """``load_fn()`` up to ``tries`` times, ``delay_s`` × the try number apart (memory held by a
    dying predecessor may come back meanwhile); each failure is recorded on the jobs waiting
    for this (model, dtype). Raises the last error when every try failed."""
    for attempt in range(1, tries + 1):
        try:
            load(load_fn)
            return
        except LoadFailed as exc:
            log.error("worker %s: loading %s (%s) failed (try %d of %d): %s", worker, model,
                      dtype, attempt, tries, exc.text)
            record(waiting_jobs(model, dtype), worker=worker, exc=exc)
            if attempt == tries:
                raise
            sleep(delay_s * attempt)
