"""Queue names: one Celery queue per (model, dtype) worker pool, plus one for any-model workers.

Lives in app/ because the API records a job's queue at submit time; Celery itself lives only
in workers/.
"""

from __future__ import annotations

import re

from app.settings import get_settings

ANY_QUEUE = "chatspace.any"


def queue_name(model: str, dtype: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_").lower()
    return f"chatspace.{slug}.{dtype}"


def worker_queues(model: str | None, dtype: str | None,
                  queues: list[str] | None = None) -> list[str]:
    """The queues a worker consumes: ``queues`` plus its (model, dtype) pool (dtype defaults
    to the settings' ``default_dtype``), or the any-model queue when it serves no one model."""
    out = list(queues or [])
    if model:
        out.append(queue_name(model, dtype or get_settings().default_dtype))
    else:
        out.append(ANY_QUEUE)
    return list(dict.fromkeys(out))
