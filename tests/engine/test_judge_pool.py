"""The judge pool end to end: a real judge worker process keeping the tiny Qwen3 warm in the
vLLM steering engine, the real API over HTTP, the real ``openai`` client, Postgres and Redis.

One judge worker (``workers.judgeworker``, started as ``chatspace-jobs worker --judge-model``
starts it) and one job worker (the transformers backend, so generate and capture start in
seconds) serve the whole module. What must hold:

- every reply of the random tiny model parses and lies on the scale (traits 0-100 or
  REFUSAL, roles 0-3), asked once each, tokens counted from the worker's usage;
- a pipeline job with ``--judge workers:tiny:qwen3`` runs its judge stage through the route
  and the pool, and its scores land in the public ``3_judge.py`` shape on the responses it
  generated, then feed the vectors;
- a job whose judge model no worker serves fails with an error that says so and how to start
  one, instead of waiting queued.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from types import SimpleNamespace

import openai
import pytest

from app.judge import ROLES, TRAITS, OpenAIBackend
from app.judge.run import judge_persona
from app.queues import judge_queue
from app.responses import Response
from tests.integration import worker_helpers as h

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(1200)]

TOKEN = "tok-judge-pool-engine-91c2"
JUDGE = "workers:" + h.MODEL
EVAL = ("You judge an answer.\n[QUESTION START]\n{question}\n[QUESTION END]\n"
        "[ANSWER START]\n{answer}\n[ANSWER END]\nReply with the score only.")


def _env(data_dir, pg_url, redis_url) -> dict[str, str]:
    return {"CHATSPACE_DATA_DIR": str(data_dir), "CHATSPACE_DATABASE_URL": pg_url,
            "CHATSPACE_BROKER_URL": redis_url, "CHATSPACE_API_TOKENS": json.dumps([TOKEN]),
            "CHATSPACE_API_TOKEN": TOKEN, "CHATSPACE_HEARTBEAT_S": "1",
            "CHATSPACE_REAPER_INTERVAL_S": "2", "CHATSPACE_ENGINE_MAX_MODEL_LEN": "1024",
            "CHATSPACE_ENGINE_MAX_NUM_SEQS": "32", "CHATSPACE_JUDGE_MAX_RETRIES": "1",
            "CHATSPACE_JUDGE_TIMEOUT_S": "120", "CHATSPACE_JUDGE_POOL_WAIT_S": "100",
            "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
            "NO_PROXY": "127.0.0.1,localhost"}


def _state(pg_url: str, name: str) -> str | None:
    from app.db import default_factory, session_scope
    from app.models import Worker

    with session_scope(default_factory(pg_url)) as s:
        w = s.get(Worker, name)
        return None if w is None else w.state


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Postgres, Redis, the API, a judge worker and a job worker for the module."""
    from sqlalchemy import text

    from app.api import create_app
    from app.db import dispose_all, upgrade
    from app.settings import get_settings
    from tests import conftest
    from tests.integration.api_server import start
    from workers.cli import spawn_judge_worker
    from workers.engine.tiny import ensure_tiny_model

    tmp = tmp_path_factory.mktemp("judge-pool")
    db = f"cs_test_{uuid.uuid4().hex[:12]}"
    admin = conftest._pg_admin()
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db}"'))
    pg_url = f"{conftest.PG_ADMIN_URL.rsplit('/', 1)[0]}/{db}"
    procs: list[subprocess.Popen] = []
    server = thread = None
    with conftest.redis_db() as redis_url, pytest.MonkeyPatch.context() as mp:
        env = _env(tmp / "data", pg_url, redis_url)
        for k, v in env.items():
            mp.setenv(k, v)
        get_settings.cache_clear()
        try:
            upgrade(pg_url)
            ensure_tiny_model(h.MODEL, get_settings().models_dir)  # built once, both share it
            port = conftest.free_port()
            server, thread = start(create_app(get_settings()), port)
            api_url = f"http://127.0.0.1:{port}"
            mp.setenv("CHATSPACE_API_URL", api_url)
            env["CHATSPACE_API_URL"] = api_url
            (tmp / "logs").mkdir()
            with open(tmp / "logs" / "judge.log", "ab") as out:
                procs.append(spawn_judge_worker(name="jp-judge", model=h.MODEL, dtype=h.DTYPE,
                                                stdout=out, stderr=subprocess.STDOUT))
            mp.setenv("CHATSPACE_ENGINE_BACKEND", "hf")  # the job worker only
            procs.append(h.start_worker("jp-jobs", tmp / "logs"))
            deadline = time.monotonic() + 900
            while _state(pg_url, "jp-judge") != "idle":  # loaded and serving
                for p in procs:
                    assert p.poll() is None, _logs(tmp)
                assert time.monotonic() < deadline, _logs(tmp)
                time.sleep(1)
            yield SimpleNamespace(env=env, url=api_url, pg_url=pg_url, logs=tmp / "logs",
                                  judge_proc=procs[0], job_proc=procs[1])
        finally:
            for p in procs:
                h.stop(p)
            if server is not None:
                server.should_exit = True
                thread.join(10)
            dispose_all()
            get_settings.cache_clear()
            with admin.connect() as c:
                c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = :n"), {"n": db})
                c.execute(text(f'DROP DATABASE IF EXISTS "{db}"'))
            admin.dispose()


def _logs(tmp) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}"
                     for p in sorted((tmp / "logs").glob("*.log")))


@pytest.fixture
def settings(pool, monkeypatch):
    """This test process configured like the workers (after the per-test isolation)."""
    from app.settings import get_settings

    for k, v in pool.env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def _responses(n: int) -> list[Response]:
    return [Response(key=f"pos_p0_q{i}", label="pos", prompt_index=0, question_index=i,
                     system_prompt="", question=f"What do you think about topic {i}?",
                     answer=f"I think topic {i} is interesting because of many things.")
            for i in range(n)]


@pytest.mark.parametrize("scale", [TRAITS, ROLES], ids=["traits", "roles"])
def test_every_reply_of_a_random_model_parses_on_the_scale(pool, settings, scale):
    j = judge_persona(lambda: OpenAIBackend.for_judge(settings, JUDGE), persona="p",
                      eval_prompt=EVAL, scale=scale, responses=_responses(12))
    assert all(s.attempts == 1 and s.retried == [] for s in j.samples), j.detail()
    assert all(s.reply in scale.choices for s in j.samples)
    assert len(j.scores()) == 12 and j.counts()["scored"] + j.counts()["refusal"] == 12
    assert j.requests == 12 and j.usage_missing == 0
    t = j.tokens()
    assert t["prompt"] > 12 * 30 and 12 <= t["completion"] <= 12 * 10
    assert j.meta["base_url"] == pool.url + "/v1" and j.meta["structured_outputs"] is True


def test_models_and_a_plain_request_through_the_official_client(pool, settings):
    client = openai.OpenAI(base_url=pool.url + "/v1", api_key=TOKEN, max_retries=0)
    listed = client.models.list()
    assert [m.id for m in listed.data] == [h.MODEL]
    assert listed.data[0].model_extra["workers"][0]["name"] == "jp-judge"
    r = client.chat.completions.create(
        model=h.MODEL, messages=[{"role": "system", "content": "You are a judge."},
                                 {"role": "user", "content": "How many legs has a cat?"}],
        max_completion_tokens=5, temperature=0.0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="context of 1024"):
        client.chat.completions.create(
            model=h.MODEL, messages=[{"role": "user", "content": "word " * 1200}],
            max_completion_tokens=5)


def test_a_pipeline_job_is_judged_by_the_pool(pool, settings):
    from app.artifacts import job_prefix
    from app.responses import parse_responses
    from app.storage import get_store

    job_id = h.submit_pipeline(judge=JUDGE, personas=["curious", "optimistic"], max_samples=4)
    row = h.wait_for(job_id, timeout=600, log_dir=pool.logs, worker=pool.job_proc)
    assert row["state"] == "succeeded", row
    store = get_store(settings)
    prefix = job_prefix(settings, model=h.MODEL, dataset=h.DATASET, dtype=h.DTYPE,
                        job_id=job_id)
    for persona in ("curious", "optimistic"):
        responses = parse_responses(store.get_bytes(f"{prefix}/responses/{persona}.jsonl")
                                    .decode().splitlines(), source=persona)
        scores = json.loads(store.get_bytes(f"{prefix}/scores/{persona}.json"))
        assert set(scores) == {r.key for r in responses}  # every generated sample judged
        assert all(v == "REFUSAL" or (isinstance(v, int) and 0 <= v <= 100)
                   for v in scores.values())
        detail = json.loads(store.get_bytes(f"{prefix}/scores/{persona}.judge.json"))
        assert detail["base_url"] == pool.url + "/v1" and detail["judge_model"] == h.MODEL
        assert detail["structured_outputs"] is True and detail["requests"] == len(responses)
        assert detail["counts"]["unparseable"] == 0 and detail["tokens"]["completion"] > 0
        meta = _st_metadata(store.get_bytes(f"{prefix}/vectors/{persona}.safetensors"))
        # the vectors were derived with these scores, every generated key among them
        assert meta["params"]["scored"] is True and meta["stage"] == "vectors"
        assert meta["scores"]["present"] is True and meta["scores"]["missing_keys"] == 0
    summary = json.loads(store.get_bytes(f"{prefix}/scores/judge_summary.json"))
    assert summary["total"]["counts"]["unparseable"] == 0 and summary["judge_model"] == h.MODEL
    judged = [e for e in row["events"] if e["kind"] == "judged"]
    assert len(judged) == 2


def _st_metadata(data: bytes) -> dict:
    """The ``chatspace`` metadata of a safetensors file (its JSON header's __metadata__)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8:8 + n])["__metadata__"]["chatspace"])


def test_no_worker_for_the_judge_model_fails_the_job_clearly(pool, settings):
    import redis

    t0 = time.monotonic()
    job_id = h.submit_pipeline(judge="workers:tiny:nobody", personas=["curious"], max_samples=2)
    row = h.wait_for(job_id, timeout=300, log_dir=pool.logs, worker=pool.job_proc)
    assert row["state"] == "failed", row
    texts = [row["error"] or ""] + [i["error"] or "" for i in row["items"]]
    said = [t for t in texts if "no judge worker serves model 'tiny:nobody'" in t]
    assert said, row
    assert all("chatspace-jobs worker --judge-model tiny:nobody" in t for t in said)
    assert time.monotonic() - t0 < 240  # failed at its judge stage, not left waiting
    assert redis.Redis.from_url(settings.broker_url).llen(judge_queue("tiny:nobody")) == 0
