"""Worker routes: who is alive and what each holds; release (give the GPU back) and reload
(restart the engine) through the injected Celery remote control."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path
from sqlalchemy import select

from app.api.deps import Auth, ControlDep, SessionDep, SettingsDep
from app.api.schemas import ControlOut, WorkerList
from app.api.views import worker_out
from app.errors import NotFound
from app.models import Worker

router = APIRouter(prefix="/workers", tags=["workers"], dependencies=[Auth])
WorkerName = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.@-]{1,200}$")]
ERRORS = {401: {"description": "no or bad token"}, 404: {"description": "no such worker"},
          503: {"description": "no worker control configured"}}


class WorkerNotFound(NotFound):
    code = "worker_not_found"


@router.get("", response_model=WorkerList, responses={401: ERRORS[401]})
def list_workers(session: SessionDep, settings: SettingsDep) -> WorkerList:
    now = datetime.now(UTC)
    rows = session.execute(select(Worker).order_by(Worker.name)).scalars().all()
    return WorkerList(workers=[worker_out(w, stale_s=settings.worker_stale_s, now=now)
                               for w in rows])


def _command(command: str, name: str, session, control) -> ControlOut:
    if session.get(Worker, name) is None:
        raise WorkerNotFound(f"no worker {name!r}", field="name",
                             hint="`chatspace-jobs workers` lists them")
    replies = getattr(control, command)(name)
    return ControlOut(worker=name, command=command, replies=list(replies or []))


@router.post("/{name}/release", response_model=ControlOut, responses=ERRORS)
def release(name: WorkerName, session: SessionDep, control: ControlDep) -> ControlOut:
    """Ask the worker to shut its engine down and give its GPU memory back (after its
    current job, if it is busy: the reply says ``deferred``)."""
    return _command("release", name, session, control)


@router.post("/{name}/reload", response_model=ControlOut, responses=ERRORS)
def reload(name: WorkerName, session: SessionDep, control: ControlDep) -> ControlOut:
    """Ask the worker to restart its engine (same model, fresh process)."""
    return _command("reload", name, session, control)
