"""A pipeline job survives a kill -9 of its worker in the middle of the judge stage.

Real parts: Postgres, Redis, a real Celery worker process (the transformers engine backend,
so the tiny model starts in seconds), the local artifact folder, and the judge behind a
scripted OpenAI-compatible server on 127.0.0.1 that counts what it receives. The worker is
killed (SIGKILL, its whole process group) once one persona's judge item has succeeded and
the next persona's judge requests are in flight; a new worker of the same name takes over.

What must hold: the job succeeds; every (stage, persona) item finished before the kill is
never claimed again (one ``claimed`` event each: no engine call, no judge request repeated);
the judge server received exactly one request per sample for every persona judged before
the kill, and the killed persona is judged again in full.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

from tests.integration import worker_helpers as h
from tests.scripted_openai import Action, ScriptedServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TRAIT = re.compile(r"\*\*(\w+)\*\*")  # the trait name in the shipped samples' eval_prompt
MAX_SAMPLES = 4


def _persona_of(prompt: str) -> str:
    return TRAIT.search(prompt).group(1)


@pytest.fixture
def services(pg_url, redis_url, monkeypatch, tmp_path):
    from app.settings import get_settings

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    h.fast_fault_env(monkeypatch, pg_url, redis_url, DATA_DIR=str(tmp_path / "data"),
                     ENGINE_BACKEND="hf", JUDGE_API_KEY="sk-resume-test-key")
    yield tmp_path
    get_settings.cache_clear()


def _items(job_id):
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import JobEvent, JobItem

    with session_scope() as s:
        items = {(i.stage, i.persona): (i.id, i.state, i.attempt) for i in s.execute(
            select(JobItem).where(JobItem.job_id == job_id)).scalars()}
        claims = Counter(s.execute(select(JobEvent.item_id).where(
            JobEvent.job_id == job_id, JobEvent.message == "claimed")).scalars())
    return items, claims


def test_kill_9_in_the_judge_stage_resumes_without_rejudging(services, monkeypatch):
    tmp = services

    def script(req, n):
        return Action(text=str(len(req["messages"][0]["content"]) % 101), delay=0.4)

    with ScriptedServer(script) as srv:
        monkeypatch.setenv("CHATSPACE_JUDGE_BASE_URL", srv.base_url)
        monkeypatch.setenv("CHATSPACE_JUDGE_MAX_CONCURRENCY", "1")  # a slow, steady judge
        job_id = h.submit_pipeline(max_samples=MAX_SAMPLES, judge="judge-m")
        first = h.start_worker("resume-w", tmp / "logs")
        try:
            deadline = time.monotonic() + 600
            while True:
                items, _ = _items(job_id)
                judged = [p for (st, p), (_, state, _) in items.items()
                          if st == "judge" and state == "succeeded"]
                running = [p for (st, p), (_, state, _) in items.items()
                           if st == "judge" and state == "running"]
                asked = Counter(_persona_of(x) for x in srv.prompts())
                if judged and running and asked[running[0]] >= 1:
                    break
                assert first.poll() is None, (tmp / "logs" / "resume-w.log").read_text()[-3000:]
                assert time.monotonic() < deadline, items
                time.sleep(0.05)
            h.stop(first, sig=9)  # SIGKILL to the worker's process group
            killed_in = running[0]
            before = {k: v for k, v in items.items() if v[1] == "succeeded"}
            asked_before = Counter(_persona_of(x) for x in srv.prompts())
            second = h.start_worker("resume-w", tmp / "logs")
            try:
                row = h.wait_for(job_id, timeout=600, log_dir=tmp / "logs", worker=second)
            finally:
                h.stop(second)
        finally:
            h.stop(first, sig=9)
        asked = Counter(_persona_of(x) for x in srv.prompts())
    assert row["state"] == "succeeded", row
    items, claims = _items(job_id)
    assert all(state == "succeeded" for _, state, _ in items.values())
    for key, (item_id, _, _) in before.items():
        assert claims[item_id] == 1, (key, claims[item_id])  # finished before: never re-run
    assert claims[items[("judge", killed_in)][0]] == 2  # taken over once
    for persona in judged:
        assert asked[persona] == MAX_SAMPLES, (persona, asked)  # not one request repeated
    assert asked[killed_in] == asked_before[killed_in] + MAX_SAMPLES
    assert sum(asked.values()) == len(srv.received)
