"""OpenAI-compatible routes over the judge pool: ``POST /v1/chat/completions`` and
``GET /v1/models`` (the client side of :mod:`app.judge.pool`).

``--judge workers:MODEL`` points the judge stage's ``openai`` client here; any other
OpenAI client can use the pool too (``base_url=<api>/v1``, the API's bearer token as key).
Errors have OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) so the
client sorts them as it sorts OpenAI's:

- 400: a request the pool does not serve as asked (a field it would have to ignore, a
  prompt longer than the model takes);
- 404: no judge worker ever served this model (``chatspace-jobs worker --judge-model``);
- 503 with ``Retry-After``: no judge worker of the model is alive now, none answered within
  ``judge.pool_wait_s``, or the pool's Redis is missing or down. A request never waits
  longer than that bound.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

import redis
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from redis import asyncio as aredis
from sqlalchemy import select

from app.api.deps import Auth, SessionDep, SettingsDep
from app.api.views import aware
from app.judge.pool import (
    BadRequest,
    ChatRequest,
    PoolReply,
    PoolRequest,
    parse_chat_request,
    redis_url,
)
from app.models import Worker
from app.queues import JUDGE_QUEUE_PREFIX, judge_model_of, judge_queue

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["judge pool (OpenAI-compatible)"], dependencies=[Auth])
DEFAULT_MAX_TOKENS = 256
RETRY_NO_WORKER_S = 5


def _error(status: int, message: str, *, type_: str, param: str | None = None,
           hint: str | None = None, retry_after: int | None = None) -> JSONResponse:
    """OpenAI's error body, which the service's one error shape (``message``, ``field``,
    ``hint`` beside ``error``) extends: OpenAI clients read ``error.message``, ours the rest."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": status},
                         "message": message, "field": param, "hint": hint},
                        status_code=status, headers=headers)


def _inline(schema: dict) -> dict:
    """A pydantic JSON schema with its ``$defs`` inlined (OpenAPI resolves no local $defs)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.rsplit("/", 1)[-1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _alive(w: Worker, stale_s: float, now: datetime) -> bool:
    hb = aware(w.heartbeat_at)
    return w.state != "stopped" and hb is not None and (now - hb).total_seconds() <= stale_s


def _judge_workers(session) -> list[Worker]:
    rows = session.execute(select(Worker).order_by(Worker.name)).scalars().all()
    return [w for w in rows if any(q.startswith(JUDGE_QUEUE_PREFIX) for q in w.queues or [])]


def _pool_of(session_factory, model: str, stale_s: float) -> tuple[list[dict], bool]:
    """(live judge workers of ``model`` as {name, state}, whether any ever registered)."""
    queue = judge_queue(model)
    now = datetime.now(UTC)
    session = session_factory()
    try:
        known = [w for w in _judge_workers(session) if queue in (w.queues or [])]
        return ([{"name": w.name, "state": w.state} for w in known if _alive(w, stale_s, now)],
                bool(known))
    finally:
        session.rollback()
        session.close()


@router.get("/models")
def list_models(session: SessionDep, settings: SettingsDep) -> dict:
    """The models live judge workers serve, OpenAI's list shape (plus the workers)."""
    now = datetime.now(UTC)
    models: dict[str, dict] = {}
    for w in _judge_workers(session):
        if not _alive(w, settings.worker_stale_s, now):
            continue
        for q in w.queues or []:
            model = judge_model_of(q)
            if model is None:
                continue
            entry = models.setdefault(model, {
                "id": model, "object": "model", "owned_by": "chatspace-jobs",
                "created": int((aware(w.started_at) or now).timestamp()), "workers": []})
            entry["workers"].append({"name": w.name, "state": w.state, "dtype": w.dtype})
    return {"object": "list", "data": [models[k] for k in sorted(models)]}


def _redis(app):
    """One asyncio Redis client per app (made on first use, inside the server's loop)."""
    client = getattr(app.state, "judge_redis", None)
    if client is None:
        client = aredis.Redis.from_url(redis_url(app.state.settings), socket_connect_timeout=2)
        app.state.judge_redis = client
    return client


@router.post("/chat/completions", openapi_extra={"requestBody": {
    "required": True,
    "content": {"application/json": {"schema": _inline(ChatRequest.model_json_schema())}}}},
    responses={
    400: {"description": "a request the pool does not serve as asked"},
    404: {"description": "no judge worker serves this model"},
    503: {"description": "no live judge worker, no reply in time, or no Redis"}})
async def chat_completions(request: Request) -> JSONResponse:
    """A chat completion from the judge workers of ``model``; ``structured_outputs.choice``
    (vLLM's field) restricts the reply to one of the given strings."""
    settings = request.app.state.settings
    try:
        body = json.loads(await request.body())
    except ValueError:
        return _error(400, "the body is not JSON", type_="invalid_request_error")
    try:
        chat = parse_chat_request(body)
    except BadRequest as exc:
        return _error(400, exc.message, type_="invalid_request_error", param=exc.param)
    model = chat.model
    if redis_url(settings) is None:
        return _error(503, "the judge pool needs Redis, and this API's broker is not Redis",
                      type_="service_unavailable", retry_after=RETRY_NO_WORKER_S,
                      hint="set CHATSPACE_BROKER_URL=redis://... (or "
                           "CHATSPACE_JUDGE_QUEUE_URL) for the API and the judge workers")
    live, known = await run_in_threadpool(_pool_of, request.app.state.session_factory, model,
                                          settings.worker_stale_s)
    start = f"start one: chatspace-jobs worker --judge-model {model}"
    if not known:
        return _error(404, f"no judge worker serves model {model!r}; {start}",
                      type_="not_found_error", param="model", hint=start)
    if not live:
        return _error(503, f"no live judge worker serves model {model!r} (its workers "
                      f"stopped or stopped heartbeating); {start}",
                      type_="service_unavailable", param="model", hint=start,
                      retry_after=RETRY_NO_WORKER_S)
    wait_s = float(settings.judge.pool_wait_s)
    req = PoolRequest.from_chat(chat, wait_s=wait_s, default_max_tokens=DEFAULT_MAX_TOKENS)
    client = _redis(request.app)
    try:
        await client.lpush(judge_queue(model), req.to_json())
        got = await client.blpop([req.reply_key], timeout=wait_s)
    except redis.RedisError as exc:
        log.warning("judge pool: Redis failed for %s: %s", model, exc)
        return _error(503, f"the judge pool's Redis is unavailable ({type(exc).__name__})",
                      type_="service_unavailable", retry_after=RETRY_NO_WORKER_S)
    if got is None:
        who = ", ".join(f"{w['name']} ({w['state']})" for w in live)
        return _error(503, f"no reply from the judge workers of {model!r} within {wait_s:g} s "
                      f"(workers: {who}); they may be loading the model or busy",
                      type_="service_unavailable", retry_after=1,
                      hint="the client may ask again; more judge workers serve more")
    reply = PoolReply.from_json(got[1])
    if reply.error:
        status = 400 if reply.error_kind == "request" else 500
        return _error(status, f"judge worker {reply.worker}: {reply.error}",
                      type_="invalid_request_error" if status == 400 else "server_error")
    return JSONResponse({
        "id": f"chatcmpl-{req.id}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                     "finish_reason": reply.finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": reply.prompt_tokens,
                  "completion_tokens": reply.completion_tokens,
                  "total_tokens": reply.prompt_tokens + reply.completion_tokens}},
        headers={"X-Chatspace-Worker": reply.worker})
