"""Rows -> response models. Kept apart from the routes so the CLI's views and the API agree
on what a job's progress is (items, samples, OOMs) and compute it once, in the database."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.api.schemas import EventOut, JobOut, PersonaProgress, Progress, StageProgress, WorkerOut
from app.models import Job, JobEvent, JobItem, Worker

OOM_EVENTS = ("oom_retry", "oom_failed")


def aware(ts: datetime | None) -> datetime | None:
    if ts is not None and ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts


def progress(session: Session, job_id: str) -> Progress:
    items = session.execute(select(JobItem).where(JobItem.job_id == job_id)
                            .order_by(JobItem.position)).scalars().all()
    ooms = session.execute(select(func.count()).select_from(JobEvent).where(
        JobEvent.job_id == job_id, JobEvent.kind.in_(OOM_EVENTS))).scalar_one()
    from app.stages import stage_progress

    personas = [PersonaProgress(persona=i.persona, stage=i.stage, state=i.state,
                                done=i.samples_done,
                                total=i.samples_total, attempt=i.attempt, worker=i.lease_owner,
                                artifact_key=i.artifact_key, error=i.error) for i in items]
    return Progress(items_done=sum(i.state == "succeeded" for i in items), items_total=len(items),
                    samples_done=sum(i.samples_done or 0 for i in items),
                    samples_total=sum(i.samples_total or 0 for i in items), ooms=int(ooms),
                    personas=personas,
                    stages={k: StageProgress(**v) for k, v in
                            stage_progress(session, job_id=job_id).items()})


def job_out(job: Job, session: Session | None = None, *, with_progress: bool = True) -> JobOut:
    prog = progress(session, job.id) if (session is not None and with_progress) else None
    worker = None
    if prog is not None:
        holders = sorted({p.worker for p in prog.personas if p.worker and p.state == "running"})
        worker = ", ".join(holders) or None
    return JobOut(id=job.id, kind=job.kind, dataset=job.dataset, model=job.model, dtype=job.dtype,
                  state=job.state, failure_kind=job.failure_kind, params=job.params or {},
                  created_at=aware(job.created_at), started_at=aware(job.started_at),
                  finished_at=aware(job.finished_at), artifact_prefix=job.artifact_prefix,
                  last_error=job.error, worker=worker, progress=prog)


def event_out(e: JobEvent) -> EventOut:
    data = dict(e.data or {})
    for k in ("from_state", "to_state", "worker", "message"):
        if getattr(e, k, None) is not None:
            data.setdefault(k, getattr(e, k))
    return EventOut(id=e.id, job_id=e.job_id, kind=e.kind, created_at=aware(e.at), data=data)


def worker_out(w: Worker, *, stale_s: float, now: datetime | None = None) -> WorkerOut:
    now = now or datetime.now(UTC)
    hb = aware(w.heartbeat_at)
    age = (now - hb).total_seconds() if hb else None
    memory = {k: v for k, v in (("used", w.gpu_mem_used), ("total", w.gpu_mem_total),
                                ("baseline", w.gpu_mem_baseline)) if v is not None} or None
    return WorkerOut(name=w.name, state=w.state, host=w.hostname, gpu=w.gpu, model=w.model,
                     dtype=w.dtype, queues=list(w.queues or []), memory=memory,
                     model_info=w.model_info or None, current_job_id=w.current_job_id,
                     last_heartbeat=hb, heartbeat_age_s=None if age is None else round(age, 1),
                     alive=age is not None and age <= stale_s and w.state != "stopped")
