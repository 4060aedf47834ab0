"""Queue names: one Celery queue per (model, dtype) worker pool, plus one for any-model workers,
and one judge-pool queue per judge model (a Redis list, not Celery: :mod:`app.judge.pool`).

Lives in app/ because the API records a job's queue at submit time; Celery itself lives only
in workers/.
"""

from __future__ import annotations

import re

from app.settings import get_settings

ANY_QUEUE = "chatspace.any"
# The model name is kept verbatim after the colon (Redis keys take any bytes); no job pool's
# name has a colon, so the two never meet in the broker's Redis database.
JUDGE_QUEUE_PREFIX = "chatspace.judge:"


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


def judge_queue(model: str) -> str:
    """The judge pool of ``model``: the Redis list its judge workers pop requests from, and
    the queue name those workers report in their Worker row (how the API finds them)."""
    return JUDGE_QUEUE_PREFIX + model


def judge_model_of(queue: str) -> str | None:
    """The model of a judge-pool queue name, None for any other queue."""
    return queue[len(JUDGE_QUEUE_PREFIX):] if queue.startswith(JUDGE_QUEUE_PREFIX) else None
