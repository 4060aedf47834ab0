"""The judge's OpenAI-compatible backend against a real HTTP server on 127.0.0.1.

The server (:mod:`tests.scripted_openai`) is scripted per prompt so each error path happens
on purpose: 429 with Retry-After, 500, a client timeout, a body that is not JSON, replies off
the scale, a judge refusing, a 400 for one request, a 401. The real ``openai`` client does
the retrying; the tests count what the server received.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from app.judge import ROLES, TRAITS, JudgeRejected, JudgeUnavailable, OpenAIBackend, summarize
from app.judge.run import judge_persona
from app.responses import Response
from tests.scripted_openai import Action, ScriptedServer, answer_of

EVAL = ("Judge the answer.\n[QUESTION START]\n{question}\n[QUESTION END]\n"
        "[ANSWER START]\n{answer}\n[ANSWER END]\nReply with a number.")
SECRET = "sk-test-Zq81SECRETkey"


def _responses(n: int, label: str = "pos") -> list[Response]:
    return [Response(key=f"{label}_p{i % 3}_q{i}", label=label, prompt_index=i % 3,
                     question_index=i, system_prompt="", question=f"question {i}?",
                     answer=f"answer number {i} " + "x" * i) for i in range(n)]


def _expected(answer: str) -> int:
    return (len(answer) * 7) % 101


def _judge(server, responses, *, scale=TRAITS, reply_retries=2, **backend_kw):
    kw = {"model": "judge-m", "base_url": server.base_url, "api_key": SECRET,
          "max_retries": 2, "timeout_s": 10.0, **backend_kw}
    return judge_persona(lambda: OpenAIBackend(**kw), persona="curious", eval_prompt=EVAL,
                         scale=scale, responses=responses, reply_retries=reply_retries)


def test_scores_land_on_their_own_keys_under_concurrency():
    """40 requests, 8 in flight: every key gets the score computed from its own answer;
    tokens are summed; the public 3_judge.py shape holds only scores."""
    rs = _responses(40)
    with ScriptedServer(lambda req, n: Action(
            text=str(_expected(answer_of(req["messages"][0]["content"]))),
            delay=0.02)) as srv:
        j = _judge(srv, rs, max_concurrency=8)
    assert j.scores() == {r.key: _expected(r.answer) for r in rs}
    assert j.requests == 40 == len(srv.received)
    assert j.tokens() == {"prompt": 40 * 11, "completion": 40 * 2, "total": 40 * 13}
    assert j.counts()["scored"] == 40
    sent = sorted(json.dumps(r.body["messages"]) for r in srv.received)
    assert sent == sorted(json.dumps([{"role": "user", "content": EVAL.format(
        question=r.question, answer=r.answer)}]) for r in rs)  # 3_judge.py line 100
    body = srv.received[0].body
    assert body["max_completion_tokens"] == 10 and body["temperature"] == 0.0
    assert "structured_outputs" not in body  # off unless the server is known to take it


def test_429_retry_after_is_honoured():
    rs = _responses(3)
    with ScriptedServer(lambda req, n: Action(status=429, headers={"Retry-After": "1"})
                        if n == 0 else Action(text="50")) as srv:
        j = _judge(srv, rs)
    assert j.counts()["scored"] == 3 and j.requests == 6 == len(srv.received)
    by_prompt: dict[str, list[float]] = {}
    for r in srv.received:
        by_prompt.setdefault(r.body["messages"][0]["content"], []).append(r.at)
    for first, second in by_prompt.values():
        assert second - first >= 0.9  # waited for Retry-After: 1 before asking again


def test_500_retried_by_the_client_then_unavailable_when_it_persists():
    rs = _responses(2)
    with ScriptedServer(lambda req, n: Action(status=500) if n < 2 else Action(text="9")) as srv:
        j = _judge(srv, rs, max_retries=2)
    assert j.scores() == {r.key: 9 for r in rs} and len(srv.received) == 6
    with ScriptedServer(lambda req, n: Action(status=503)) as srv, \
            pytest.raises(JudgeUnavailable, match="503"):
        _judge(srv, rs[:1], max_retries=2)
    assert len(srv.received) == 3  # one ask, two client retries, then the stage gives up


def test_timeout_retried():
    rs = _responses(2)
    with ScriptedServer(lambda req, n: Action(text="12", delay=3.0 if n == 0 else 0)) as srv:
        j = _judge(srv, rs, timeout_s=0.5, max_retries=1)
    assert j.scores() == {r.key: 12 for r in rs}
    assert len(srv.received) == 4 and j.requests == 4


def test_malformed_json_recorded_and_retried_within_bound():
    rs = _responses(2)
    with ScriptedServer(lambda req, n: Action(body=b'{"choices": [')
                        if (n == 0 or "number 1" in req["messages"][0]["content"])
                        else Action(text="33")) as srv:
        j = _judge(srv, rs, reply_retries=2)
    by_key = {s.key: s for s in j.samples}
    ok, bad = by_key[rs[0].key], by_key[rs[1].key]
    assert ok.outcome == "scored" and ok.attempts == 2 and ok.retried == ["malformed"]
    assert bad.outcome == "malformed" and bad.attempts == 3 and bad.score is None
    assert bad.error and bad.key not in j.scores()
    assert j.counts()["malformed"] == 1 and len(srv.received) == 5


def test_out_of_scale_and_unparseable_replies_counted_never_dropped():
    rs = _responses(4)

    def script(req, n):
        a = answer_of(req["messages"][0]["content"])
        if a.startswith("answer number 0"):
            return Action(text="150")  # off the 0-100 scale, every time
        if a.startswith("answer number 1"):
            return Action(text="I cannot tell." if n == 0 else "64")
        if a.startswith("answer number 2"):
            return Action(text="REFUSAL")
        if n == 0:
            return Action(text=None, refusal="I won't judge this.")
        return Action(text="5")

    with ScriptedServer(script) as srv:
        j = _judge(srv, rs, reply_retries=2)
    by_key = {s.key: s for s in j.samples}
    s0, s1, s2, s3 = (by_key[r.key] for r in rs)
    assert (s0.outcome, s0.attempts, s0.reply, s0.retried) == ("unparseable", 3, "150",
                                                                ["unparseable"] * 2)
    assert (s1.outcome, s1.score, s1.retried) == ("scored", 64, ["unparseable"])
    assert (s2.outcome, s2.score, s2.attempts) == ("refusal", "REFUSAL", 1)
    assert (s3.outcome, s3.score, s3.retried) == ("scored", 5, ["judge_refused"])
    assert j.scores() == {s1.key: 64, s2.key: "REFUSAL", s3.key: 5}
    assert j.counts() == {"scored": 2, "refusal": 1, "unparseable": 1, "judge_refused": 0,
                          "malformed": 0, "rejected": 0}
    assert j.summary()["retried"] == {"judge_refused": 1, "malformed": 0, "unparseable": 3}
    assert len(srv.received) == 3 + 2 + 1 + 2 == j.requests


def test_roles_scale_reads_0_to_3_only():
    rs = _responses(3)
    replies = iter(["3", "7", "REFUSAL"])
    fixed = {}

    def script(req, n):
        p = req["messages"][0]["content"]
        fixed.setdefault(p, next(replies))
        return Action(text=fixed[p])

    with ScriptedServer(script) as srv:
        j = _judge(srv, rs, scale=ROLES, reply_retries=0)
    assert sorted(j.scores().values()) == [3]
    assert j.counts()["unparseable"] == 2
    assert srv.received[0].body["temperature"] == 1.0  # assistant_axis/judge.py line 111


def test_one_rejected_request_is_recorded_all_rejected_fails():
    rs = _responses(3)
    with ScriptedServer(lambda req, n: Action(status=400) if "number 0" in
                        req["messages"][0]["content"] else Action(text="1")) as srv:
        j = _judge(srv, rs)
    rejected = [s for s in j.samples if s.outcome == "rejected"]
    assert len(rejected) == 1 and rejected[0].attempts == 1 and "400" in rejected[0].error
    assert len(j.scores()) == 2
    with ScriptedServer(lambda req, n: Action(status=400)) as srv, \
            pytest.raises(JudgeRejected, match="every request"):
        _judge(srv, rs)


def test_missing_usage_is_counted():
    with ScriptedServer(lambda req, n: Action(text="8", usage=False)) as srv:
        j = _judge(srv, _responses(2))
    assert j.usage_missing == 2 and j.tokens()["total"] == 0


def test_key_sent_but_never_logged_recorded_or_shown(caplog):
    """The key reaches the server's Authorization header and nowhere else: not in any log
    record at DEBUG (ours, openai's, httpx's), not in artifacts, not in error messages --
    even when the server echoes it back in its error body."""
    caplog.set_level(logging.DEBUG)

    def script(req, n):
        return Action(text="40")

    with ScriptedServer(script) as srv:
        j = _judge(srv, _responses(3))
    auth = {k.lower(): v for k, v in srv.received[0].headers.items()}["authorization"]
    assert auth == f"Bearer {SECRET}"
    artifacts = json.dumps(j.detail()) + json.dumps(summarize([j])) + repr(j)

    echo = {}

    def echoing(req, n):
        return Action(status=401, body=json.dumps({"error": {
            "message": f"bad key {echo['key']}"}}).encode())

    with ScriptedServer(echoing) as srv:
        echo["key"] = SECRET
        with pytest.raises(JudgeRejected) as e:
            _judge(srv, _responses(1))
    assert "401" in str(e.value) and "***" in str(e.value)
    shown = str(e.value) + json.dumps(e.value.to_dict())
    logs = "\n".join(r.getMessage() + str(r.args) for r in caplog.records)
    assert caplog.records  # the clients did log at DEBUG
    for text in (artifacts, shown, logs):
        assert SECRET not in text
    backend = OpenAIBackend(model="m", base_url="http://u:pw@127.0.0.1:1/v1?token=x",
                            api_key=SECRET)
    assert backend.base_url == "http://127.0.0.1:1/v1" and SECRET not in repr(backend)
    asyncio.run(backend.aclose())


def test_summary_adds_personas_up():
    with ScriptedServer(lambda req, n: Action(text="70")) as srv:
        a = _judge(srv, _responses(3))
        b = _judge(srv, _responses(2, "neg"))
    b.persona = "other"
    s = summarize([a, b.detail()])
    assert set(s["personas"]) == {"curious", "other"}
    assert s["total"]["n_samples"] == 5 and s["total"]["requests"] == 5
    assert s["total"]["counts"]["scored"] == 5 and s["total"]["tokens"]["total"] == 65
    assert s["judge_model"] == "judge-m" and s["base_url"].startswith("http://127.0.0.1:")


def test_concurrency_is_bounded():
    """max_concurrency=3: the server never sees more than 3 requests at once."""
    import threading

    live, peak, lock = [0], [0], threading.Lock()

    def script(req, n):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        import time

        time.sleep(0.05)
        with lock:
            live[0] -= 1
        return Action(text="1")

    with ScriptedServer(script) as srv:
        j = _judge(srv, _responses(12), max_concurrency=3)
    assert j.counts()["scored"] == 12 and 1 <= peak[0] <= 3


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
