"""Pipeline jobs on real Postgres and SQLite: (stage, persona) items claimed only when what
they need has succeeded, resumed without repeating a finished item, failed when what they
need failed for good, and claimed in parallel without any item taken twice."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import select

from app import jobs, stages
from app.db import session_scope
from app.errors import SpecInvalid
from app.models import JobEvent, JobItem

PERSONAS = ["default", "curious", "optimistic"]
FULL = ["generate", "capture", "judge", "minilm", "vectors", "axis"]


def _job(factory, stage_list=FULL, personas=PERSONAS, skip=None):
    with session_scope(factory) as s:
        items = stages.plan(stage_list, personas, skip=skip)
        job = stages.create_pipeline_job(s, dataset="traits_sample", model="m",
                                         dtype="float32", params={"judge": "j"}, items=items,
                                         queue="q")
        return job.id, items


def _claim(factory, job_id, worker="w1", stages=None):
    with session_scope(factory) as s:
        item = jobs.claim_item(s, job_id=job_id, worker=worker, lease_s=60, stages=stages)
        return None if item is None else (item.id, item.attempt, item.stage, item.persona)


def _done(factory, job_id, claimed, worker="w1"):
    item_id, attempt, stage, persona = claimed
    with session_scope(factory) as s:
        jobs.complete_item(s, item_id=item_id, attempt=attempt, worker=worker,
                           artifact_key=f"k/{stage}/{persona}", artifact_sha256="0" * 64)


def test_plan_skips_and_orders():
    items = stages.plan(["vectors", "judge", "generate", "capture", "axis"], PERSONAS,
                        skip={"judge": ["default"]})
    assert items[:3] == [("generate", p) for p in PERSONAS]
    assert ("judge", "default") not in items and ("judge", "curious") in items
    assert items[-1] == ("axis", "*")
    with pytest.raises(SpecInvalid, match="unknown stage"):
        stages.plan(["generate", "train"], PERSONAS)


def test_claims_follow_the_chain_and_run_to_the_end(factory):
    job_id, items = _job(factory, skip={"judge": ["default"]})
    order = []
    while (c := _claim(factory, job_id)) is not None:
        order.append((c[2], c[3]))
        _done(factory, job_id, c)
    assert sorted(order) == sorted(items)
    pos = {x: i for i, x in enumerate(order)}
    for stage, persona in order:
        for dep in stages.NEEDS[stages.Stage(stage)]:
            deps = [x for x in order if x[0] == dep.value and (persona == "*" or
                                                                 dep in stages.DATASET_STAGES
                                                                 or x[1] == persona)]
            assert all(pos[d] < pos[(stage, persona)] for d in deps), (stage, persona, dep)
    with session_scope(factory) as s:
        job = jobs.finish_job_if_done(s, job_id=job_id, manifest_key="k/manifest.json")
        assert job.state == "succeeded"
        p = jobs.progress(s, job_id=job_id)
    assert p["stages"]["judge"]["items"] == 2 and p["stages"]["judge"]["succeeded"] == 2
    assert list(p["stages"]) == FULL and p["items_done"] == len(items)
    assert {i["stage"] for i in p["items"]} == set(FULL)


def test_waiting_items_are_not_claimable(factory):
    """With generate/curious still running, nothing that needs it can be taken; judge and
    capture of a generated persona can (side by side)."""
    job_id, _ = _job(factory, personas=["curious", "optimistic"])
    g1 = _claim(factory, job_id, "w1")
    g2 = _claim(factory, job_id, "w2")
    assert {g1[2], g2[2]} == {"generate"}
    assert _claim(factory, job_id, "w3") is None  # everything else waits on generate
    _done(factory, job_id, g1, "w1")
    a = _claim(factory, job_id, "w3")
    b = _claim(factory, job_id, "w4")
    assert {(a[2], a[3]), (b[2], b[3])} == {("capture", g1[3]), ("judge", g1[3])}
    assert _claim(factory, job_id, "w5") is None  # minilm needs every generate


def test_a_claim_narrowed_to_stages_takes_only_theirs(factory):
    """The job loop's claim while a generate item streams (spanning): only the next generate
    item, never a capture or judge item that is ready; with none left, nothing."""
    job_id, _ = _job(factory, personas=["curious", "optimistic"])
    g1 = _claim(factory, job_id)
    _done(factory, job_id, g1)  # capture and judge of g1's persona are ready now
    gen = frozenset({"generate"})
    g2 = _claim(factory, job_id, stages=gen)
    assert (g2[2], g2[3]) == ("generate", "optimistic")
    assert _claim(factory, job_id, stages=gen) is None
    assert _claim(factory, job_id)[2] == "capture"  # unnarrowed: the chain's next


def test_resume_never_repeats_a_finished_item(factory):
    """A worker dies holding judge/curious: its lease expires, the item is queued again and
    the next claim takes exactly that item; succeeded items are never offered again."""
    from datetime import UTC, datetime, timedelta

    job_id, _ = _job(factory, stage_list=["generate", "judge"], personas=["a", "b"])
    for _ in range(2):
        _done(factory, job_id, _claim(factory, job_id))
    j1 = _claim(factory, job_id, "dead")
    assert j1[2] == "judge"
    with session_scope(factory) as s:
        jobs.reap_expired(s, now=datetime.now(UTC) + timedelta(seconds=120))
    j2 = _claim(factory, job_id, "alive")
    assert (j2[0], j2[1], j2[2]) == (j1[0], j1[1] + 1, "judge")
    _done(factory, job_id, j2, "alive")
    j3 = _claim(factory, job_id, "alive")
    _done(factory, job_id, j3, "alive")
    assert _claim(factory, job_id, "alive") is None
    with session_scope(factory) as s:
        claims = s.execute(select(JobEvent.item_id).where(
            JobEvent.job_id == job_id, JobEvent.message == "claimed")).scalars().all()
    assert sorted(Counter(claims).values()) == [1, 1, 1, 2]  # only the lost one twice


def test_failed_item_fails_what_needs_it(factory):
    job_id, _ = _job(factory, stage_list=["generate", "capture", "judge", "vectors"],
                     personas=["a", "b"])
    while (c := _claim(factory, job_id)) is not None:
        if c[2] == "judge" and c[3] == "a":
            with session_scope(factory) as s:
                jobs.fail_item(s, item_id=c[0], attempt=c[1], worker="w1",
                               failure_kind="error", error="judge down", requeue=False)
            continue
        _done(factory, job_id, c)
    with session_scope(factory) as s:
        job = jobs.finish_job_if_done(s, job_id=job_id)
        assert job.state == "failed"
        rows = {(i.stage, i.persona): i for i in s.execute(
            select(JobItem).where(JobItem.job_id == job_id)).scalars()}
    assert rows[("vectors", "a")].state == "failed"
    assert "judge/a failed" in rows[("vectors", "a")].error
    assert rows[("vectors", "b")].state == "succeeded"
    # a retry queues the failed judge and the vectors it blocked; nothing else runs again
    with session_scope(factory) as s:
        jobs.retry_job(s, job_id=job_id)
    again = []
    while (c := _claim(factory, job_id)) is not None:
        again.append((c[2], c[3]))
        _done(factory, job_id, c)
    assert again == [("judge", "a"), ("vectors", "a")]


def test_parallel_claims_take_each_item_once(factory):
    job_id, items = _job(factory, personas=[f"p{i}" for i in range(8)])
    got: list[tuple] = []
    lock = threading.Lock()

    def work(name):
        while True:
            c = _claim(factory, job_id, name)
            if c is None:
                with session_scope(factory) as s:
                    open_ = s.execute(select(JobItem.id).where(
                        JobItem.job_id == job_id, JobItem.state.in_(["queued", "running"]))
                    ).first()
                if open_ is None:
                    return
                continue
            with lock:
                got.append((c[2], c[3]))
            _done(factory, job_id, c, name)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(got) == sorted(items)
