"""Judge backends: one call, one reply. The OpenAI-compatible one uses the official client.

Why the official ``openai`` client and not our own HTTP code: it already retries what should
be retried (connection errors, timeouts, 408/409/429 and 5xx) with exponential backoff and
jitter, honours ``Retry-After`` on a 429, and speaks every OpenAI-compatible server (OpenAI,
``vllm serve``, gateways). We add only what the service needs around it:

- bounded concurrency (a semaphore per backend);
- a count of the HTTP requests actually sent, client retries included (an httpx event
  hook), per judged persona through a context variable;
- the key kept as a :class:`~pydantic.SecretStr` until it is handed to the client, and
  scrubbed from every error message we keep;
- errors sorted into what a job can act on: :class:`JudgeUnavailable` (the server could not
  be reached or kept failing after the client's retries: retry the stage later),
  :class:`JudgeRejected` (the server refuses this judge configuration: a wrong key, model or
  URL, which no retry fixes), :class:`RequestRejected` (this one request was refused, e.g.
  too long), :class:`MalformedReply` (a 200 whose body is not a chat completion).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from app.errors import ChatspaceError, RetryableError, SpecInvalid

log = logging.getLogger(__name__)

# The per-persona counter the httpx hook bumps; set by the judge run around its tasks.
REQUESTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("judge_requests",
                                                                      default=None)


class JudgeUnavailable(RetryableError):
    """The judge endpoint failed after the client's own retries (down, overloaded, timing
    out, rate limiting beyond the retry budget). The stage can run again later."""

    code = "judge_unavailable"


class JudgeRejected(SpecInvalid):
    """The endpoint refuses this configuration (401/403/404/...): no retry will help."""

    code = "judge_rejected"


class RequestRejected(ChatspaceError):
    """The endpoint refused one request (400/413/422): recorded for that sample."""

    code = "judge_request_rejected"


class MalformedReply(ChatspaceError):
    """A successful status whose body is not a chat completion."""

    code = "judge_malformed_reply"


@dataclass(frozen=True)
class Reply:
    text: str | None
    refused: bool = False  # the judge declined to judge (a refusal message or content filter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_missing: bool = False


class JudgeBackend(Protocol):
    """What the judge run needs from a backend. ``choices``, when given, restricts the reply
    to one of them (structured output); a backend that cannot restrict ignores it."""

    model: str

    async def complete(self, prompt: str, *, choices: list[str] | None = None,
                       temperature: float | None = None) -> Reply: ...

    async def aclose(self) -> None: ...


POOL_PREFIX = "workers:"  # --judge workers:MODEL = the judge pool of this service


def pool_model(judge: str | None) -> str | None:
    """The model of a ``--judge workers:MODEL`` (the judge pool), None for any other judge
    (a model name at the configured OpenAI-compatible endpoint)."""
    if isinstance(judge, str) and judge.startswith(POOL_PREFIX):
        return judge[len(POOL_PREFIX):].strip()
    return None


def judge_base_url(settings, judge: str | None) -> str | None:
    """Where a job's judge is asked: the pool's route on the status API for
    ``workers:MODEL`` (None without ``CHATSPACE_API_URL``), else the configured endpoint."""
    if pool_model(judge) is None:
        return settings.judge.base_url
    return settings.api_url.rstrip("/") + "/v1" if settings.api_url else None


def check_judge(judge: str | None, settings) -> None:
    """A job's judge, checked at submit: ``workers:MODEL`` names a model and the pool has a
    Redis to queue on (the API that takes the submit serves the pool's route)."""
    from app.judge.pool import redis_url

    model = pool_model(judge)
    if model is None:
        return
    if not model:
        raise SpecInvalid("--judge workers: names no model", field="params.judge",
                          hint="--judge workers:MODEL, the model judge workers serve "
                               "(chatspace-jobs worker --judge-model MODEL)")
    if redis_url(settings) is None:
        raise SpecInvalid("the judge pool (--judge workers:MODEL) needs Redis, and this "
                          "service's broker is not Redis", field="params.judge",
                          hint="set CHATSPACE_BROKER_URL=redis://... (or "
                               "CHATSPACE_JUDGE_QUEUE_URL), or judge through an endpoint "
                               "(CHATSPACE_JUDGE_BASE_URL)")


def safe_url(url: str | None) -> str | None:
    """A base URL fit for logs and artifacts: no user:password part, no query string."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class OpenAIBackend:
    """An OpenAI-compatible chat endpoint through ``openai.AsyncOpenAI``."""

    def __init__(self, *, model: str, base_url: str | None = None, api_key=None,
                 max_concurrency: int = 16, max_retries: int = 5, timeout_s: float = 60.0,
                 max_tokens: int = 10, temperature: float | None = None,
                 structured_outputs: bool = False):
        import openai

        if not model:
            raise SpecInvalid("no judge model given", field="judge",
                              hint="pass --judge MODEL or set CHATSPACE_JUDGE_MODEL")
        secret = api_key.get_secret_value() if hasattr(api_key, "get_secret_value") else api_key
        self._secret = secret or None
        self.model = model
        self.base_url = safe_url(base_url)
        self.max_tokens = int(max_tokens)
        self.temperature = None if temperature is None else float(temperature)
        self.structured_outputs = bool(structured_outputs)
        self._sem = asyncio.Semaphore(max(1, int(max_concurrency)))
        self._http = openai.DefaultAsyncHttpxClient(
            event_hooks={"request": [self._count_request]})
        # A local server needs no key, but the client insists on one: send a placeholder.
        self._client = openai.AsyncOpenAI(
            api_key=self._secret or "none", base_url=base_url, max_retries=int(max_retries),
            timeout=float(timeout_s), http_client=self._http)

    @classmethod
    def from_settings(cls, settings, *, model: str | None = None) -> OpenAIBackend:
        j = settings.judge
        return cls(model=model or j.model, base_url=j.base_url, api_key=j.api_key,
                   max_concurrency=j.max_concurrency, max_retries=j.max_retries,
                   timeout_s=j.timeout_s, max_tokens=j.max_tokens, temperature=j.temperature,
                   structured_outputs=j.structured_outputs)

    @classmethod
    def for_judge(cls, settings, judge: str | None, *,
                  structured: bool | None = None) -> OpenAIBackend:
        """The backend of a job's ``--judge``: a model at the configured endpoint, or
        ``workers:MODEL``, the judge pool behind the status API's OpenAI-compatible route
        (``CHATSPACE_API_URL``/v1 with the API's token), restricted to the scale unless the
        job says otherwise. ``structured``: the job's ``judge_structured_outputs``."""
        model = pool_model(judge)
        if model is None:
            b = cls.from_settings(settings, model=judge)
            b.structured_outputs = (settings.judge.structured_outputs if structured is None
                                    else bool(structured))
            return b
        base_url = judge_base_url(settings, judge)
        if base_url is None:
            raise SpecInvalid(f"--judge {judge} sends the judge's requests to the status "
                              "API's /v1 route, and this worker has no API URL",
                              field="judge", hint="set CHATSPACE_API_URL (and "
                                                  "CHATSPACE_API_TOKEN) for the workers")
        j = settings.judge
        return cls(model=model, base_url=base_url,
                   api_key=settings.api_token, max_concurrency=j.max_concurrency,
                   max_retries=j.max_retries, timeout_s=j.timeout_s, max_tokens=j.max_tokens,
                   temperature=j.temperature,
                   structured_outputs=True if structured is None else bool(structured))

    def __repr__(self) -> str:  # never the key
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r})"

    async def _count_request(self, request) -> None:
        counter = REQUESTS.get()
        if counter is not None:
            counter["requests"] = counter.get("requests", 0) + 1

    def scrub(self, text: str) -> str:
        """``text`` with the key (if any) replaced, for anything we keep or show."""
        text = str(text)
        if self._secret and len(self._secret) >= 4:
            text = text.replace(self._secret, "***")
        return text

    async def complete(self, prompt: str, *, choices: list[str] | None = None,
                       temperature: float | None = None) -> Reply:
        """One judge call. ``temperature`` is the scale's; a configured one wins."""
        import openai

        temp = self.temperature if self.temperature is not None else temperature
        kwargs: dict = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                        "max_completion_tokens": self.max_tokens}
        if temp is not None:
            kwargs["temperature"] = temp
        if choices and self.structured_outputs:
            kwargs["extra_body"] = {"structured_outputs": {"choice": list(choices)}}
        async with self._sem:
            try:
                completion = await self._client.chat.completions.create(**kwargs)
            except (openai.APIConnectionError, openai.RateLimitError,
                    openai.InternalServerError) as exc:  # APITimeoutError is a connection error
                raise JudgeUnavailable(self._describe(exc), field="judge",
                                       hint="the stage retries later; check the endpoint") from None
            except (openai.AuthenticationError, openai.PermissionDeniedError,
                    openai.NotFoundError) as exc:
                raise JudgeRejected(self._describe(exc), field="judge",
                                    hint="check CHATSPACE_JUDGE_BASE_URL, the model name and "
                                         "the key") from None
            except openai.APIStatusError as exc:
                if exc.status_code in (400, 413, 422):
                    raise RequestRejected(self._describe(exc), field="judge") from None
                raise JudgeUnavailable(self._describe(exc), field="judge") from None
            except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError,
                    TypeError) as exc:
                raise MalformedReply(self.scrub(f"{type(exc).__name__}: {exc}")[:300],
                                     field="judge") from None
        return self._reply(completion)

    def _reply(self, completion) -> Reply:
        choices = getattr(completion, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise MalformedReply(f"reply has no choices: {str(completion)[:200]}",
                                 field="judge")
        msg = getattr(choices[0], "message", None)
        text = getattr(msg, "content", None)
        if text is not None and not isinstance(text, str):
            raise MalformedReply(f"message content is {type(text).__name__}, not text",
                                 field="judge")
        refused = bool(getattr(msg, "refusal", None)) or (
            getattr(choices[0], "finish_reason", None) == "content_filter")
        usage = getattr(completion, "usage", None)
        pt = getattr(usage, "prompt_tokens", None)
        ct = getattr(usage, "completion_tokens", None)
        return Reply(text=text, refused=refused, prompt_tokens=int(pt or 0),
                     completion_tokens=int(ct or 0),
                     usage_missing=not isinstance(pt, int) or not isinstance(ct, int))

    def _describe(self, exc) -> str:
        status = getattr(exc, "status_code", None)
        head = f"{type(exc).__name__}" + (f" {status}" if status else "")
        where = f" from {self.base_url}" if self.base_url else ""
        return self.scrub(f"{head}{where}: {getattr(exc, 'message', None) or exc}")[:500]

    async def aclose(self) -> None:
        await self._client.close()
