"""A pipeline job survives a kill -9 of its worker in the middle of each stage: generate,
capture, vectors and axis (the judge stage: ``test_pipeline_resume.py``).

Real parts: Postgres, Redis, real Celery worker processes (the transformers engine backend,
so the tiny model starts in seconds), the local artifact folder, and the judge behind a
scripted OpenAI-compatible server on 127.0.0.1 that counts the requests it receives. The
worker writes every item start and every engine call (generate / capture, with its number
of requests) to a probe file (``workers/testprobe.py``, test-only), and items of the stage
under test sleep after each line: the test kills the worker (SIGKILL, its whole process
group) once one item of that stage has succeeded and another has started (an engine stage:
made an engine call), and a new worker of the same name takes over.

What must hold: the job succeeds; every item finished before the kill is never claimed
again (one ``claimed`` event each), and no engine call is made for it after the kill (the
probe lines of the second worker name only items that were not finished); every engine
item's calls come from the one worker that completed it (the killed item: both), and add
up to one request per response stored; the judge server received exactly one request per
response of each persona (nothing re-judged).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict

import pytest

from tests.integration import worker_helpers as h
from tests.integration.test_pipeline_resume import (
    _items,
    services,  # noqa: F401  (fixture)
)
from tests.scripted_openai import Action, ScriptedServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DATASET = "roles_sample"  # roles: the chain ends with the axis
ENGINE_CALLS = ("generate", "capture")
SLOW_S = 2.0


def _probe(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _persona_of(prompt: str, prefixes: dict[str, str]) -> str:
    (persona,) = [p for p, pre in prefixes.items() if prompt.startswith(pre)]
    return persona


def _eval_prefixes() -> dict[str, str]:
    """persona -> the text its judge prompt starts with (before the question)."""
    from app.datasets import load_dataset
    from app.settings import get_settings

    ds = load_dataset(DATASET, settings=get_settings())
    out = {}
    for name in ds.personas:
        prompt = ds.persona(name).eval_prompt
        if prompt:
            out[name] = prompt[:prompt.index("{question}")]
    return out


def _responses(prefix: str, persona: str) -> int:
    from app.settings import get_settings
    from app.storage import get_store

    data = get_store(get_settings()).get_bytes(f"{prefix}/responses/{persona}.jsonl")
    return len([x for x in data.decode().splitlines() if x.strip()])


def _in_flight(stage: str, items: dict, lines: list[dict]) -> str | None:
    """The persona of a running item of ``stage`` that the probe shows at work (an engine
    stage: after at least one engine call), once an item of the stage has succeeded (the
    axis, one item for the dataset: once it started)."""
    states = {p: st for (s, p), (_, st, _) in items.items() if s == stage}
    if stage != "axis" and "succeeded" not in states.values():
        return None
    wanted = ENGINE_CALLS if stage in ENGINE_CALLS else ("start",)
    busy = {x["persona"] for x in lines if x["stage"] == stage and x["what"] in wanted}
    return next((p for p, st in states.items() if st == "running" and p in busy), None)


@pytest.mark.parametrize("stage", ["generate", "capture", "vectors", "axis"])
def test_kill_9_in_a_stage_resumes_without_repeating_finished_work(
        stage, services, monkeypatch):  # noqa: F811
    tmp = services
    probe = tmp / "probe.jsonl"
    monkeypatch.setattr(h, "DATASET", DATASET)
    monkeypatch.setenv("CHATSPACE_TEST_PROBE", str(probe))
    monkeypatch.setenv("CHATSPACE_TEST_PROBE_SLOW", f"{stage}:{SLOW_S}")
    prefixes = _eval_prefixes()
    with ScriptedServer(lambda req, n: Action(text="3")) as srv:
        monkeypatch.setenv("CHATSPACE_JUDGE_BASE_URL", srv.base_url)
        job_id = h.submit_pipeline(max_samples=3, judge="judge-m", min_count=1)
        first = h.start_worker("stage-w", tmp / "logs")
        try:
            deadline = time.monotonic() + 300
            while True:
                items, _ = _items(job_id)
                lines = _probe(probe)
                killed_in = _in_flight(stage, items, lines)
                if killed_in is not None:
                    break
                assert first.poll() is None, (tmp / "logs" / "stage-w.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (items, lines[-5:])
                time.sleep(0.05)
            h.stop(first, sig=9)  # SIGKILL to the worker's process group
            before = {k: v for k, v in items.items() if v[1] == "succeeded"}
            lines_before = _probe(probe)
            asked_before = len(srv.received)
            second = h.start_worker("stage-w", tmp / "logs")
            try:
                row = h.wait_for(job_id, timeout=300, log_dir=tmp / "logs", worker=second)
            finally:
                h.stop(second)
        finally:
            h.stop(first, sig=9)
        asked = Counter(_persona_of(x, prefixes) for x in srv.prompts())
    assert row["state"] == "succeeded", row
    assert before and (stage, killed_in) not in before
    items, claims = _items(job_id)
    assert all(state == "succeeded" for _, state, _ in items.values())
    for key, (item_id, _, _) in before.items():
        assert claims[item_id] == 1, (key, claims[item_id])  # finished before: never re-run
    assert claims[items[(stage, killed_in)][0]] == 2  # taken over once

    # engine calls: none after the kill for an item finished before it
    lines = _probe(probe)
    (pid1,) = {x["pid"] for x in lines_before}
    after = lines[len(lines_before):]
    assert after and all(x["pid"] != pid1 for x in after)
    rerun = {(x["stage"], x["persona"]) for x in after}
    assert not rerun & set(before), rerun & set(before)
    assert (stage, killed_in) in rerun
    calls = defaultdict(lambda: defaultdict(int))  # item -> pid -> engine requests
    for x in lines:
        if x["what"] in ENGINE_CALLS:
            calls[(x["stage"], x["persona"])][x["pid"]] += x["requests"]
    prefix = row["manifest_key"].rsplit("/", 1)[0]
    engine_items = [k for k in items if k[0] in ENGINE_CALLS]
    assert sorted(calls) == sorted(engine_items)
    for key in engine_items:
        pids = calls[key]
        if key in before:
            assert set(pids) == {pid1}, (key, pids)
        elif key == (stage, killed_in):
            assert len(pids) == 2 and pid1 in pids, (key, pids)  # cut short, then run in full
        else:
            assert pid1 not in pids, (key, pids)
        done_by = [p for p in pids if p != pid1] or [pid1]
        assert pids[done_by[0]] == _responses(prefix, key[1]), (key, pids)

    # judge requests: one per response of every persona, none repeated
    judged = sorted(p for s, p in items if s == "judge")
    assert sorted(asked) == judged
    for persona in judged:
        assert asked[persona] == _responses(prefix, persona), (persona, asked)
    assert asked_before <= len(srv.received) == sum(asked.values())
    if stage == "axis":
        from app.settings import get_settings
        from app.storage import get_store

        report = json.loads(get_store(get_settings()).get_bytes(f"{prefix}/axis.json"))
        assert len(report["roles"]) == 3, report
