"""Worker remote control, client side: ``release`` and ``reload`` over Celery's broadcast.

``release(name)`` asks a worker to give its GPU back (shut its engine down; the next job
loads it again). ``reload(name)`` asks it to restart its engine (same model, fresh process).
The worker side (what a worker does with them) is :mod:`workers.remote`; the API and the CLI
import only this module.
"""

from __future__ import annotations

from workers.broker import broadcast
from workers.config import nodename

COMMANDS = ("release", "reload")
__all__ = ["COMMANDS", "nodename", "release", "reload"]


def release(name: str | None = None, *, timeout: float = 5.0) -> list[dict]:
    """Ask worker ``name`` (None = every worker) to shut its engine down. One reply each."""
    return broadcast("release", name, timeout=timeout)


def reload(name: str | None = None, *, timeout: float = 5.0) -> list[dict]:
    """Ask worker ``name`` (None = every worker) to restart its engine. One reply each."""
    return broadcast("reload", name, timeout=timeout)
