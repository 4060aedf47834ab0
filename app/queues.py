"""Queue names: one Celery queue per (model, dtype) worker pool, plus one for any-model workers.

Lives in app/ because the API records a job's queue at submit time; Celery itself lives only
in workers/.
"""

from __future__ import annotations

import re

ANY_QUEUE = "chatspace.any"


def queue_name(model: str, dtype: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_").lower()
    return f"chatspace.{slug}.{dtype}"
