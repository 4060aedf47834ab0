"""The judge pool's protocol: how the API's OpenAI-compatible route hands a chat request to
the judge workers of one model and gets each reply back, over Redis.

Why a pool of our own: a judge model kept warm in the same steering engine the capture jobs
use, on our GPUs, restricted by structured output to the scale, so every reply parses. Why the
route: the judge stage keeps one client path (the official ``openai`` client with its
retries, Retry-After and request counting) whether the judge is OpenAI, ``vllm serve`` or
this pool, and anything that speaks OpenAI can use the pool.

The wire, one Redis database (the broker's, or ``CHATSPACE_JUDGE_QUEUE_URL``):

- requests: ``LPUSH`` of a :class:`PoolRequest` (JSON) onto the list
  :func:`app.queues.judge_queue` (``chatspace.judge:<model>``); judge workers of the model
  pop from the other end (first in, first out), as many as are waiting, one batch at a time;
- replies: the worker ``LPUSH``-es a :class:`PoolReply` onto :func:`reply_key` of the request
  and lets it expire after :data:`REPLY_TTL_S`; the route waits on it with ``BLPOP`` for at
  most ``pool_wait_s``;
- a request carries its ``deadline`` (epoch seconds): a worker drops one that nobody waits
  for any more instead of generating for it;
- liveness is not on the wire: judge workers heartbeat their Worker row in Postgres with the
  pool's queue name, as every worker does, and the route reads those rows.

This module only declares the protocol (names, messages, the request's validation). The
route (:mod:`app.api.openai`) is the client side, :mod:`workers.judgeworker` the server side.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPLY_PREFIX = "chatspace.judge.reply:"
REPLY_TTL_S = 120  # a reply nobody collected is gone after this
MAX_CHOICES = 1000


def redis_url(settings) -> str | None:
    """The pool's Redis: ``judge.queue_url``, else the broker's when it is Redis, else None
    (the embedded default's broker is a folder: no pool)."""
    url = settings.judge.queue_url or settings.broker_url
    return url if url and url.startswith(("redis://", "rediss://", "unix://")) else None


def reply_key(request_id: str) -> str:
    return REPLY_PREFIX + request_id


class BadRequest(ValueError):
    """A chat request the pool cannot serve as asked; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[_Part]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else \
            "".join(p.text for p in self.content)


class _Structured(BaseModel):
    model_config = ConfigDict(extra="forbid")
    choice: list[str] = Field(min_length=1, max_length=MAX_CHOICES)


class ChatRequest(BaseModel):
    """The part of OpenAI's chat-completions request the pool serves. Anything that would
    change the reply and is not served (tools, response_format, stop strings, penalties,
    streaming, several choices) is refused, never ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    max_tokens: int | None = Field(None, ge=1, le=4096)  # the older name of the same
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    n: Literal[1] = 1
    stream: Literal[False] = False
    user: str | None = None
    # vLLM's own field (``vllm serve`` takes the same body): restrict the reply to one of
    # these strings, e.g. the judge scale's choices
    structured_outputs: _Structured | None = None

    @model_validator(mode="after")
    def _choices_are_text(self):
        if self.structured_outputs and not all(self.structured_outputs.choice):
            raise ValueError("structured_outputs.choice: every choice must be non-empty")
        return self


def parse_chat_request(body) -> ChatRequest:
    """The request, or :class:`BadRequest` naming the first problem."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as exc:
        # a field the pool does not serve says more than what is missing beside it
        err = min(exc.errors(), key=lambda e: e.get("type") != "extra_forbidden")
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = err.get("msg", "invalid request")
        if err.get("type") == "extra_forbidden":
            msg = f"'{loc}' is not served by the judge pool"
        raise BadRequest(f"{loc}: {msg}" if loc else msg, param=loc or None) from None


@dataclass(frozen=True)
class PoolRequest:
    id: str
    model: str
    messages: list[dict]  # [{"role", "content"}] with text content
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    choices: list[str] | None
    deadline: float  # epoch seconds; past it nobody waits for the reply

    @classmethod
    def from_chat(cls, req: ChatRequest, *, wait_s: float, default_max_tokens: int = 16,
                  now: float | None = None) -> PoolRequest:
        return cls(id=uuid.uuid4().hex, model=req.model,
                   messages=[{"role": m.role, "content": m.text()} for m in req.messages],
                   max_tokens=int(req.max_completion_tokens or req.max_tokens
                                  or default_max_tokens),
                   temperature=1.0 if req.temperature is None else float(req.temperature),
                   top_p=1.0 if req.top_p is None else float(req.top_p), seed=req.seed,
                   choices=list(req.structured_outputs.choice) if req.structured_outputs
                   else None,
                   deadline=(time.time() if now is None else now) + float(wait_s))

    @property
    def reply_key(self) -> str:
        return reply_key(self.id)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.deadline

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> PoolRequest:
        d = json.loads(raw)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PoolReply:
    id: str
    worker: str
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # set when the worker could not serve the request (the route answers 400 for a request
    # the model cannot take, e.g. too long; 500 for a failure inside the worker)
    error: str | None = None
    error_kind: Literal["request", "worker"] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> PoolReply:
        d = json.loads(raw)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
