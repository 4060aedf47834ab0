"""Service layer for jobs: submit, state transitions, leases, progress, workers.

Every function takes a :class:`~sqlalchemy.orm.Session` first and does NOT commit: the caller
owns the transaction (``with session_scope() as s: ...``), so a state change and the work
that justified it land together or not at all.

Every state change is one guarded ``UPDATE ... WHERE id = :id AND state = :current``
(``current`` being one of the sources the state machine allows) plus one append-only
``job_events`` row. A lost race or a disallowed move updates nothing and raises
:class:`~app.errors.InvalidTransition`. Item completions are fenced by the item's attempt
number and lease owner, so a worker presumed dead cannot overwrite the result of the worker
that took its item over.

Lock order, everywhere: a worker's row, then item rows, then the job row. Two transactions
that lock rows in opposite orders deadlock on Postgres (one is aborted after
``deadlock_timeout``), so every function here takes them in this order: a heartbeat
(:func:`heartbeat`) updates its worker row, then extends its items' leases; the reaper
(:func:`reap_dead_workers`) locks the dead workers' rows, then expires their items' leases;
claims, cancels and completions lock items, then the job row.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.errors import InvalidTransition, JobNotFound, NotFound, SpecInvalid
from app.models import Artifact, Job, JobEvent, JobItem, Worker, utcnow
from app.states import (
    ITEM_TERMINAL,
    ITEM_TRANSITIONS,
    JOB_ACTIVE,
    JOB_TERMINAL,
    JOB_TRANSITIONS,
    FailureKind,
    ItemState,
    JobKind,
    JobState,
    WorkerState,
    sources,
)

_now = utcnow  # one clock for every row this module writes (tests read it as jobs._now)


def _is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _invalid(what: str, ident, current: str, to: str, permitted) -> InvalidTransition:
    allowed = ", ".join(sorted(str(s) for s in permitted)) or "nowhere"
    return InvalidTransition(
        f"{what} {ident} is {current}; cannot move to {to} (allowed only from: {allowed})",
        field="state")


def _event(session: Session, **kw) -> JobEvent:
    kw.setdefault("data", {})
    ev = JobEvent(at=_now(), **kw)
    session.add(ev)
    session.flush()
    return ev


def _bump_counters(session: Session, job_id: str, *, done: int = 0, failed: int = 0) -> None:
    if not (done or failed):
        return
    session.execute(update(Job).where(Job.id == job_id).values(
        items_done=Job.items_done + done, items_failed=Job.items_failed + failed,
        updated_at=_now()).execution_options(synchronize_session=False))
    cached = session.identity_map.get(session.identity_key(Job, job_id))
    if cached is not None:
        session.expire(cached)


# -- jobs -----------------------------------------------------------------------------------
def create_job(session: Session, *, kind: str, dataset: str, model: str, dtype: str,
               params: dict | None = None, personas: list[str] | None = None,
               queue: str | None = None, artifact_prefix: str | None = None) -> Job:
    """A queued job with one queued item per persona, in the given order.

    ``personas`` defaults to every persona of the dataset, with ``default`` first for a
    capture job (captured once, read by every persona's vectors against it; rollouts leave
    it out), as :func:`app.submit.select_personas` chooses; ``queue`` to the (model, dtype)
    pool's queue.
    """
    if kind not in {k.value for k in JobKind}:
        raise SpecInvalid(f"unknown job kind {kind!r}", field="kind",
                          hint=f"one of {', '.join(k.value for k in JobKind)}")
    if params is not None and not isinstance(params, dict):
        raise SpecInvalid("params must be an object", field="params")
    if personas is None:
        from app.datasets import DEFAULT_PERSONA, load_dataset

        names = list(load_dataset(dataset).personas)
        first = [DEFAULT_PERSONA] if DEFAULT_PERSONA in names and kind == "capture" else []
        personas = first + [p for p in names if p != DEFAULT_PERSONA]
    personas = list(personas)
    if not personas or not all(isinstance(p, str) and p for p in personas):
        raise SpecInvalid("a job needs at least one persona name", field="personas")
    dupes = sorted(p for p, n in Counter(personas).items() if n > 1)
    if dupes:
        raise SpecInvalid(f"personas listed twice: {', '.join(dupes)}", field="personas",
                          hint="list each persona once")
    if queue is None:
        from app.queues import queue_name

        queue = queue_name(model, dtype)
    now = _now()
    job = Job(kind=kind, dataset=dataset, model=model, dtype=dtype, params=dict(params or {}),
              queue=queue, state=JobState.QUEUED.value, items_total=len(personas),
              artifact_prefix=artifact_prefix, created_at=now, updated_at=now)
    session.add(job)
    session.flush()
    session.add_all(JobItem(job_id=job.id, stage=kind, persona=p, position=i,
                            state=ItemState.QUEUED.value) for i, p in enumerate(personas))
    _event(session, job_id=job.id, kind="state", to_state=JobState.QUEUED.value,
           message="submitted", data={"items": len(personas), "queue": queue})
    return job


def get_job(session: Session, *, job_id: str) -> Job:
    job = session.execute(select(Job).where(Job.id == str(job_id))
                          .execution_options(populate_existing=True)).scalar_one_or_none()
    if job is None:
        raise JobNotFound(f"no job {job_id!r}", field="job_id", hint="list jobs to see ids")
    return job


def transition_job(session: Session, *, job_id: str, to: str, allowed_from=None,
                   failure_kind: str | None = None, error: str | None = None,
                   worker: str | None = None, message: str | None = None,
                   data: dict | None = None, values: dict | None = None) -> Job:
    """Move a job to ``to`` if the state machine (narrowed by ``allowed_from``) allows it."""
    to = JobState(to)
    permitted = sources(JOB_TRANSITIONS, to)
    if allowed_from is not None:
        permitted &= {JobState(s) for s in allowed_from}
    current = session.execute(select(Job.state).where(Job.id == str(job_id))).scalar_one_or_none()
    if current is None:
        raise JobNotFound(f"no job {job_id!r}", field="job_id")
    if current not in permitted:
        raise _invalid("job", job_id, current, to, permitted)
    now = _now()
    vals = {"state": to.value, "updated_at": now,
            "finished_at": now if to in JOB_TERMINAL else None}
    if to is JobState.RUNNING:
        vals["started_at"] = func.coalesce(Job.started_at, now)
    if to is JobState.FAILED:
        vals["failure_kind"] = FailureKind(failure_kind or FailureKind.ERROR).value
        vals["error"] = error
    elif to is JobState.SUCCEEDED or failure_kind is not None or error is not None:
        vals["failure_kind"] = FailureKind(failure_kind).value if failure_kind else None
        vals["error"] = error
    vals.update(values or {})
    stmt = (update(Job).where(Job.id == str(job_id), Job.state == current).values(**vals)
            .returning(Job).execution_options(populate_existing=True))
    job = session.execute(stmt).scalar_one_or_none()
    if job is None:
        now_state = session.execute(select(Job.state).where(Job.id == str(job_id))).scalar()
        raise InvalidTransition(f"job {job_id} changed from {current} to {now_state} while "
                                f"moving to {to}", field="state", hint="re-read and retry")
    _event(session, job_id=job.id, kind="state", from_state=current, to_state=to.value,
           worker=worker, message=message or error,
           data={**(data or {}), **({"failure_kind": vals["failure_kind"]}
                                    if vals.get("failure_kind") else {})})
    return job


def list_jobs(session: Session, *, state: str | None = None, kind: str | None = None,
              dataset: str | None = None, model: str | None = None, limit: int = 100,
              offset: int = 0) -> list[Job]:
    q = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    for column, value in ((Job.state, state), (Job.kind, kind), (Job.dataset, dataset),
                          (Job.model, model)):
        if value is not None:
            q = q.where(column == value)
    return list(session.execute(q).scalars())


def list_events(session: Session, *, job_id: str, after_id: int | None = None,
                limit: int | None = None) -> list[JobEvent]:
    q = select(JobEvent).where(JobEvent.job_id == str(job_id)).order_by(JobEvent.id)
    if after_id is not None:
        q = q.where(JobEvent.id > after_id)
    if limit is not None:
        q = q.limit(limit)
    return list(session.execute(q).scalars())


def record_event(session: Session, *, job_id: str, kind: str, item_id: int | None = None,
                 worker: str | None = None, message: str | None = None,
                 data: dict | None = None, from_state: str | None = None,
                 to_state: str | None = None) -> JobEvent:
    """Append a fact to the job's history (OOM retry, engine restart, enqueued, ...)."""
    return _event(session, job_id=str(job_id), item_id=item_id, kind=kind, worker=worker,
                  message=message, data=dict(data or {}), from_state=from_state,
                  to_state=to_state)


def record_artifact(session: Session, *, job_id: str, key: str, sha256: str, size: int,
                    kind: str = "persona", item_id: int | None = None,
                    meta: dict | None = None) -> Artifact:
    """Record (or, for a key written again by a resumed item, update) an artifact row."""
    if size is None:
        raise ValueError("size: the artifact's size in bytes is required")
    art = session.execute(select(Artifact).where(Artifact.key == key)).scalar_one_or_none()
    if art is None:
        art = Artifact(job_id=str(job_id), key=key, created_at=_now())
        session.add(art)
    art.item_id, art.kind, art.size, art.sha256 = item_id, kind, int(size), sha256
    art.meta = dict(meta or {})
    session.flush()
    return art


def progress(session: Session, *, job_id: str | None = None, item_id: int | None = None,
             done: int | None = None, total: int | None = None) -> dict | None:
    """``progress(s, job_id=...)``: the job's counts per item state and one row per persona.

    ``progress(s, item_id=..., done=..., total=...)`` records an item's sample progress
    instead (the worker's call) and returns None.
    """
    if item_id is not None:
        update_item_progress(session, item_id=item_id, done=done, total=total)
        return None
    job = get_job(session, job_id=job_id)
    items = session.execute(select(JobItem).where(JobItem.job_id == job.id)
                            .order_by(JobItem.position)).scalars().all()
    counts = Counter(i.state for i in items)
    from app.stages import stage_progress

    return {
        "job_id": job.id, "state": job.state, "failure_kind": job.failure_kind,
        "cancel_requested": job.cancel_requested, "items_total": job.items_total,
        "items_done": job.items_done, "items_failed": job.items_failed,
        "counts": {s.value: counts.get(s.value, 0) for s in ItemState},
        "samples_done": sum(i.samples_done for i in items),
        "samples_total": sum(i.samples_total or 0 for i in items),
        "stages": stage_progress(session, job_id=job.id),
        "items": [{"id": i.id, "stage": i.stage, "persona": i.persona, "state": i.state,
                   "attempt": i.attempt,
                   "worker": i.lease_owner, "samples_done": i.samples_done,
                   "samples_total": i.samples_total, "batch_size": i.batch_size,
                   "failure_kind": i.failure_kind, "error": i.error,
                   "artifact_key": i.artifact_key} for i in items],
    }


def update_item_progress(session: Session, *, item_id: int, done: int,
                         total: int | None = None) -> None:
    vals = {"samples_done": int(done)}
    if total is not None:
        vals["samples_total"] = int(total)
    session.execute(update(JobItem).where(JobItem.id == item_id).values(**vals)
                    .execution_options(synchronize_session=False))



# -- items ----------------------------------------------------------------------------------
def _item_row(session: Session, item_id: int):
    row = session.execute(select(JobItem.state, JobItem.job_id, JobItem.attempt,
                                 JobItem.lease_owner).where(JobItem.id == item_id)).first()
    if row is None:
        raise NotFound(f"no job item {item_id!r}", field="item_id")
    return row


def transition_item(session: Session, *, item_id: int, to: str, allowed_from=None,
                    attempt: int | None = None, lease_owner: str | None = None,
                    worker: str | None = None, lease_s: float | None = None,
                    failure_kind: str | None = None, error: str | None = None,
                    message: str | None = None, event_kind: str = "state",
                    data: dict | None = None, values: dict | None = None) -> JobItem:
    """Move an item to ``to``; fenced on ``attempt`` and ``lease_owner`` when given.

    Moving to running takes a lease for ``worker`` (``lease_s`` seconds) and bumps the
    attempt; leaving running drops the lease. The job's done/failed counters follow.
    """
    to = ItemState(to)
    permitted = sources(ITEM_TRANSITIONS, to)
    if allowed_from is not None:
        permitted &= {ItemState(s) for s in allowed_from}
    row = _item_row(session, item_id)
    current = row.state
    if current not in permitted:
        raise _invalid("item", item_id, current, to, permitted)
    if (attempt is not None and row.attempt != attempt) or (
            lease_owner is not None and row.lease_owner != lease_owner):
        raise InvalidTransition(
            f"item {item_id} is now attempt {row.attempt} held by {row.lease_owner}; attempt "
            f"{attempt} of {lease_owner} no longer holds it", field="attempt",
            hint="the lease expired and the item was re-queued; drop this result")
    now = _now()
    vals: dict = {"state": to.value}
    if to is ItemState.RUNNING:
        if not worker:
            raise ValueError("worker: a running item needs the name of the worker holding it")
        vals.update(lease_owner=worker, attempt=JobItem.attempt + 1, started_at=now,
                    finished_at=None, lease_expires_at=now + timedelta(seconds=lease_s or 60.0))
    else:
        vals.update(lease_owner=None, lease_expires_at=None,
                    finished_at=now if to in ITEM_TERMINAL else None)
    if to is ItemState.FAILED:
        vals["failure_kind"] = FailureKind(failure_kind or FailureKind.ERROR).value
        vals["error"] = error
    elif to is ItemState.SUCCEEDED or failure_kind is not None or error is not None:
        vals["failure_kind"] = FailureKind(failure_kind).value if failure_kind else None
        vals["error"] = error
    vals.update(values or {})
    guard = [JobItem.id == item_id, JobItem.state == current]
    if attempt is not None:
        guard.append(JobItem.attempt == attempt)
    if lease_owner is not None:
        guard.append(JobItem.lease_owner == lease_owner)
    stmt = (update(JobItem).where(*guard).values(**vals).returning(JobItem)
            .execution_options(populate_existing=True))
    item = session.execute(stmt).scalar_one_or_none()
    if item is None:
        raise InvalidTransition(f"item {item_id} changed while moving from {current} to {to}",
                                field="state", hint="another worker got there first")
    done = (to is ItemState.SUCCEEDED) - (current == ItemState.SUCCEEDED)
    failed = (to is ItemState.FAILED) - (current == ItemState.FAILED)
    _bump_counters(session, item.job_id, done=done, failed=failed)
    ev_data = dict(data or {})
    if vals.get("failure_kind"):
        ev_data.setdefault("failure_kind", vals["failure_kind"])
    ev_data.setdefault("persona", item.persona)
    ev_data.setdefault("attempt", item.attempt)
    _event(session, job_id=item.job_id, item_id=item.id, kind=event_kind, from_state=current,
           to_state=to.value, worker=worker, message=message or error, data=ev_data)
    return item


def claim_item(session: Session, *, job_id: str, worker: str, lease_s: float,
               stages: frozenset[str] | None = None) -> JobItem | None:
    """Take the next queued item of the job for ``worker``, or None if there is none.
    ``stages`` (pipeline jobs) narrows it to items of those stages.

    Postgres: ``FOR UPDATE SKIP LOCKED`` lets many workers claim in parallel without ever
    taking the same row. SQLite: the transaction holds the database write lock
    (``BEGIN IMMEDIATE``), which serialises claims.
    """
    job = get_job(session, job_id=job_id)
    if job.state not in JOB_ACTIVE or job.cancel_requested:
        return None
    if job.kind == JobKind.PIPELINE.value:  # items wait for the stages they need
        from app.stages import claim as stage_claim

        return stage_claim(session, job=job, worker=worker, lease_s=lease_s, stages=stages)
    q = (select(JobItem.id).where(JobItem.job_id == job.id,
                                  JobItem.state == ItemState.QUEUED.value)
         .order_by(JobItem.position, JobItem.id).limit(1))
    if _is_pg(session):
        q = q.with_for_update(skip_locked=True)
    item_id = session.execute(q).scalar_one_or_none()
    if item_id is None:
        return None
    item = transition_item(session, item_id=item_id, to=ItemState.RUNNING,
                           allowed_from=[ItemState.QUEUED], worker=worker, lease_s=lease_s,
                           message="claimed")
    if job.state == JobState.QUEUED.value:
        try:
            transition_job(session, job_id=job.id, to=JobState.RUNNING,
                           allowed_from=[JobState.QUEUED], worker=worker, message="first claim")
        except InvalidTransition:
            pass  # a concurrent first claim moved it already
    return item


def complete_item(session: Session, *, item_id: int, attempt: int, worker: str,
                  artifact_key: str, artifact_sha256: str) -> JobItem:
    """Mark the item succeeded with its artifact; only the current lease holder may."""
    return transition_item(
        session, item_id=item_id, to=ItemState.SUCCEEDED, allowed_from=[ItemState.RUNNING],
        attempt=attempt, lease_owner=worker, worker=worker,
        values={"artifact_key": artifact_key, "artifact_sha256": artifact_sha256},
        data={"artifact_key": artifact_key})


def fail_item(session: Session, *, item_id: int, attempt: int, worker: str, failure_kind: str,
              error: str | None, requeue: bool, batch_size: int | None = None,
              memory: dict | None = None) -> JobItem:
    """Record a failed attempt: back to queued (``requeue``) or failed for good."""
    data = {k: v for k, v in (("batch_size", batch_size), ("memory", memory)) if v is not None}
    values = {"batch_size": batch_size} if batch_size is not None else None
    return transition_item(
        session, item_id=item_id, to=ItemState.QUEUED if requeue else ItemState.FAILED,
        allowed_from=[ItemState.RUNNING], attempt=attempt, lease_owner=worker, worker=worker,
        failure_kind=failure_kind, error=error, values=values, data=data)


def _cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar())


def release_item(session: Session, *, item_id: int, attempt: int, worker: str,
                 message: str | None = None) -> JobItem:
    """Give a running item back unfinished: to queued, or to cancelled when its job is
    being cancelled."""
    job_id = _item_row(session, item_id).job_id
    to = ItemState.CANCELLED if _cancel_requested(session, job_id) else ItemState.QUEUED
    return transition_item(session, item_id=item_id, to=to, allowed_from=[ItemState.RUNNING],
                           attempt=attempt, lease_owner=worker, worker=worker,
                           message=message or "released")


def extend_leases(session: Session, *, worker: str, lease_s: float) -> int:
    """Heartbeat: push the lease of every item ``worker`` runs; returns how many."""
    res = session.execute(
        update(JobItem).where(JobItem.lease_owner == worker,
                              JobItem.state == ItemState.RUNNING.value)
        .values(lease_expires_at=_now() + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False))
    return res.rowcount or 0


def reap_expired(session: Session, *, now: datetime | None = None,
                 max_attempts: int | None = None) -> list[str]:
    """Running items whose lease ran out go back to queued with a ``lost`` event (or fail
    as ``lost`` after ``max_attempts``). Returns the ids of jobs that need re-enqueueing."""
    now = now or _now()
    q = select(JobItem.id, JobItem.job_id, JobItem.attempt, JobItem.lease_owner,
               JobItem.lease_expires_at).where(JobItem.state == ItemState.RUNNING.value,
                                               JobItem.lease_expires_at < now)
    return _return_lost_items(
        session, q, max_attempts=max_attempts,
        reason=lambda row: f"worker {row.lease_owner} lost its lease "
                           f"(expired {row.lease_expires_at})")


def _return_lost_items(session: Session, query, *, max_attempts: int | None, reason) -> list[str]:
    """Give back the running items ``query`` selects (id, job_id, attempt, lease_owner): to
    queued, or cancelled when their job is being cancelled, or failed as ``lost`` after
    ``max_attempts``; each with a ``lost`` event saying ``reason(row)``. Jobs left with no
    open item are finished. Returns the ids of jobs that need re-enqueueing."""
    if max_attempts is None:
        from app.settings import get_settings

        max_attempts = get_settings().max_item_attempts
    if _is_pg(session):
        query = query.with_for_update(skip_locked=True)
    requeue, finish = set(), set()
    for row in session.execute(query).all():
        if _cancel_requested(session, row.job_id):
            to = ItemState.CANCELLED
        elif row.attempt >= max_attempts:
            to = ItemState.FAILED
        else:
            to = ItemState.QUEUED
        try:
            transition_item(session, item_id=row.id, to=to, allowed_from=[ItemState.RUNNING],
                            attempt=row.attempt, lease_owner=row.lease_owner,
                            worker=row.lease_owner, failure_kind=FailureKind.LOST,
                            error=reason(row), event_kind="lost")
        except InvalidTransition:
            continue  # completed or extended concurrently
        (requeue if to is ItemState.QUEUED else finish).add(row.job_id)
    for job_id in finish - requeue:
        finish_job_if_done(session, job_id=job_id)
    return sorted(requeue)


def jobs_needing_dispatch(session: Session, *, older_than_s: float = 0.0,
                          now: datetime | None = None) -> list[str]:
    """Queued/running jobs with queued items, untouched for ``older_than_s`` (reconciler)."""
    cutoff = (now or _now()) - timedelta(seconds=older_than_s)
    q = (select(Job.id).where(Job.state.in_([s.value for s in JOB_ACTIVE]),
                              Job.cancel_requested.is_(False), Job.updated_at <= cutoff,
                              select(JobItem.id).where(JobItem.job_id == Job.id,
                                                       JobItem.state == ItemState.QUEUED.value)
                              .exists())
         .order_by(Job.created_at))
    return [str(j) for j in session.execute(q).scalars()]


# -- job-level outcomes ---------------------------------------------------------------------
def _item_counts(session: Session, job_id: str) -> Counter:
    rows = session.execute(select(JobItem.state, func.count()).where(JobItem.job_id == job_id)
                           .group_by(JobItem.state)).all()
    return Counter({state: n for state, n in rows})


def _cancel_queued_items(session: Session, job_id: str, worker: str | None) -> None:
    ids = session.execute(select(JobItem.id).where(
        JobItem.job_id == job_id, JobItem.state == ItemState.QUEUED.value)
        .order_by(JobItem.position)).scalars().all()
    for item_id in ids:
        try:
            transition_item(session, item_id=item_id, to=ItemState.CANCELLED,
                            allowed_from=[ItemState.QUEUED], worker=worker,
                            message="job cancelled")
        except InvalidTransition:
            continue  # claimed a moment ago; its worker releases it as cancelled


def finish_job_if_done(session: Session, *, job_id: str,
                       manifest_key: str | None = None) -> Job | None:
    """End the job when no item is left to run: succeeded (only with ``manifest_key``: the
    manifest is written before the job succeeds), failed (with the first failed item's kind),
    or cancelled. Returns the finished job, or None if it is not done, if it would succeed
    without a manifest, or if someone else finished it first."""
    job = get_job(session, job_id=job_id)
    if job.state not in JOB_ACTIVE:
        return None
    if job.kind == JobKind.PIPELINE.value and not job.cancel_requested:
        from app import stages

        stages.fail_blocked(session, job_id=job.id)  # what needs a failed item never runs
    counts = _item_counts(session, job.id)
    if counts[ItemState.RUNNING.value]:
        return None
    if job.cancel_requested:
        _cancel_queued_items(session, job.id, None)
    elif counts[ItemState.QUEUED.value]:
        return None
    counts = _item_counts(session, job.id)
    failed = session.execute(select(JobItem).where(
        JobItem.job_id == job.id, JobItem.state == ItemState.FAILED.value)
        .order_by(JobItem.position)).scalars().all()
    kw: dict = {}
    if job.cancel_requested or counts[ItemState.CANCELLED.value]:
        to = JobState.CANCELLED
    elif failed:
        to = JobState.FAILED
        kw["failure_kind"] = failed[0].failure_kind or FailureKind.ERROR
        kw["error"] = f"{len(failed)} of {job.items_total} personas failed: " + "; ".join(
            f"{i.persona} ({i.failure_kind}: {(i.error or '')[:200]})" for i in failed[:5])
    elif manifest_key is None:
        # Every item succeeded, but this caller wrote no manifest: it read the items before
        # the last one finished, and the worker that finished it is writing the manifest now.
        # Only that write may end the job (a succeeded job always has its manifest); should
        # it die first, the reconciler's finish_stranded writes it.
        return None
    else:
        to = JobState.SUCCEEDED
        kw["values"] = {"manifest_key": manifest_key}
    try:
        if job.state == JobState.QUEUED.value and to is JobState.SUCCEEDED:
            transition_job(session, job_id=job.id, to=JobState.RUNNING, message="all items done")
        return transition_job(session, job_id=job.id, to=to, **kw)
    except InvalidTransition:
        return None


def load_failures(session: Session, *, job_id: str) -> int:
    """Failed model loads recorded for the job since it was submitted or last retried."""
    since = session.execute(select(func.max(JobEvent.id)).where(
        JobEvent.job_id == job_id, JobEvent.kind == "state", JobEvent.item_id.is_(None),
        JobEvent.to_state == JobState.QUEUED.value)).scalar()
    q = select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id,
                                                         JobEvent.kind == "load_failed")
    if since is not None:
        q = q.where(JobEvent.id > since)
    return int(session.execute(q).scalar_one())


def record_load_failure(session: Session, *, job_id: str, worker: str, error: str,
                        max_failures: int | None = None) -> Job:
    """A worker could not start the engine for this job's model (out of GPU memory, a
    missing model, an unsupported architecture...).

    The error text becomes a ``load_failed`` event and the job's last error, so ``status``,
    ``--wait`` and the API show why a queued job is not running. After ``max_failures``
    failed loads since submit (or retry), with no item of the job running anywhere, its
    queued items and the job fail with that error: a model no worker can load would
    otherwise keep the job queued forever. Returns the job.
    """
    if max_failures is None:
        from app.settings import get_settings

        max_failures = get_settings().max_load_failures
    job = get_job(session, job_id=job_id)
    if job.state not in JOB_ACTIVE:
        return job
    failures = load_failures(session, job_id=job.id) + 1
    text = (f"worker {worker} could not load {job.model} ({job.dtype}): {error}")[:2000]
    _event(session, job_id=job.id, kind="load_failed", worker=worker, message=text,
           data={"model": job.model, "dtype": job.dtype, "failures": failures,
                 "max_failures": max_failures})
    counts = _item_counts(session, job.id)
    if failures < max_failures or counts[ItemState.RUNNING.value]:
        session.execute(update(Job).where(Job.id == job.id, Job.state.in_(
            [s.value for s in JOB_ACTIVE])).values(error=text, updated_at=_now())
            .execution_options(synchronize_session=False))
        return get_job(session, job_id=job.id)
    reason = f"{failures} failed model loads; the last: {text}"
    ids = session.execute(select(JobItem.id).where(
        JobItem.job_id == job.id, JobItem.state == ItemState.QUEUED.value)
        .order_by(JobItem.position)).scalars().all()
    for item_id in ids:  # items before the job row (lock order)
        try:
            transition_item(session, item_id=item_id, to=ItemState.FAILED,
                            allowed_from=[ItemState.QUEUED], worker=worker,
                            failure_kind=FailureKind.ERROR, error=reason,
                            message="the model could not be loaded")
        except InvalidTransition:
            continue  # claimed a moment ago by a worker that could load it
    if _item_counts(session, job.id)[ItemState.RUNNING.value]:
        return get_job(session, job_id=job.id)
    try:
        return transition_job(session, job_id=job.id, to=JobState.FAILED, worker=worker,
                              failure_kind=FailureKind.ERROR, error=reason)
    except InvalidTransition:
        return get_job(session, job_id=job.id)


def request_cancel(session: Session, *, job_id: str, worker: str | None = None) -> Job:
    """Cancel a job: queued items are cancelled now; running items stop at their next batch
    (their worker sees ``cancel_requested``) and the job ends cancelled when none runs."""
    job = get_job(session, job_id=job_id)
    if job.state == JobState.CANCELLED.value:
        return job
    if job.state not in JOB_ACTIVE:
        raise InvalidTransition(f"job {job.id} is {job.state}; only queued or running jobs "
                                "can be cancelled", field="state")
    _cancel_queued_items(session, job.id, worker)  # items before the job row
    res = session.execute(update(Job).where(
        Job.id == job.id, Job.state.in_([s.value for s in JOB_ACTIVE]))
        .values(cancel_requested=True, updated_at=_now())
        .execution_options(synchronize_session=False))
    if not res.rowcount:
        raise InvalidTransition(f"job {job.id} finished while being cancelled", field="state")
    _event(session, job_id=job.id, kind="cancel_requested", worker=worker)
    return finish_job_if_done(session, job_id=job.id) or get_job(session, job_id=job.id)


def retry_job(session: Session, *, job_id: str, worker: str | None = None) -> Job:
    """Run a failed or cancelled job again: its failed/cancelled items are queued again,
    succeeded items (and their artifacts) are kept."""
    job = get_job(session, job_id=job_id)
    permitted = {JobState.FAILED, JobState.CANCELLED}
    if job.state not in permitted:
        raise _invalid("job", job.id, job.state, JobState.QUEUED, permitted)
    ids = session.execute(select(JobItem.id).where(
        JobItem.job_id == job.id,
        JobItem.state.in_([ItemState.FAILED.value, ItemState.CANCELLED.value]))
        .order_by(JobItem.position)).scalars().all()
    for item_id in ids:
        transition_item(session, item_id=item_id, to=ItemState.QUEUED, worker=worker,
                        message="retry", values={"failure_kind": None, "error": None,
                                                 "batch_size": None})
    return transition_job(session, job_id=job.id, to=JobState.QUEUED, worker=worker,
                          allowed_from=permitted, message="retry",
                          values={"retries": Job.retries + 1, "cancel_requested": False,
                                  "failure_kind": None, "error": None})


# -- workers --------------------------------------------------------------------------------
_WORKER_FIELDS = {c.key for c in Worker.__table__.columns} - {"name"}
_WORKER_ALIASES = {"host": "hostname", "last_heartbeat": "heartbeat_at"}


def upsert_worker(session: Session, *, name: str, **fields) -> Worker:
    """Heartbeat: create or update the worker's row and stamp ``heartbeat_at``.

    ``memory={"used", "total", "baseline"}`` (bytes) fills the gpu_mem_* columns.
    """
    memory = fields.pop("memory", None) or {}
    for key, column in (("used", "gpu_mem_used"), ("total", "gpu_mem_total"),
                        ("baseline", "gpu_mem_baseline")):
        if memory.get(key) is not None:
            fields.setdefault(column, int(memory[key]))
    fields = {_WORKER_ALIASES.get(k, k): v for k, v in fields.items()}
    unknown = sorted(set(fields) - _WORKER_FIELDS)
    if unknown:
        raise ValueError(f"upsert_worker: unknown field(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(_WORKER_FIELDS))}")
    if fields.get("state") is not None:
        try:
            fields["state"] = WorkerState(fields["state"]).value
        except ValueError:
            raise ValueError(f"state: unknown worker state {fields['state']!r}; one of "
                             f"{', '.join(s.value for s in WorkerState)}") from None
    if fields.get("gpu") is not None:
        fields["gpu"] = str(fields["gpu"])
    for key in ("queues",):
        if fields.get(key) is not None:
            fields[key] = list(fields[key])
    fields.setdefault("heartbeat_at", _now())
    worker = session.get(Worker, name)
    if worker is None:
        worker = Worker(name=name, started_at=_now(), queues=[], model_info={})
        session.add(worker)
    for key, value in fields.items():
        if key in ("model_info", "queues") and value is None:
            continue
        setattr(worker, key, value)
    session.flush()
    return worker


def heartbeat(session: Session, *, name: str, lease_s: float, **fields) -> Worker:
    """A worker's heartbeat: its row (:func:`upsert_worker`), then the leases of the items it
    runs (:func:`extend_leases`) — worker row before item rows, the module's lock order. A
    worker reporting ``state="stopped"`` extends nothing."""
    worker = upsert_worker(session, name=name, **fields)
    if fields.get("state") != WorkerState.STOPPED.value:
        extend_leases(session, worker=name, lease_s=lease_s)
    return worker


def list_workers(session: Session) -> list[Worker]:
    return list(session.execute(select(Worker).order_by(Worker.name)).scalars())


def reap_dead_workers(session: Session, *, stale_s: float,
                      now: datetime | None = None) -> list[str]:
    """Workers silent for ``stale_s`` are marked stopped and their leases expired now, so
    the next :func:`reap_expired` re-queues their items. Returns the dead workers' names.

    The worker rows are locked first (the module's lock order), in name order, skipping rows
    a heartbeat holds right now: a worker whose heartbeat is being written is alive. Postgres
    re-checks the staleness on the row's newest version when it locks it, so a heartbeat
    that committed a moment ago also keeps its worker from being reaped.
    """
    now = now or _now()
    q = (select(Worker.name).where(Worker.state != WorkerState.STOPPED.value,
                                   Worker.heartbeat_at < now - timedelta(seconds=stale_s))
         .order_by(Worker.name))
    if _is_pg(session):
        q = q.with_for_update(skip_locked=True)
    dead = list(session.execute(q).scalars().all())
    if dead:
        session.execute(update(Worker).where(Worker.name.in_(dead))
                        .values(state=WorkerState.STOPPED.value, current_job_id=None,
                                current_item_id=None)
                        .execution_options(synchronize_session=False))
        session.execute(update(JobItem).where(
            JobItem.lease_owner.in_(dead), JobItem.state == ItemState.RUNNING.value)
            .values(lease_expires_at=now - timedelta(microseconds=1))
            .execution_options(synchronize_session=False))
    return dead


def release_worker_items(session: Session, *, worker: str,
                         max_attempts: int | None = None) -> list[str]:
    """A worker starting under ``worker``'s name gives back what a previous process of that
    name still holds: its running items go back to queued (cancelled when their job is being
    cancelled, failed as ``lost`` after ``max_attempts``) with a ``lost`` event.

    Needed because leases are keyed by worker name and names are stable across restarts:
    without it the new process's heartbeat would keep extending the dead attempt's leases and
    those items would never run again. Call it before the first heartbeat. Returns the ids of
    jobs that need re-enqueueing."""
    q = select(JobItem.id, JobItem.job_id, JobItem.attempt, JobItem.lease_owner).where(
        JobItem.lease_owner == worker, JobItem.state == ItemState.RUNNING.value)
    return _return_lost_items(
        session, q, max_attempts=max_attempts,
        reason=lambda row: f"worker {worker} restarted while holding it (attempt {row.attempt})")
