"""A judge worker: keeps a judge model warm in the steering engine and answers the judge
pool's chat requests (the server side of :mod:`app.judge.pool`).

``chatspace-jobs worker --judge-model MODEL`` starts one per GPU (``python -m
workers.judgeworker``, configured by the same ``CHATSPACE_WORKER_*`` variables as a job
worker). It is a worker like the others where that matters: a Worker row with heartbeats
(its queue is :func:`app.queues.judge_queue`, how the API finds it), orphaned engine processes
of its name ended at start, the engine shut down fully at exit. It takes no jobs and runs no
Celery consumer.

Serving: pop every request waiting (up to ``judge.pool_max_batch``), drop those whose caller
stopped waiting, render each chat with the model's template, generate each group of equal
sampling settings in one engine call (vLLM batches it), the scale's choices as vLLM
structured outputs so the reply is one of them, and push each reply to its caller. A request
the model cannot take (too long for its context) gets an error reply of its own, never the
batch's; an engine that died is restarted.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

import redis

from app.judge.pool import REPLY_TTL_S, PoolReply, PoolRequest, redis_url, reply_key
from app.prompts import default_template_kwargs, generation_prompt
from app.queues import judge_queue
from app.settings import Settings, get_settings
from workers import gpu, loadfail
from workers.config import WORKER_ENV, WorkerEnv
from workers.engine.spec import SamplingOptions
from workers.lifecycle import WorkerServices
from workers.runtime import EngineRuntime, load_engine

log = logging.getLogger(__name__)


def load_judge_engine(model: str, dtype: str, settings: Settings):
    """The vLLM steering engine whatever ``engine.backend`` says: only vLLM restricts a reply
    to the scale (the transformers backend refuses ``choices``)."""
    engine = settings.engine.model_copy(update={"backend": "vllm"})
    return load_engine(model, dtype, settings.model_copy(update={"engine": engine}))


def _max_model_len(engine) -> int | None:
    try:
        return int(engine.llm.llm_engine.model_config.max_model_len)
    except Exception:  # noqa: BLE001 - no such attribute path: vLLM checks lengths itself
        return None


def _group_key(req: PoolRequest) -> tuple:
    return (req.max_tokens, req.temperature, req.top_p, req.seed,
            tuple(req.choices) if req.choices else None)


class JudgeServer:
    """Turns popped requests into replies with one engine; Redis in :meth:`take` and
    :meth:`answer` only, so :meth:`serve` is testable with any engine."""

    def __init__(self, *, model: str, worker: str, engine: Callable[[], object],
                 redis=None, max_batch: int = 64,
                 on_engine_dead: Callable[[], None] | None = None):
        self.model = model
        self.worker = worker
        self.queue = judge_queue(model)
        self._engine = engine
        self._redis = redis
        self.max_batch = max(1, int(max_batch))
        self._on_engine_dead = on_engine_dead
        self.served = 0
        self.expired = 0
        self.batches = 0

    # -- Redis ----------------------------------------------------------------------------
    def take(self, block_s: float = 1.0) -> list[PoolRequest]:
        """Wait up to ``block_s`` for a request, then take whatever else is waiting."""
        got = self._redis.brpop([self.queue], timeout=block_s)
        if got is None:
            return []
        raws = [got[1]]
        if self.max_batch > 1:
            raws += self._redis.rpop(self.queue, self.max_batch - 1) or []
        out = []
        for raw in raws:
            try:
                out.append(PoolRequest.from_json(raw))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("judge worker %s: dropped a malformed pool message (%s): %.200r",
                          self.worker, exc, raw)
        return out

    def answer(self, replies: list[PoolReply]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for r in replies:
            pipe.lpush(reply_key(r.id), r.to_json())
            pipe.expire(reply_key(r.id), REPLY_TTL_S)
        pipe.execute()

    # -- serving --------------------------------------------------------------------------
    def serve(self, requests: list[PoolRequest], *, now: float | None = None
              ) -> list[PoolReply]:
        """Replies for the requests somebody still waits for (expired ones are dropped)."""
        now = time.time() if now is None else now
        live = [r for r in requests if not r.expired(now)]
        self.expired += len(requests) - len(live)
        if len(live) < len(requests):
            log.warning("judge worker %s: dropped %d request(s) past their deadline",
                        self.worker, len(requests) - len(live))
        if not live:
            return []
        engine = self._engine()
        tok = engine.tokenizer
        kwargs = default_template_kwargs(tok)
        limit = _max_model_len(engine)
        replies: dict[str, PoolReply] = {}
        groups: dict[tuple, list[tuple[PoolRequest, list[int]]]] = {}
        for r in live:
            if r.model != self.model:
                replies[r.id] = self._error(r, f"this worker serves {self.model!r}, not "
                                               f"{r.model!r}", "request")
                continue
            try:
                ids = generation_prompt(tok, r.messages, template_kwargs=kwargs)
            except Exception as exc:  # noqa: BLE001 - the template refused these messages
                replies[r.id] = self._error(r, f"the chat template cannot render these "
                                               f"messages: {type(exc).__name__}: {exc}",
                                            "request")
                continue
            if limit is not None and len(ids) + r.max_tokens > limit:
                replies[r.id] = self._error(
                    r, f"the prompt's {len(ids)} tokens plus max_tokens {r.max_tokens} exceed "
                       f"the model's context of {limit} tokens", "request")
                continue
            groups.setdefault(_group_key(r), []).append((r, ids))
        for key, members in groups.items():
            for (r, _), reply in zip(members, self._generate(key, members)):
                replies[r.id] = reply
        self.batches += 1
        self.served += len(live)
        return [replies[r.id] for r in live]

    def _generate(self, key: tuple, members) -> list[PoolReply]:
        max_tokens, temperature, top_p, seed, choices = key
        options = SamplingOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed, choices=choices)
        try:  # the engine of now: a restart after an engine death replaces it
            results = self._engine().generate([ids for _, ids in members], options)
        except Exception as exc:  # noqa: BLE001 - find the request it was, or the engine
            if self._engine_dead(exc) or len(members) == 1:
                return [self._failed(r, exc) for r, _ in members]
            log.warning("judge worker %s: a batch of %d failed (%s); one by one", self.worker,
                        len(members), exc)
            return [reply for m in members for reply in self._generate(key, [m])]
        return [PoolReply(id=r.id, worker=self.worker, text=res.text,
                          finish_reason=res.finish_reason,
                          prompt_tokens=len(res.prompt_token_ids),
                          completion_tokens=len(res.token_ids))
                for (r, _), res in zip(members, results)]

    def _engine_dead(self, exc: BaseException) -> bool:
        dead = type(exc).__name__ == "EngineDeadError"
        if dead and self._on_engine_dead is not None:
            log.error("judge worker %s: the engine died (%s); restarting it", self.worker, exc)
            self._on_engine_dead()
        return dead

    def _failed(self, r: PoolRequest, exc: BaseException) -> PoolReply:
        # vLLM and the engine raise ValueError (SpecError) for what the request asked
        kind = "request" if isinstance(exc, ValueError) else "worker"
        if kind == "worker":
            log.error("judge worker %s: request %s failed: %s", self.worker, r.id, exc)
        return self._error(r, f"{type(exc).__name__}: {exc}"[:1000], kind)

    def _error(self, r: PoolRequest, message: str, kind: str) -> PoolReply:
        return PoolReply(id=r.id, worker=self.worker, error=message, error_kind=kind)

    def run(self, stop: threading.Event, *, on_state: Callable[[str], None] = lambda s: None,
            block_s: float = 1.0) -> None:
        """Serve until ``stop`` is set (checked at least every ``block_s``)."""
        while not stop.is_set():
            try:
                batch = self.take(block_s)
            except redis.RedisError as exc:
                log.warning("judge worker %s: Redis: %s; retrying", self.worker, exc)
                stop.wait(1.0)
                continue
            if not batch:
                continue
            on_state("busy")
            try:
                replies = self.serve(batch)
            finally:
                on_state("idle")
            try:
                self.answer(replies)
            except redis.RedisError as exc:  # the callers time out and their clients retry
                log.error("judge worker %s: could not send %d replies: %s", self.worker,
                          len(replies), exc)


class JudgeServices(WorkerServices):
    """The worker services (Worker row, heartbeats, reaper, orphan engines) around a judge
    model's engine, loaded with :func:`load_judge_engine`."""

    def __init__(self, *, name: str, gpu_index: str | None, model: str, dtype: str):
        super().__init__(name=name, gpu_index=gpu_index, model=model, dtype=dtype,
                         queues=[judge_queue(model)], max_jobs=None, exit_when_idle=False)
        self.runtime = EngineRuntime(worker_name=name, gpu_index=gpu_index,
                                     settings=self.settings, loader=load_judge_engine)

    def load(self):
        """The engine, tried ``max_load_failures`` times; the last error is raised."""
        tries = max(1, int(self.settings.max_load_failures))
        for attempt in range(1, tries + 1):
            try:
                return loadfail.load(lambda: self.runtime.acquire(self.model, self.dtype))
            except loadfail.LoadFailed as exc:
                log.error("judge worker %s: loading %s failed (try %d of %d): %s", self.name,
                          self.model, attempt, tries, exc.text)
                if attempt == tries:
                    raise
                time.sleep(self.settings.load_retry_s * attempt)
        raise AssertionError("unreachable")


def main() -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    env = WorkerEnv()
    if not env.model:
        log.error("a judge worker needs its model (CHATSPACE_WORKER_MODEL; "
                  "chatspace-jobs worker --judge-model MODEL)")
        return 2
    url = redis_url(settings)
    if url is None:
        log.error("the judge pool needs Redis: set CHATSPACE_BROKER_URL=redis://... (or "
                  "CHATSPACE_JUDGE_QUEUE_URL), the same for the API")
        return 2
    gpu_index = env.gpu
    if gpu_index is None:
        visible = gpu.visible_gpus()
        gpu_index = visible[0] if visible else ""
    name = env.name or f"{socket.gethostname().split('.')[0]}-judge-{os.getpid()}"
    os.environ[WORKER_ENV] = name  # inherited by the engine processes we start
    services = JudgeServices(name=name, gpu_index=gpu_index or None, model=env.model,
                             dtype=env.dtype or settings.default_dtype)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    services.start(preload=False)
    try:
        services.load()
        services.ready()
        server = JudgeServer(
            model=env.model, worker=name, engine=lambda: services.runtime.engine,
            redis=redis.Redis.from_url(url, socket_connect_timeout=5),
            max_batch=settings.judge.pool_max_batch,
            on_engine_dead=lambda: services.runtime.restart(reason="engine died"))
        log.info("judge worker %s serving %s from %s", name, env.model, server.queue)

        def state(s: str) -> None:
            services.runtime.state = s

        server.run(stop, on_state=state)
        log.info("judge worker %s: stopping (%d requests served in %d batches, %d expired)",
                 name, server.served, server.batches, server.expired)
    except loadfail.LoadFailed:
        return 1
    finally:
        services.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
