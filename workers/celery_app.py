"""The worker's Celery wiring, and only that: the job task, the start/stop signals, the
remote-control commands. ``celery -A workers.celery_app worker`` finds the app through the
module attribute ``app``.

The app itself (its configuration, sending) is :mod:`workers.broker`; what a worker process
does around its tasks is :mod:`workers.lifecycle`; the job loop is :mod:`workers.jobloop`.
"""

from __future__ import annotations

import logging

from celery import Celery, signals
from celery.worker.control import control_command

from workers import broker, lifecycle, remote
from workers.config import RUN_JOB

log = logging.getLogger(__name__)

_wired: set[int] = set()


def wire(celery: Celery) -> Celery:
    """Declare the job task on ``celery`` (once per app)."""
    if id(celery) in _wired:
        return celery

    @celery.task(name=RUN_JOB, bind=True, acks_late=True, reject_on_worker_lost=True,
                 ignore_result=True)
    def run_job(self, job_id: str) -> dict:
        """Run a job's items on this worker: ids in, states out (the loop is jobloop's)."""
        worker = lifecycle.current_worker()
        if worker is None:  # not started through the worker_init signal: set up in-process
            worker = lifecycle.start_worker_services()
        return worker.run_job(str(job_id))

    _wired.add(id(celery))
    return celery


def get_app() -> Celery:
    """The broker's app for the current settings, with the job task declared."""
    return wire(broker.get_app())


def _on_init(**_):
    logging.basicConfig(level=logging.INFO)
    try:
        lifecycle.start_worker_services()
    except Exception:
        # Celery only logs a failing signal receiver; a worker that cannot reach its
        # database or load its engine must not sit on the queue taking jobs.
        log.exception("worker start-up failed; exiting")
        raise SystemExit(1) from None


def _on_ready(**_):
    try:
        lifecycle.worker_ready()
    except Exception:
        log.exception("heartbeat at worker_ready failed")


def _on_shutdown(**_):
    lifecycle.stop_worker_services()


signals.worker_init.connect(_on_init, weak=False, dispatch_uid="chatspace-worker-init")
signals.worker_ready.connect(_on_ready, weak=False, dispatch_uid="chatspace-worker-ready")
signals.worker_shutdown.connect(_on_shutdown, weak=False, dispatch_uid="chatspace-worker-stop")


@control_command(name="chatspace_release")
def _release_command(state) -> dict:
    return remote.handle("release", lifecycle.current_runtime())


@control_command(name="chatspace_reload")
def _reload_command(state) -> dict:
    return remote.handle("reload", lifecycle.current_runtime())


def __getattr__(name: str):
    # ``celery -A workers.celery_app`` looks up ``app`` / ``celery`` on this module.
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(name)
