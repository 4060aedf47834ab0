"""Job routes: submit (validated fully before anything is written), list, get, events,
cancel, retry. Writes go through the service layer (:mod:`app.jobs`), which owns the guarded
state transitions; reads are plain queries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from app.api.deps import Auth, EnqueueDep, SessionDep, SettingsDep
from app.api.schemas import EventList, JobList, JobOut, JobSubmit
from app.api.views import event_out, job_out
from app.errors import JobNotFound
from app.models import Job

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Auth])

ID_RE = r"^[A-Za-z0-9_-]{1,64}$"
NAME_RE = r"^[A-Za-z0-9_.:/@+-]{1,300}$"
JobId = Annotated[str, Path(pattern=ID_RE, description="a job id")]
ERRORS = {401: {"description": "no or bad token"}, 404: {"description": "no such job"},
          422: {"description": "invalid input; `field` names it"}}


def load_job(session, job_id: str) -> Job:
    """The job, read fresh from the database (never a stale identity-map copy)."""
    from app import jobs

    try:
        return jobs.get_job(session, job_id=job_id)
    except JobNotFound as exc:
        raise JobNotFound(exc.message, field="job_id",
                          hint="`chatspace-jobs list` shows recent jobs") from None


@router.post("", response_model=JobOut, status_code=201, responses=ERRORS)
def submit(body: JobSubmit, session: SessionDep, settings: SettingsDep,
           enqueue: EnqueueDep) -> JobOut:
    from app.submit import submit_job

    job = submit_job(session, request=body, settings=settings, enqueue=enqueue)
    return job_out(load_job(session, job.id), session)


@router.get("", response_model=JobList, responses=ERRORS)
def list_jobs(session: SessionDep,
              state: Annotated[str | None, Query(pattern=r"^[a-z]{1,16}$")] = None,
              kind: Annotated[str | None, Query(pattern=r"^[a-z]{1,16}$")] = None,
              dataset: Annotated[str | None, Query(pattern=NAME_RE)] = None,
              model: Annotated[str | None, Query(pattern=NAME_RE)] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> JobList:
    from app import jobs

    rows = jobs.list_jobs(session, state=state, kind=kind, dataset=dataset, model=model,
                          limit=limit)
    return JobList(jobs=[job_out(j, session) for j in rows])


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
def get_job(job_id: JobId, session: SessionDep) -> JobOut:
    return job_out(load_job(session, job_id), session)


@router.get("/{job_id}/events", response_model=EventList, responses=ERRORS)
def events(job_id: JobId, session: SessionDep,
           after: Annotated[int | None, Query(ge=0, le=2**62, description="events after this id")] = None,
           limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> EventList:
    from app import jobs

    load_job(session, job_id)
    rows = jobs.list_events(session, job_id=job_id, after_id=after, limit=limit)
    return EventList(events=[event_out(e) for e in rows])


@router.post("/{job_id}/cancel", response_model=JobOut, responses={
    **ERRORS, 409: {"description": "the job already finished"}})
def cancel(job_id: JobId, session: SessionDep) -> JobOut:
    from app import jobs

    load_job(session, job_id)
    jobs.request_cancel(session, job_id=job_id)
    session.commit()
    return job_out(load_job(session, job_id), session)


@router.post("/{job_id}/retry", response_model=JobOut, responses={
    **ERRORS, 409: {"description": "the job is not failed or cancelled"}})
def retry(job_id: JobId, session: SessionDep, enqueue: EnqueueDep) -> JobOut:
    from app import jobs

    load_job(session, job_id)
    jobs.retry_job(session, job_id=job_id)
    session.commit()
    _enqueue_after_commit(enqueue, job_id, reason="retry")
    return job_out(load_job(session, job_id), session)


def _enqueue_after_commit(enqueue, job_id: str, *, reason: str) -> None:
    import logging

    try:
        enqueue(job_id, reason=reason)
    except Exception:
        logging.getLogger(__name__).exception("job %s retried but not enqueued", job_id)
