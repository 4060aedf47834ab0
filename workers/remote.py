"""Worker remote control, worker side: what ``release`` and ``reload`` do to the engine.

A worker runs with ``--pool=solo``, so it reads control messages only between jobs: a
command that arrives while a job runs is recorded and carried out right after that job's
cleanup. The reply says which happened. :mod:`workers.celery_app` registers the Celery
control commands that call :func:`handle`; the client side is :mod:`workers.control`.
"""

from __future__ import annotations

_pending: set[str] = set()


def pending() -> set[str]:
    """Commands that arrived during a job; the worker runs them after its cleanup."""
    return _pending


def apply_pending(runtime) -> list[str]:
    done = sorted(_pending)
    _pending.clear()
    for cmd in done:
        _apply(cmd, runtime)
    return done


def _apply(command: str, runtime) -> None:
    if command == "release":
        runtime.shutdown()
    elif command == "reload" and runtime.engine is not None:
        runtime.restart(reason="reload requested")


def handle(command: str, runtime) -> dict:
    """Run ``command`` now when the worker is idle, else after its current job."""
    if runtime is None:
        return {"ok": False, "error": "worker has no engine runtime"}
    if runtime.state != "idle":
        _pending.add(command)
        return {"ok": True, "deferred": True, "state": runtime.state}
    _apply(command, runtime)
    return {"ok": True, "deferred": False, "model": runtime.model}
