"""Liveness, readiness and Prometheus metrics.

``/healthz`` answers while the process serves (no auth, no dependencies). ``/readyz`` checks
what a request needs — the database, the broker (a kombu connection; Celery itself stays in
``workers/``) and the artifact store — and answers 503 naming the failing one. ``/metrics``
reads the figures from Postgres at scrape time, so any API replica reports the same numbers.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import func, select, text

from app.api.deps import Auth, SessionDep, SettingsDep
from app.api.schemas import DatasetList, DatasetOut, Health
from app.models import Job, JobEvent, JobItem

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
BROKER_TIMEOUT_S = 3.0


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


def _check(name: str, fn, checks: dict) -> None:
    try:
        fn()
        checks[name] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; say which
        log.warning("readiness check %s failed: %s", name, type(exc).__name__)
        checks[name] = f"error: {type(exc).__name__}"


def broker_connection(settings):
    from kombu import Connection

    return Connection(settings.broker, connect_timeout=BROKER_TIMEOUT_S,
                      transport_options=settings.broker_transport_options())


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
            dependencies=[Auth])
def readyz(request: Request, session: SessionDep, settings: SettingsDep):
    from app.api.deps import get_store_dep

    checks: dict[str, str] = {}
    _check("database", lambda: session.execute(text("SELECT 1")).scalar_one(), checks)

    def broker():
        with broker_connection(settings) as conn:
            conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)

    _check("broker", broker, checks)
    _check("store", lambda: get_store_dep(request).check(), checks)
    ok = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


def queue_depths(settings, queues: list[str]) -> dict[str, int]:
    """Messages waiting per queue, where the broker can say (best effort, bounded)."""
    out: dict[str, int] = {}
    if not queues:
        return out
    try:
        with broker_connection(settings) as conn:
            conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
            channel = conn.default_channel
            for q in queues:
                try:
                    out[q] = int(channel.queue_declare(queue=q, passive=True).message_count)
                except Exception:  # noqa: BLE001 - a queue nobody declared yet holds nothing
                    out[q] = 0
    except Exception as exc:  # noqa: BLE001 - metrics must not fail with the broker
        log.warning("queue depth unavailable: %s", type(exc).__name__)
    return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Auth])
def metrics(session: SessionDep, settings: SettingsDep) -> PlainTextResponse:
    by_state = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    items_done = session.execute(select(func.count()).select_from(JobItem).where(
        JobItem.state == "succeeded")).scalar_one()
    samples_done = session.execute(select(func.coalesce(func.sum(JobItem.samples_done), 0))
                                   ).scalar_one()
    oom_jobs = session.execute(select(func.count()).select_from(Job).where(
        Job.failure_kind == "oom")).scalar_one()
    oom_retries = session.execute(select(func.count()).select_from(JobEvent).where(
        JobEvent.kind == "oom_retry")).scalar_one()
    queues = sorted(q for q in session.execute(select(Job.queue).where(
        Job.state.in_(("queued", "running"))).distinct()).scalars() if q)
    lines = ["# HELP chatspace_jobs Jobs by state.", "# TYPE chatspace_jobs gauge"]
    for state in ("queued", "running", "succeeded", "failed", "cancelled"):
        lines.append(f'chatspace_jobs{{state="{state}"}} {int(by_state.get(state, 0))}')
    lines += ["# HELP chatspace_items_done_total Persona items completed.",
              "# TYPE chatspace_items_done_total counter",
              f"chatspace_items_done_total {int(items_done)}",
              "# HELP chatspace_samples_done_total Samples processed.",
              "# TYPE chatspace_samples_done_total counter",
              f"chatspace_samples_done_total {int(samples_done)}",
              "# HELP chatspace_oom_failures_total Jobs failed by out-of-memory.",
              "# TYPE chatspace_oom_failures_total counter",
              f"chatspace_oom_failures_total {int(oom_jobs)}",
              "# HELP chatspace_oom_retries_total Batches retried smaller after an OOM.",
              "# TYPE chatspace_oom_retries_total counter",
              f"chatspace_oom_retries_total {int(oom_retries)}"]
    depths = queue_depths(settings, queues)
    if depths:
        lines += ["# HELP chatspace_queue_depth Messages waiting in a broker queue.",
                  "# TYPE chatspace_queue_depth gauge"]
        lines += [f'chatspace_queue_depth{{queue="{_label(q)}"}} {n}' for q, n in depths.items()]
    return PlainTextResponse("\n".join(lines) + "\n",
                             media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/datasets", response_model=DatasetList, tags=["datasets"], dependencies=[Auth])
def datasets(settings: SettingsDep) -> DatasetList:
    from app.datasets import list_datasets

    return DatasetList(datasets=[DatasetOut(name=d.name, kind=d.kind, personas=d.personas,
                                            samples=d.samples, root=d.root, problems=d.problems,
                                            questions=d.questions, has_default=d.has_default,
                                            error=d.error)
                                 for d in list_datasets(settings=settings)])
