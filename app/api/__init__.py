"""The status API: submit and follow jobs, browse artifacts, drive workers, health.

``create_app`` takes what the API must not import itself: ``enqueue(job_id)`` (the Celery
dispatch lives in ``workers/``) and ``control`` (an object with ``release(name)`` and
``reload(name)`` over Celery remote control). Entry points (``chatspace-jobs api``) wire the
real ones; tests inject recorders. Nothing is built at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

log = logging.getLogger(__name__)


def _no_enqueue(job_id: str) -> None:
    log.warning("job %s committed but no enqueue is configured; a worker's reconciler will "
                "send it", job_id)


def create_app(settings=None, *, enqueue: Callable[[str], None] | None = None,
               control: Any = None) -> FastAPI:
    from app.api import analysis, artifacts, errors, health, jobs, sweeps, ui, workers
    from app.db import default_factory
    from app.settings import get_settings

    settings = settings or get_settings()
    app = FastAPI(title="chatspace-jobs", version="0.1.0",
                  description="Batch persona capture and steered rollouts on warm vLLM workers",
                  docs_url=None, redoc_url=None)  # /docs is served offline by app.api.ui
    app.state.settings = settings
    app.state.session_factory = default_factory(settings.db_url)
    app.state.enqueue = enqueue or _no_enqueue
    app.state.control = control
    app.state.store = None
    errors.install(app)
    for module in (health, jobs, sweeps, workers, artifacts, analysis):
        app.include_router(module.router)
    ui.install(app)
    return app


__all__ = ["create_app"]
