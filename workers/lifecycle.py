"""What a worker process does around its tasks: start-up, heartbeats, reaper, idle exit.

Wired to Celery signals by :mod:`workers.celery_app` (this module imports no Celery), so
both ``chatspace-jobs worker`` and a bare ``celery -A workers.celery_app worker`` get it:

- at start: end the engine processes a killed predecessor with the same name left on this
  GPU, read the GPU memory baseline, load the engine when the worker serves one model (warm
  before the first job), write the Worker row;
- a heartbeat thread every ``heartbeat_s``: Worker row (state idle/busy/cleaning, GPU, model,
  dtype, GPU memory, ``model_info``) and the leases of the items this worker holds;
- a reaper every ``reaper_interval_s``: items of dead workers and expired leases go back to
  the queue, and the reconciler re-enqueues jobs no worker holds (Postgres is the truth);
- with ``exit_when_idle``: exit once no queued or running job is left for this worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

import psutil

from app import jobs
from app.db import session_scope
from app.models import Worker
from app.queues import worker_queues
from app.settings import get_settings
from workers import dispatch, gpu, loadfail, remote
from workers.config import WORKER_ENV, WorkerEnv
from workers.jobloop import execute_job
from workers.runtime import EngineRuntime

log = logging.getLogger(__name__)

_current: WorkerServices | None = None


def current_worker() -> WorkerServices | None:
    return _current


def current_runtime():
    return _current.runtime if _current else None


class WorkerServices:
    def __init__(self, *, name: str, gpu_index: str | None, model: str | None,
                 dtype: str | None, queues: list[str], max_jobs: int | None,
                 exit_when_idle: bool):
        self.settings = get_settings()
        self.name = name
        self.model, self.dtype = model, dtype
        self.queues = queues
        self.max_jobs = max_jobs
        self.exit_when_idle = exit_when_idle
        self.runtime = EngineRuntime(worker_name=name, gpu_index=gpu_index,
                                     settings=self.settings)
        self.jobs_done = 0
        self.current_job: str | None = None
        # Celery's consumer starts only after start() returns (worker_init), seconds later on
        # a busy host; until worker_ready the row says "starting", not "idle", so nobody
        # (the reconciler, --wait, a test) takes a worker that takes no message for idle.
        self.consuming = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- start / stop ---------------------------------------------------------------------
    def start(self, *, preload: bool = True) -> None:
        orphans = gpu.orphan_engines(self.name)
        if orphans:
            log.warning("worker %s: ending %d orphaned engine processes %s", self.name,
                        len(orphans), [p.pid for p in orphans])
            gpu.kill_processes(orphans)
        self.release_previous_items()
        self.heartbeat()
        for target, period in ((self.heartbeat, self.settings.heartbeat_s),
                               (self.reap, self.settings.reaper_interval_s)):
            t = threading.Thread(target=self._every, args=(target, period), daemon=True,
                                 name=f"chatspace-{target.__name__}")
            t.start()
            self._threads.append(t)
        if self.exit_when_idle:
            t = threading.Thread(target=self._every, args=(self._exit_if_idle, 1.0),
                                 daemon=True, name="chatspace-idle")
            t.start()
            self._threads.append(t)
        if preload and self.model:
            dtype = self.dtype or self.settings.default_dtype
            loadfail.preload(lambda: self.runtime.acquire(self.model, dtype), worker=self.name,
                             model=self.model, dtype=dtype,
                             tries=self.settings.max_load_failures,
                             delay_s=self.settings.load_retry_s)
            self.heartbeat()

    def release_previous_items(self) -> list[str]:
        """Give back items a killed process of this worker's name still holds, before the
        first heartbeat would extend their leases, and send their jobs again."""
        with session_scope() as s:
            if self._namesake_alive(s):
                return []
            job_ids = jobs.release_worker_items(s, worker=self.name)
        for job_id in job_ids:
            log.warning("worker %s: re-queued job %s's items held by a previous process of "
                        "this name", self.name, job_id)
            dispatch.enqueue_job(job_id, reason="worker restarted")
        return job_ids

    def _namesake_alive(self, session) -> bool:
        """Another live worker process on this host already runs under this name (two
        ``--wait`` sessions on one data directory): its items are not ours to release."""
        row = session.get(Worker, self.name)
        if row is None or row.pid in (None, os.getpid()) or row.hostname != socket.gethostname():
            return False
        try:
            proc = psutil.Process(row.pid)
            alive = (proc.status() != psutil.STATUS_ZOMBIE
                     and proc.environ().get(WORKER_ENV) == self.name)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        if alive:
            log.warning("worker %s: process %d runs under the same name; not releasing its "
                        "items (give each worker its own name)", self.name, row.pid)
        return alive

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:  # a heartbeat in flight must not land after "stopped" and
            if t is not threading.current_thread():  # make this worker look alive
                t.join(timeout=10)
        try:
            self.runtime.shutdown()
        finally:
            try:
                self.heartbeat(state="stopped")
            except Exception:
                log.exception("worker %s: final heartbeat failed", self.name)

    def _every(self, fn, period: float) -> None:
        while not self._stop.wait(period):
            try:
                fn()
            except Exception:
                log.exception("worker %s: %s failed", self.name, fn.__name__)

    # -- jobs -----------------------------------------------------------------------------
    def run_job(self, job_id: str) -> dict:
        self.consuming = True  # a message arrived (also when started in-process)
        try:
            return execute_job(job_id, worker=self)
        finally:
            self.current_job = None
            self.jobs_done += 1
            remote.apply_pending(self.runtime)
            self.heartbeat()
            if self.max_jobs and self.jobs_done >= self.max_jobs:
                log.info("worker %s: ran %d jobs (max_jobs); exiting", self.name, self.jobs_done)
                os.kill(os.getpid(), signal.SIGTERM)

    def busy(self, job_id: str) -> None:
        self.current_job = job_id
        self.runtime.state = "busy"

    def idle(self) -> None:
        self.runtime.state = "idle"

    def reported_state(self) -> str:
        state = self.runtime.state
        return "starting" if state == "idle" and not self.consuming else state

    def ready(self) -> None:
        """Celery's consumer is taking messages (worker_ready)."""
        self.consuming = True
        self.heartbeat()

    # -- periodic -------------------------------------------------------------------------
    def heartbeat(self, state: str | None = None) -> None:
        with session_scope() as s:
            jobs.heartbeat(
                s, name=self.name, lease_s=self.settings.lease_s,
                state=state or self.reported_state(), host=socket.gethostname(),
                pid=os.getpid(), gpu=self.runtime.gpu, model=self.runtime.model or self.model,
                dtype=self.runtime.dtype or self.dtype, queues=self.queues,
                memory=self.runtime.memory(), model_info=self.runtime.model_info(),
                current_job_id=self.current_job)

    def reap(self) -> None:
        with session_scope() as s:
            jobs.reap_dead_workers(s, stale_s=self.settings.worker_stale_s)
            jobs.reap_expired(s)
        dispatch.reconcile()

    def _exit_if_idle(self) -> None:
        if self.runtime.state != "idle" or self.current_job:
            return
        if not dispatch.pending_jobs(model=self.model, dtype=self.dtype):
            log.info("worker %s: no work left; exiting (exit_when_idle)", self.name)
            self._stop.set()
            os.kill(os.getpid(), signal.SIGTERM)


def start_worker_services(*, preload: bool = True) -> WorkerServices:
    """Build and start this process's services from the ``CHATSPACE_WORKER_*`` environment
    (:class:`workers.config.WorkerEnv`)."""
    global _current
    if _current is not None:
        return _current
    env = WorkerEnv()
    gpu_env = env.gpu
    if gpu_env is None:
        visible = gpu.visible_gpus()
        gpu_env = visible[0] if visible else ""
    name = env.name or f"{socket.gethostname().split('.')[0]}-{os.getpid()}"
    os.environ[WORKER_ENV] = name  # inherited by the engine processes we start
    queues = env.queues or worker_queues(env.model, env.dtype)
    services = WorkerServices(name=name, gpu_index=gpu_env or None, model=env.model,
                              dtype=env.dtype, queues=queues, max_jobs=env.max_jobs,
                              exit_when_idle=env.exit_when_idle)
    _current = services  # visible to remote control while the engine preloads
    try:
        services.start(preload=preload)
    except BaseException:
        _current = None
        services.stop()
        raise
    return services


def stop_worker_services() -> None:
    if _current is not None:
        _current.stop()


def worker_ready() -> None:
    """Celery's consumer takes messages now (the worker_ready signal)."""
    if _current is not None:
        _current.ready()
