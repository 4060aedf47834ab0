"""The judge pool without services: what the route accepts (app/judge/pool.py), how a judge
worker turns a popped batch into replies (workers/judgeworker.py ``JudgeServer.serve``), and
how a job's ``--judge workers:MODEL`` becomes a backend.

The engine here is a recorder at the edge (the real engine: tests/engine/test_judge_pool.py);
the tokenizer is the tiny Qwen3's real one, with its real chat template.
"""

from __future__ import annotations

import json

import pytest
from pydantic import SecretStr

from app.errors import SpecInvalid
from app.judge import ROLES, TRAITS, OpenAIBackend
from app.judge.backend import check_judge, judge_base_url, pool_model
from app.judge.pool import BadRequest, PoolReply, PoolRequest, parse_chat_request, redis_url
from app.prompts import default_template_kwargs, generation_prompt
from app.queues import judge_model_of, judge_queue, queue_name
from app.settings import get_settings
from workers.engine.spec import GenResult
from workers.judgeworker import JudgeServer

BODY = {"model": "tiny:qwen3", "messages": [{"role": "user", "content": "Score: 7?"}],
        "max_completion_tokens": 10, "temperature": 0.0,
        "structured_outputs": {"choice": TRAITS.choices}}


def test_the_judge_clients_request_is_served_as_sent():
    req = parse_chat_request(BODY)
    pr = PoolRequest.from_chat(req, wait_s=30, now=1000.0)
    assert (pr.model, pr.max_tokens, pr.temperature, pr.top_p) == ("tiny:qwen3", 10, 0.0, 1.0)
    assert pr.choices == TRAITS.choices and pr.deadline == 1030.0
    assert pr.messages == [{"role": "user", "content": "Score: 7?"}]
    assert PoolRequest.from_json(pr.to_json()) == pr
    assert not pr.expired(now=1029.9) and pr.expired(now=1030.0)
    older = parse_chat_request({**BODY, "max_completion_tokens": None, "max_tokens": 3,
                                "structured_outputs": None, "temperature": None})
    p2 = PoolRequest.from_chat(older, wait_s=1, default_max_tokens=99)
    assert (p2.max_tokens, p2.temperature, p2.choices) == (3, 1.0, None)  # OpenAI defaults
    parts = parse_chat_request({**BODY, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert PoolRequest.from_chat(parts, wait_s=1).messages[0]["content"] == "ab"


@pytest.mark.parametrize("change, param", [
    ({"stream": True}, "stream"),
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"stop": ["\n"]}, "stop"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"structured_outputs": {"regex": "[0-9]+"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": ""}, "model"),
])
def test_what_would_change_the_reply_is_refused_never_ignored(change, param):
    with pytest.raises(BadRequest) as info:
        parse_chat_request({**BODY, **change})
    assert info.value.param == param, info.value.message
    with pytest.raises(BadRequest):
        parse_chat_request({**BODY, "structured_outputs": {"choice": ["1", ""]}})
    with pytest.raises(BadRequest):
        parse_chat_request([BODY])


def test_queue_names_and_the_pools_redis(monkeypatch):
    assert judge_queue("Org/Model-7B") == "chatspace.judge:Org/Model-7B"
    assert judge_model_of(judge_queue("tiny:qwen3")) == "tiny:qwen3"
    assert judge_model_of(queue_name("tiny:qwen3", "float32")) is None
    assert ":" not in queue_name("tiny:qwen3", "float32")  # a job pool never meets the judge's
    assert redis_url(get_settings()) is None  # embedded default: a folder broker, no pool
    monkeypatch.setenv("CHATSPACE_BROKER_URL", "redis://h:6379/2")
    get_settings.cache_clear()
    assert redis_url(get_settings()) == "redis://h:6379/2"
    monkeypatch.setenv("CHATSPACE_JUDGE_QUEUE_URL", "redis://other:6379/5")
    get_settings.cache_clear()
    assert redis_url(get_settings()) == "redis://other:6379/5"


def test_judge_workers_model_becomes_the_apis_v1_route(monkeypatch):
    assert pool_model("workers:tiny:qwen3") == "tiny:qwen3"
    assert pool_model("gpt-4.1-mini") is None and pool_model(None) is None
    with pytest.raises(SpecInvalid, match="Redis"):
        check_judge("workers:tiny:qwen3", get_settings())
    check_judge("gpt-4.1-mini", get_settings())  # an endpoint's model: nothing to check here
    monkeypatch.setenv("CHATSPACE_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("CHATSPACE_JUDGE_BASE_URL", "http://judge.example/v1")
    get_settings.cache_clear()
    settings = get_settings()
    with pytest.raises(SpecInvalid, match="names no model"):
        check_judge("workers:", settings)
    check_judge("workers:tiny:qwen3", settings)
    with pytest.raises(SpecInvalid, match="CHATSPACE_API_URL"):
        OpenAIBackend.for_judge(settings, "workers:tiny:qwen3")
    assert judge_base_url(settings, "gpt-4.1-mini") == "http://judge.example/v1"
    monkeypatch.setenv("CHATSPACE_API_URL", "http://api.internal:8000/")
    monkeypatch.setenv("CHATSPACE_API_TOKEN", "tok-pool-1234")
    get_settings.cache_clear()
    settings = get_settings()
    b = OpenAIBackend.for_judge(settings, "workers:tiny:qwen3")
    assert (b.model, b.base_url, b.structured_outputs) == (
        "tiny:qwen3", "http://api.internal:8000/v1", True)
    assert b._secret == "tok-pool-1234"  # the API's bearer token is the client's key
    assert not OpenAIBackend.for_judge(settings, "workers:m", structured=False).structured_outputs
    e = OpenAIBackend.for_judge(settings, "gpt-4.1-mini")
    assert (e.base_url, e.structured_outputs) == ("http://judge.example/v1", False)
    assert isinstance(settings.api_token, SecretStr)


# -- JudgeServer.serve ----------------------------------------------------------------------
class RecordingEngine:
    """Answers each prompt with the first choice (or "free"), records every call; raises
    ValueError for a prompt containing a marker token sequence (a request vLLM refuses)."""

    def __init__(self, tokenizer, *, max_model_len=1024, refuse: list[int] | None = None):
        self.tokenizer = tokenizer
        self.calls: list[tuple[list[list[int]], object]] = []
        self.refuse = refuse
        self.max_model_len = max_model_len

        class _Cfg:
            pass

        cfg = _Cfg()
        cfg.max_model_len = max_model_len
        self.llm = type("LLM", (), {"llm_engine": type("E", (), {"model_config": cfg})()})()

    def generate(self, prompts, options, specs=None):
        self.calls.append(([list(p) for p in prompts], options))
        if self.refuse is not None and any(p == self.refuse for p in prompts):
            raise ValueError("this prompt is refused")
        text = options.choices[0] if options.choices else "free"
        return [GenResult(key=None, prompt_token_ids=list(p), token_ids=[1, 2], text=text,
                          finish_reason="stop") for p in prompts]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from workers.engine.tiny import ensure_tiny_model

    path = ensure_tiny_model("tiny:qwen3", tmp_path_factory.mktemp("models"))
    return AutoTokenizer.from_pretrained(str(path))


def _req(i: int, *, scale=TRAITS, model="tiny:qwen3", content=None, max_tokens=10,
         deadline=2000.0) -> PoolRequest:
    return PoolRequest(id=f"r{i}", model=model,
                       messages=[{"role": "user", "content": content or f"judge answer {i}"}],
                       max_tokens=max_tokens, temperature=scale.temperature, top_p=1.0,
                       seed=None, choices=scale.choices, deadline=deadline)


def test_a_batch_is_grouped_by_sampling_settings_and_answered_in_order(tokenizer):
    eng = RecordingEngine(tokenizer)
    server = JudgeServer(model="tiny:qwen3", worker="w1", engine=lambda: eng)
    reqs = [_req(0), _req(1, scale=ROLES), _req(2), _req(3, scale=ROLES), _req(4)]
    replies = server.serve(reqs, now=1000.0)
    assert [r.id for r in replies] == ["r0", "r1", "r2", "r3", "r4"]
    assert [r.text for r in replies] == ["REFUSAL", "0", "REFUSAL", "0", "REFUSAL"]
    assert len(eng.calls) == 2  # one engine call per scale, not per request
    (traits_prompts, t_opts), (roles_prompts, r_opts) = eng.calls
    assert (len(traits_prompts), t_opts.choices, t_opts.temperature) == (
        3, tuple(TRAITS.choices), 0.0)
    assert (len(roles_prompts), r_opts.choices, r_opts.temperature) == (
        2, tuple(ROLES.choices), 1.0)
    expected = generation_prompt(tokenizer, reqs[0].messages,
                                 template_kwargs=default_template_kwargs(tokenizer))
    assert traits_prompts[0] == expected  # the model's own chat template, generation prompt
    assert replies[0].prompt_tokens == len(expected) and replies[0].completion_tokens == 2
    assert server.served == 5 and server.batches == 1


def test_expired_foreign_and_too_long_requests_answer_alone(tokenizer):
    eng = RecordingEngine(tokenizer, max_model_len=64)
    server = JudgeServer(model="tiny:qwen3", worker="w1", engine=lambda: eng)
    reqs = [_req(0, deadline=999.0), _req(1, model="other"), _req(2, content="x " * 200),
            _req(3)]
    replies = {r.id: r for r in server.serve(reqs, now=1000.0)}
    assert "r0" not in replies and server.expired == 1  # nobody waits for it any more
    assert replies["r1"].error_kind == "request" and "not 'other'" in replies["r1"].error
    assert replies["r2"].error_kind == "request" and "context of 64" in replies["r2"].error
    assert replies["r3"].error is None and replies["r3"].text == "REFUSAL"
    assert [len(p) for p, _ in eng.calls] == [1]
    assert server.serve([_req(9, deadline=1.0)], now=1000.0) == [] and len(eng.calls) == 1


def test_a_request_the_engine_refuses_fails_alone(tokenizer):
    bad = _req(1, content="refuse me")
    ids = generation_prompt(tokenizer, bad.messages,
                            template_kwargs=default_template_kwargs(tokenizer))
    eng = RecordingEngine(tokenizer, refuse=ids)
    server = JudgeServer(model="tiny:qwen3", worker="w1", engine=lambda: eng)
    replies = server.serve([_req(0), bad, _req(2)], now=1000.0)
    assert [r.error_kind for r in replies] == [None, "request", None]
    assert "refused" in replies[1].error and replies[0].text == replies[2].text == "REFUSAL"
    assert [len(p) for p, _ in eng.calls] == [3, 1, 1, 1]  # the batch, then one by one


def test_an_engine_death_restarts_it_and_fails_the_group(tokenizer):
    class EngineDeadError(RuntimeError):
        pass

    restarts = []

    class Dead(RecordingEngine):
        def generate(self, prompts, options, specs=None):
            raise EngineDeadError("engine core died")

    eng = Dead(tokenizer)
    server = JudgeServer(model="tiny:qwen3", worker="w1", engine=lambda: eng,
                         on_engine_dead=lambda: restarts.append(1))
    replies = server.serve([_req(0), _req(1)], now=1000.0)
    assert [r.error_kind for r in replies] == ["worker", "worker"] and restarts == [1]
    assert json.loads(replies[0].to_json())["worker"] == "w1"
    assert PoolReply.from_json(replies[0].to_json()) == replies[0]


def test_a_judge_worker_serves_only_its_judge_model():
    from workers.cli import judge_worker_command, run_worker

    for other in ({"model": "tiny:qwen3"}, {"queues": "q1"}, {"max_jobs": 2},
                  {"exit_when_idle": True}):
        with pytest.raises(ValueError, match="serves only its judge model"):
            run_worker(judge_model="tiny:qwen3", gpus="", **other)
    assert judge_worker_command()[1:] == ["-m", "workers.judgeworker"]
