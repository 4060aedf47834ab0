"""Request dependencies as ``Annotated`` aliases: settings, a database session, the store,
the injected enqueue/control callables, and bearer authentication.

Everything hangs off ``app.state`` (set by :func:`app.api.create_app`), never module globals,
so two apps with different settings (tests) never share an engine or a token list.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.errors import ChatspaceError, Unauthorized
from app.settings import Settings


class ControlUnavailable(ChatspaceError):
    http_status = 503
    code = "no_worker_control"


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request; routes commit what they change, the rest is rolled back."""
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


#: how long the API waits on a dependency (database, broker, store) before answering 503
DEPENDENCY_TIMEOUT_S = 2.0


def get_store_dep(request: Request):
    """The artifact store as the API uses it: failing fast (:meth:`ArtifactStore.fail_fast`),
    so a request answers 503 while S3 is down instead of hanging behind upload retries."""
    from app.storage import get_store

    state = request.app.state
    if getattr(state, "store", None) is None:
        state.store = get_store(state.settings).fail_fast(timeout_s=DEPENDENCY_TIMEOUT_S)
    return state.store


def get_enqueue(request: Request) -> Callable[[str], None]:
    return request.app.state.enqueue


def get_control(request: Request) -> Any:
    control = request.app.state.control
    if control is None:
        raise ControlUnavailable("no worker control configured for this API",
                                 hint="serve the API with `chatspace-jobs api` next to the "
                                      "Celery broker")
    return control


def check_token(presented: str | None, tokens) -> bool:
    """Constant-time comparison against every configured token (no early exit)."""
    if not presented:
        return False
    ok = False
    given = presented.encode()
    for token in tokens:
        ok |= hmac.compare_digest(given, token.get_secret_value().encode())
    return ok


def require_auth(request: Request) -> None:
    tokens = request.app.state.settings.api_tokens
    if not tokens:
        return
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not check_token(value.strip(), tokens):
        raise Unauthorized("missing or invalid bearer token", field="Authorization",
                           hint="send 'Authorization: Bearer <token>' (CHATSPACE_API_TOKEN)")


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[Any, Depends(get_store_dep)]
EnqueueDep = Annotated[Callable[[str], None], Depends(get_enqueue)]
ControlDep = Annotated[Any, Depends(get_control)]
Auth = Depends(require_auth)
