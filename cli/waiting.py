"""What ``submit --wait`` and ``status --watch`` say while a job has nothing running, and
the local worker ``--wait`` starts when nothing else would run the job.

A researcher who waits must see why nothing moves — a worker still loading the model (which
takes minutes for a large one), no live worker for the model, or a load that failed with its
error — never a silent ``queued``. On the embedded default (no API URL) ``--wait`` also starts
a local worker whenever no live worker serves the job: at the start, and again if the one it
started exits while the job still waits (a worker that cannot load the model fails the job
after a bounded number of tries, which ends the wait with that error).

Pure functions of the API's JSON plus a small stateful helper; no workers/ import (the local
worker is started through the callable the caller passes).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from app.queues import ANY_QUEUE, queue_name

TERMINAL = ("succeeded", "failed", "cancelled")
LOADING = ("starting", "loading")


def serving(job: dict, workers: list[dict]) -> list[dict]:
    """Live workers that consume the job's pool queue or the any-model queue."""
    wanted = {queue_name(job["model"], job["dtype"]), ANY_QUEUE}
    return [w for w in workers if w.get("alive") and wanted & set(w.get("queues") or [])]


def running(job: dict) -> bool:
    return any(p.get("state") == "running"
               for p in (job.get("progress") or {}).get("personas", []))


def note(job: dict, workers: list[dict], *, waited_s: float, local: bool = False) -> str | None:
    """One line on why the job is not running, or None when it is (or has ended)."""
    if job["state"] in TERMINAL or running(job):
        return None
    n = f"({int(waited_s)} s)"
    live = serving(job, workers)
    loading = [w["name"] for w in live if w.get("state") in LOADING]
    if loading:
        text = f"loading model {job['model']} on {', '.join(loading)} {n}"
    elif live:
        text = f"waiting for a worker of {job['model']} ({job['dtype']}) {n}"
    elif local:
        text = f"starting worker for {job['model']} ({job['dtype']}) {n}"
    else:
        text = (f"no live worker serves {job['model']} ({job['dtype']}) {n}; start one: "
                f"chatspace-jobs worker --model {job['model']} --dtype {job['dtype']}")
    if job.get("last_error"):
        text += f"\nlast error: {job['last_error'][:500]}"
    return text


class LocalWorkers:
    """Starts a local worker (``start(job_id)`` returns a thread-like object with
    ``is_alive()``) when the job waits and no live worker serves it, and again when the one
    started has exited while the job still waits."""

    def __init__(self, start: Callable[[str], object], *, clock=time.monotonic):
        self._start = start
        self._clock = clock
        self.thread = None
        self.started = 0

    @property
    def active(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def ensure(self, job: dict, workers: list[dict]) -> bool:
        """Start one if needed; True when a worker was started now."""
        if job["state"] in TERMINAL or running(job) or self.active or serving(job, workers):
            return False
        self.thread = self._start(job["id"])
        self.started += 1
        return True
