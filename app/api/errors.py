"""One mapping from errors to JSON responses: ``{"error", "message", "field", "hint"}``.

Every ``ChatspaceError`` becomes its ``http_status`` with its own field and hint; request
validation errors (pydantic) and routing errors (404/405) take the same shape, so a client
(and the CLI) reads one format. A database that cannot be reached (connection refused or
lost, pool exhausted, a transaction aborted by the server) is a 503 with ``Retry-After`` on
every route: the request was fine and will work again, which a 500 does not say. Every 503
carries ``Retry-After``. Anything else is a 500 whose body says nothing about the internals
— the traceback goes to the log, tagged with the request path.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import ChatspaceError

log = logging.getLogger(__name__)

_LOC_ROOTS = ("body", "query", "path", "header", "cookie")
RETRY_AFTER_S = 5


def field_path(loc) -> str | None:
    """``('body', 'params', 'steer', 0, 'vector')`` -> ``params.steer[0].vector``."""
    parts = list(loc or ())
    root = None
    if parts and parts[0] in _LOC_ROOTS:
        root = parts.pop(0)
    # pydantic adds the union member tried ('list[int]', 'literal[...]') to the location
    parts = [p for p in parts if not (isinstance(p, str) and ("[" in p or p.startswith(
        ("function-", "json-or-python"))))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or root


def _body(code: str, message: str, field: str | None = None, hint: str | None = None) -> dict:
    return {"error": code, "message": message, "field": field, "hint": hint}


async def chatspace_error(_request: Request, exc: ChatspaceError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    if exc.http_status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=headers)


async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[:1]
    log.warning("database unavailable on %s %s: %s: %s", request.method, request.url.path,
                type(exc).__name__, first[0][:300] if first else "")
    return JSONResponse(
        _body("database_unavailable", "the database is unavailable; try again shortly",
              hint="check that the database server is running and migrated "
                   "(CHATSPACE_DATABASE_URL, `chatspace-jobs db upgrade`)"),
        status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    field = field_path(first.get("loc"))
    message = str(first.get("msg", "invalid request"))
    hint = f"{len(errors) - 1} more problem(s)" if len(errors) > 1 else None
    return JSONResponse(_body("invalid", message, field, hint), status_code=422)


async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(_body(code, str(exc.detail)), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(_body("internal", "internal error; see the API log"), status_code=500)


def install(app: FastAPI) -> None:
    from sqlalchemy import exc as sa

    app.add_exception_handler(ChatspaceError, chatspace_error)
    for cls in (sa.OperationalError, sa.InterfaceError, sa.TimeoutError, sa.DisconnectionError):
        app.add_exception_handler(cls, database_unavailable)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
