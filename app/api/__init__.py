"""The status API: submit and follow jobs, browse artifacts, drive workers, health, and the
judge pool's OpenAI-compatible ``/v1`` routes (:mod:`app.api.openai_compat`).

``create_app`` takes what the API must not import itself: ``enqueue(job_id, *, reason)``
(the Celery dispatch lives in ``workers/``; ``reason`` is "submitted" or "retry" and lands in
the job's ``enqueued`` event) and ``control`` (an object with ``release(name)`` and
``reload(name)`` over Celery remote control). Entry points (``chatspace-jobs api``) wire the
real ones; tests inject recorders. Nothing is built at import time.

The API's own description (``/openapi.json``, ``/docs``) sits behind the same bearer token as
every route (or the web page's login cookie) unless ``CHATSPACE_API_DOCS_PUBLIC`` opens it:
it lists every route and parameter, which is not for anyone who can reach the port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

log = logging.getLogger(__name__)


def _no_enqueue(job_id: str, *, reason: str = "submitted") -> None:
    log.warning("job %s committed but no enqueue is configured; a worker's reconciler will "
                "send it", job_id)


def create_app(settings=None, *, enqueue: Callable[[str], None] | None = None,
               control: Any = None) -> FastAPI:
    from app.api import (
        analysis,
        artifacts,
        errors,
        health,
        jobs,
        openai_compat,
        sweeps,
        ui,
        uploads,
        workers,
    )
    from app.db import default_factory
    from app.settings import get_settings

    settings = settings or get_settings()
    public = settings.api_docs_public
    app = FastAPI(title="chatspace-jobs", version="0.1.0",
                  description="Batch persona capture and steered rollouts on warm vLLM workers",
                  docs_url=None, redoc_url=None)  # /docs is served offline by app.api.ui
    app.state.settings = settings
    app.state.session_factory = default_factory(settings.db_url)
    app.state.enqueue = enqueue or _no_enqueue
    app.state.control = control
    app.state.store = None
    errors.install(app)
    for module in (health, jobs, sweeps, workers, artifacts, analysis, openai_compat,
                   uploads):
        app.include_router(module.router)
    ui.install(app)
    if not public:
        _guard_docs(app)
    return app


DOCS_PATHS = frozenset({"/docs", "/openapi.json", "/redoc"})


def _guard_docs(app: FastAPI) -> None:
    """``/docs`` (served offline by :mod:`app.api.ui`) and ``/openapi.json`` answer only with a
    valid bearer token, or the web page's login cookie (so the docs open in a browser after
    logging in to the page); anything else gets the API's 401."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    from app.api.deps import check_token
    from app.api.ui import COOKIE
    from app.errors import Unauthorized

    @app.middleware("http")
    async def docs_need_a_token(request: Request, call_next):
        if request.url.path in DOCS_PATHS:
            tokens = request.app.state.settings.api_tokens
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            presented = value.strip() if scheme.lower() == "bearer" else \
                request.cookies.get(COOKIE)
            if tokens and not check_token(presented, tokens):
                err = Unauthorized("missing or invalid bearer token", field="Authorization",
                                   hint="send 'Authorization: Bearer <token>', or log in at /ui/")
                return JSONResponse(err.to_dict(), status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)
