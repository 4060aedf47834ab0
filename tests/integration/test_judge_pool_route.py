"""The judge pool's OpenAI-compatible route on a real API server (uvicorn on 127.0.0.1), real
Postgres for the Worker rows, real Redis for the queue, the real ``openai`` client.

Which judge workers exist is written as Worker rows, the way a worker's heartbeat writes
them; the worker side is :class:`workers.judgeworker.JudgeServer` popping from the same
Redis in a thread, with a recording engine at the edge (the real engine and worker process:
tests/engine/test_judge_pool.py). What must hold: a model nobody serves is a 404 at once, a
pool whose workers stopped a 503 at once, a pool that does not answer a 503 after
``pool_wait_s`` (never an endless wait), and errors in OpenAI's shape that the judge
backend sorts as it sorts OpenAI's.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import httpx
import openai
import pytest
import redis

from app.judge import TRAITS, JudgeRejected, JudgeUnavailable, OpenAIBackend
from app.judge.run import judge_persona
from app.queues import judge_queue, queue_name
from app.responses import Response
from tests.integration.api_server import start
from tests.unit.test_judge_pool import RecordingEngine
from workers.judgeworker import JudgeServer

TOKEN = "tok-judge-pool-5d1e"
WAIT_S = 1.5


@pytest.fixture
def api(pg_url, redis_url, monkeypatch):
    from app.api import create_app
    from app.db import default_factory, dispose_all, session_scope, upgrade
    from app.settings import get_settings
    from tests.conftest import free_port

    monkeypatch.setenv("CHATSPACE_DATABASE_URL", pg_url)
    monkeypatch.setenv("CHATSPACE_BROKER_URL", redis_url)
    monkeypatch.setenv("CHATSPACE_API_TOKENS", f'["{TOKEN}"]')
    monkeypatch.setenv("CHATSPACE_JUDGE_POOL_WAIT_S", str(WAIT_S))
    get_settings.cache_clear()
    settings = get_settings()
    upgrade(pg_url)
    port = free_port()
    server, thread = start(create_app(settings), port)

    def worker(name, model, *, state="idle", age_s=0.0, queues=None):
        from app import jobs

        with session_scope(default_factory(pg_url)) as s:
            jobs.upsert_worker(s, name=name, state=state, model=model, dtype="float32",
                               queues=queues or [judge_queue(model)], pid=1, host="h",
                               heartbeat_at=datetime.now(UTC) - timedelta(seconds=age_s))

    api = SimpleNamespace(url=f"http://127.0.0.1:{port}", redis_url=redis_url,
                          redis=redis.Redis.from_url(redis_url), worker=worker)
    try:
        yield api
    finally:
        server.should_exit = True
        thread.join(10)
        dispose_all()


def _client(api, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.url + "/v1", api_key=TOKEN, max_retries=0, **kw)


def _ask(client, model, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Score this answer."}],
        max_completion_tokens=10, temperature=0.0,
        extra_body={"structured_outputs": {"choice": TRAITS.choices}}, **kw)


def test_models_lists_only_live_judge_workers(api):
    api.worker("j1", "tiny:qwen3")
    api.worker("j2", "tiny:qwen3", state="busy")
    api.worker("old", "gone-model", state="stopped")
    api.worker("silent", "silent-model", age_s=3600)
    api.worker("jobs", "tiny:qwen3", queues=[queue_name("tiny:qwen3", "float32")])
    listed = _client(api).models.list()
    assert [m.id for m in listed.data] == ["tiny:qwen3"]
    assert [w["name"] for w in listed.data[0].model_extra["workers"]] == ["j1", "j2"]


def test_no_worker_ever_is_a_404_that_the_judge_stage_does_not_retry(api):
    t0 = time.monotonic()
    with pytest.raises(openai.NotFoundError) as info:
        _ask(_client(api), "never-served")
    assert time.monotonic() - t0 < 2
    err = info.value.body
    assert err["type"] == "not_found_error" and err["param"] == "model"
    assert "chatspace-jobs worker --judge-model never-served" in err["message"]
    raw = httpx.post(api.url + "/v1/chat/completions", headers={"Authorization":
                     f"Bearer {TOKEN}"}, json={"model": "never-served", "messages": [
                         {"role": "user", "content": "hi"}]})
    both = raw.json()  # OpenAI's error, extended by the service's one error shape
    assert both["error"]["message"] == both["message"] and both["field"] == "model"
    assert both["hint"] == "start one: chatspace-jobs worker --judge-model never-served"
    with pytest.raises(JudgeRejected, match="--judge-model never-served"):
        judge_persona(lambda: OpenAIBackend(model="never-served", base_url=api.url + "/v1",
                                            api_key=TOKEN, structured_outputs=True),
                      persona="p", eval_prompt="{question} {answer}", scale=TRAITS,
                      responses=[Response("pos_p0_q0", "pos", 0, 0, "", "q", "a")])


def test_stopped_workers_are_a_503_at_once_and_silence_a_503_after_the_wait(api):
    api.worker("old", "gone-model", state="stopped")
    client = _client(api)
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        _ask(client, "gone-model")
    assert time.monotonic() - t0 < 2 and info.value.status_code == 503
    assert info.value.response.headers["Retry-After"] == "5"
    assert "no live judge worker serves model 'gone-model'" in info.value.body["message"]

    api.worker("ghost-w", "ghost", state="loading")  # alive, but nothing pops its queue
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        _ask(client, "ghost")
    waited = time.monotonic() - t0
    assert WAIT_S - 0.1 <= waited < WAIT_S + 3, waited
    assert "within 1.5 s (workers: ghost-w (loading))" in info.value.body["message"]
    # the request stays queued past its deadline: the worker that comes later drops it
    eng = RecordingEngine(tokenizer=None)
    late = JudgeServer(model="ghost", worker="ghost-w", engine=lambda: eng, redis=api.redis)
    taken = late.take(block_s=0.1)
    assert len(taken) == 1 and late.serve(taken) == [] and late.expired == 1 and not eng.calls
    with pytest.raises(JudgeUnavailable, match="503"):
        judge_persona(lambda: OpenAIBackend(model="gone-model", base_url=api.url + "/v1",
                                            api_key=TOKEN, max_retries=1),
                      persona="p", eval_prompt="{question} {answer}", scale=TRAITS,
                      responses=[Response("pos_p0_q0", "pos", 0, 0, "", "q", "a")])


def test_requests_the_pool_cannot_serve_are_400_in_openais_shape(api):
    api.worker("j1", "tiny:qwen3")
    client = _client(api)
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, "tiny:qwen3", stop=["\n"])
    assert info.value.body["param"] == "stop" and "not served" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        _ask(client, "tiny:qwen3", n=2)
    raw = httpx.post(api.url + "/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {TOKEN}"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        _ask(openai.OpenAI(base_url=api.url + "/v1", api_key="wrong", max_retries=0),
             "tiny:qwen3")
    assert api.redis.llen(judge_queue("tiny:qwen3")) == 0  # nothing refused was queued


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from workers.engine.tiny import ensure_tiny_model

    path = ensure_tiny_model("tiny:qwen3", tmp_path_factory.mktemp("models"))
    return AutoTokenizer.from_pretrained(str(path))


def test_round_trip_through_redis_batches_what_waits(api, tokenizer):
    """Requests sent while the worker generates wait in the list and go as one batch."""
    api.worker("j1", "tiny:qwen3")
    eng = RecordingEngine(tokenizer)
    entered, gate = threading.Event(), threading.Event()
    plain = eng.generate

    def generate(prompts, options, specs=None):
        entered.set()
        gate.wait(10)
        return plain(prompts, options, specs)

    eng.generate = generate
    server = JudgeServer(model="tiny:qwen3", worker="j1", engine=lambda: eng,
                         redis=redis.Redis.from_url(api.redis_url), max_batch=16)
    stop = threading.Event()
    thread = threading.Thread(target=server.run, args=(stop,), kwargs={"block_s": 0.2},
                              daemon=True)
    thread.start()
    client = _client(api, timeout=30)
    results: list = []
    asks = [threading.Thread(target=lambda: results.append(_ask(client, "tiny:qwen3")))
            for _ in range(6)]
    try:
        asks[0].start()
        assert entered.wait(10)  # the first request is in the engine, behind the gate
        for t in asks[1:]:
            t.start()
        deadline = time.monotonic() + 10
        while api.redis.llen(judge_queue("tiny:qwen3")) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        gate.set()
        for t in asks:
            t.join(20)
    finally:
        gate.set()
        stop.set()
        thread.join(5)
    assert len(results) == 6 and all(r.choices[0].message.content == "REFUSAL" for r in results)
    assert [len(p) for p, _ in eng.calls] == [1, 5]  # the first alone, the five waiting together
    assert all(r.usage.completion_tokens == 2 and r.usage.prompt_tokens > 5 for r in results)
    assert server.batches == 2 and server.served == 6
