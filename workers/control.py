"""Worker remote control over Celery's broadcast channel: ``release`` and ``reload``.

``release(name)`` asks a worker to give its GPU back (shut its engine down; the next job
loads it again). ``reload(name)`` asks it to restart its engine (same model, fresh process).

A worker runs with ``--pool=solo``, so it reads control messages only between jobs: a
command that arrives while a job runs is recorded and carried out right after that job's
cleanup. The reply says which happened.
"""

from __future__ import annotations

import logging

from celery.worker.control import control_command

log = logging.getLogger(__name__)

NODE_PREFIX = "chatspace"
COMMANDS = ("release", "reload")


def nodename(worker_name: str) -> str:
    """The Celery node name of a chatspace worker (what ``destination`` matches)."""
    return worker_name if "@" in worker_name else f"{NODE_PREFIX}@{worker_name}"


def _send(command: str, name: str | None, *, timeout: float) -> list[dict]:
    from workers.celery_app import get_app

    destination = [nodename(name)] if name else None
    replies = get_app().control.broadcast(
        f"chatspace_{command}", destination=destination, reply=True, timeout=timeout)
    return [{"worker": node.split("@", 1)[-1], **(body if isinstance(body, dict) else {"ok": body})}
            for reply in replies or [] for node, body in reply.items()]


def release(name: str | None = None, *, timeout: float = 5.0) -> list[dict]:
    """Ask worker ``name`` (None = every worker) to shut its engine down. One reply each."""
    return _send("release", name, timeout=timeout)


def reload(name: str | None = None, *, timeout: float = 5.0) -> list[dict]:
    """Ask worker ``name`` (None = every worker) to restart its engine. One reply each."""
    return _send("reload", name, timeout=timeout)


# ---- worker side: registered when this module is imported in the worker process ----------

_pending: set[str] = set()


def pending() -> set[str]:
    """Commands that arrived during a job; the task runs them after its cleanup."""
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


def _handle(command: str) -> dict:
    from workers import lifecycle

    runtime = lifecycle.current_runtime()
    if runtime is None:
        return {"ok": False, "error": "worker has no engine runtime"}
    if runtime.state != "idle":
        _pending.add(command)
        return {"ok": True, "deferred": True, "state": runtime.state}
    _apply(command, runtime)
    return {"ok": True, "deferred": False, "model": runtime.model}


@control_command(name="chatspace_release")
def _release_command(state) -> dict:
    return _handle("release")


@control_command(name="chatspace_reload")
def _reload_command(state) -> dict:
    return _handle("reload")
