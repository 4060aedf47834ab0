"""Liveness, readiness and Prometheus metrics.

``/healthz`` answers while the process serves (no auth, no dependencies). ``/readyz`` checks
what a request needs — the database, the broker (a kombu connection; Celery itself stays in
``workers/``) and the artifact store — and answers 503 naming the failing one. The checks run
side by side, each in its own thread, and the answer comes within
:data:`~app.api.deps.DEPENDENCY_TIMEOUT_S` whatever they do: a check still running then is
reported as ``error: no answer within 2s`` (a load balancer probing ``/readyz`` must get an
answer, and a store that refuses connections must not look "ok" after a minute of retries).
``/metrics`` reads the figures from Postgres at scrape time, so any API replica reports the
same numbers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import func, select, text

from app.api.deps import DEPENDENCY_TIMEOUT_S, Auth, SessionDep, SettingsDep
from app.api.errors import RETRY_AFTER_S
from app.api.schemas import DatasetList, DatasetOut, Health
from app.errors import ChatspaceError
from app.models import Job, JobEvent, JobItem

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
BROKER_TIMEOUT_S = 1.5


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


def run_checks(checks: dict[str, Callable[[], None]], *, timeout_s: float) -> dict[str, str]:
    """Run every check in its own daemon thread; "ok", "error: <what>", or "error: no answer
    within <timeout>" for each, after at most ``timeout_s`` in all. A check that outlives
    the bound finishes (or times out on its own) in the background; its result is dropped."""
    results = {name: f"error: no answer within {timeout_s:g}s" for name in checks}
    lock = threading.Lock()

    def run(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            outcome = "ok"
        except ChatspaceError as exc:  # our own messages are written for the reader
            outcome = f"error: {type(exc).__name__}: {exc.message[:300]}"
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; say which
            outcome = f"error: {type(exc).__name__}"
        if outcome != "ok":
            log.warning("readiness check %s failed: %s", name, outcome)
        with lock:
            results[name] = outcome

    threads = [threading.Thread(target=run, args=(name, fn), daemon=True,
                                name=f"readyz-{name}") for name, fn in checks.items()]
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        return dict(results)


def broker_connection(settings):
    from kombu import Connection

    return Connection(settings.broker, connect_timeout=BROKER_TIMEOUT_S,
                      transport_options=settings.broker_transport_options())


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
            dependencies=[Auth])
def readyz(request: Request, settings: SettingsDep):
    from app.api.deps import get_store_dep

    # Built before the clock starts: the first request imports kombu's transport and
    # botocore's service model (seconds on a busy machine), which is not a dependency's wait.
    engine = request.app.state.session_factory.kw["bind"]
    conn = broker_connection(settings)
    conn.transport  # noqa: B018 - loads the transport class; no network
    artifact_store = get_store_dep(request)

    def database():
        with engine.connect() as c:  # its own connection: the thread may outlive the request
            c.execute(text("SELECT 1")).scalar_one()

    def broker():
        with conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2,
                                   timeout=BROKER_TIMEOUT_S)

    def store():
        artifact_store.check()

    checks = run_checks({"database": database, "broker": broker, "store": store},
                        timeout_s=DEPENDENCY_TIMEOUT_S)
    ok = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503,
                        headers=None if ok else {"Retry-After": str(RETRY_AFTER_S)})


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
