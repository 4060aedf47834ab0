"""Starting workers: one Celery worker process per GPU, and a local one for the embedded mode.

``run_worker`` is what ``chatspace-jobs worker`` calls. It starts one ``celery worker``
process per visible GPU (or per GPU named), each with ``CUDA_VISIBLE_DEVICES`` pinned to its
GPU and ``--pool=solo``: vLLM starts its engine with multiprocessing spawn, which a prefork
child (daemonic) cannot do, and one process per GPU keeps one warm engine per GPU. On a host
without GPUs it starts one worker with the CPU engine. The parent waits for its children and
forwards SIGINT/SIGTERM so they shut down warmly (the current job finishes its batch and its
item goes back to the queue through the lease).

What each worker process does at start (orphan engines, heartbeats, reaper, idle exit) lives
in :mod:`workers.lifecycle`; it is configured through the ``CHATSPACE_WORKER_*`` variables
set here.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from app.db import session_scope
from app.models import Job
from app.queues import judge_queue, worker_queues
from app.settings import get_settings
from workers import gpu
from workers.config import WorkerEnv, nodename

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
__all__ = ["run_local_until_idle", "run_worker", "spawn_judge_worker", "spawn_worker",
           "worker_queues"]


def _split(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    return [str(v).strip() for v in value if str(v).strip()]


def worker_command(*, name: str, queues: list[str], loglevel: str = "INFO") -> list[str]:
    """The ``celery worker`` command line for one pinned worker process."""
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
            "--pool=solo", "--concurrency=1", "-Q", ",".join(queues), "-n", nodename(name),
            f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"]


def judge_worker_command() -> list[str]:
    """The command line of one judge worker process (:mod:`workers.judgeworker`)."""
    return [sys.executable, "-m", "workers.judgeworker"]


def worker_env(*, name: str, gpu_index: str | None, model: str | None, dtype: str | None,
               queues: list[str], max_jobs: int | None, exit_when_idle: bool) -> dict:
    env = gpu.pinned_env(gpu_index)
    env.update(WorkerEnv(name=name, gpu="" if gpu_index is None else str(gpu_index),
                         model=model, dtype=dtype, queues=queues, max_jobs=max_jobs,
                         exit_when_idle=exit_when_idle).to_env())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def spawn_worker(*, name: str, gpu_index: str | None = None, model: str | None = None,
                 dtype: str | None = None, queues: list[str] | None = None,
                 max_jobs: int | None = None, exit_when_idle: bool = False,
                 stdout=None, stderr=None) -> subprocess.Popen:
    """Start one pinned worker process (returns at once)."""
    qs = worker_queues(model, dtype, queues)
    env = worker_env(name=name, gpu_index=gpu_index, model=model, dtype=dtype, queues=qs,
                     max_jobs=max_jobs, exit_when_idle=exit_when_idle)
    return subprocess.Popen(worker_command(name=name, queues=qs), env=env, cwd=str(ROOT),
                            stdout=stdout, stderr=stderr, start_new_session=True)


def spawn_judge_worker(*, name: str, model: str, gpu_index: str | None = None,
                       dtype: str | None = None, stdout=None, stderr=None) -> subprocess.Popen:
    """Start one pinned judge worker process for ``model`` (returns at once)."""
    env = worker_env(name=name, gpu_index=gpu_index, model=model, dtype=dtype,
                     queues=[judge_queue(model)], max_jobs=None, exit_when_idle=False)
    return subprocess.Popen(judge_worker_command(), env=env, cwd=str(ROOT), stdout=stdout,
                            stderr=stderr, start_new_session=True)


def run_worker(*, model: str | None = None, dtype: str | None = None, gpus=None,
               queues=None, name: str | None = None, max_jobs: int | None = None,
               exit_when_idle: bool = False, judge_model: str | None = None) -> int:
    """Run one worker process per GPU until they exit; returns the worst exit status.

    ``gpus``: GPU indices (list or comma string); default every visible GPU, none = CPU.
    ``name``: base name; each process is ``<name>-gpu<i>`` (or ``<name>-cpu``), default the
    host name. Worker names are stable across restarts so a new worker finds and ends the
    engine processes a killed predecessor of the same name left behind.
    ``judge_model``: judge workers of the judge pool for this model instead
    (:mod:`workers.judgeworker`), named ``<name>-judge-gpu<i>`` so a job worker on the same
    GPU keeps its own name.
    """
    settings = get_settings()
    if judge_model and (model or queues or max_jobs or exit_when_idle):
        raise ValueError("a judge worker serves only its judge model: --judge-model takes "
                         "no --model, --queues, --max-jobs or --exit-when-idle")
    if (model or judge_model) and not dtype:
        dtype = settings.default_dtype
    gpu_list = _split(gpus) if gpus is not None else gpu.visible_gpus()
    base = name or socket.gethostname().split(".")[0]
    if judge_model:
        base += "-judge"
    slots = [(g, f"{base}-gpu{g}") for g in gpu_list] if gpu_list else [(None, f"{base}-cpu")]
    if judge_model:
        procs = [spawn_judge_worker(name=n, gpu_index=g, model=judge_model, dtype=dtype)
                 for g, n in slots]
    else:
        procs = [spawn_worker(name=n, gpu_index=g, model=model, dtype=dtype,
                              queues=_split(queues), max_jobs=max_jobs,
                              exit_when_idle=exit_when_idle)
                 for g, n in slots]
    log.info("started workers %s", ", ".join(n for _, n in slots))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return max((abs(c) for c in codes), default=0)


def run_local_until_idle(job_id: str | None = None, *, timeout_s: float | None = None,
                         log_path: str | Path | None = None) -> int:
    """Run a local worker (a real ``celery worker`` subprocess) until there is no work left.

    The CLI's in-process mode calls this when no live worker serves a job's model: on the
    embedded default (SQLite + filesystem broker) nothing else would run it. The worker
    serves the job's (model, dtype) — or the default model's when ``job_id`` is None — on
    this machine's first GPU or the CPU, and exits once no queued or running job is left
    for it. Returns its exit status.
    """
    settings = get_settings()
    model, dtype = settings.default_model, settings.default_dtype
    if job_id is not None:
        with session_scope() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise ValueError(f"job_id: no job {job_id!r}")
            model, dtype = job.model, job.dtype
    gpus = gpu.visible_gpus()
    log_path = Path(log_path or settings.data_dir / "logs" / "local-worker.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = spawn_worker(name=f"{socket.gethostname().split('.')[0]}-local",
                            gpu_index=gpus[0] if gpus else None, model=model, dtype=dtype,
                            exit_when_idle=True, stdout=out, stderr=subprocess.STDOUT)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while proc.poll() is None:
                if deadline is not None and time.monotonic() > deadline:
                    proc.terminate()
                    proc.wait(30)
                    break
                time.sleep(0.5)
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            raise
    return proc.returncode or 0
