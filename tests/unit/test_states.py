"""The state machine, table-driven over every (from, to) pair for jobs and items (SQLite).

Allowed moves must work and write exactly one event; every other move must raise
InvalidTransition and leave the row and the event log untouched.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from app import jobs
from app.db import make_engine, session_factory, session_scope, upgrade
from app.errors import InvalidTransition
from app.models import Job, JobEvent, JobItem
from app.states import ITEM_TRANSITIONS, JOB_TRANSITIONS, ItemState, JobState

EXPECTED = {  # the design's table, written out independently of app.states
    "queued": {"running", "cancelled", "failed"},
    "running": {"succeeded", "failed", "cancelled", "queued"},
    "failed": {"queued"},
    "cancelled": {"queued"},
    "succeeded": set(),
}
STATES = sorted(EXPECTED)
PAIRS = list(itertools.product(STATES, STATES))


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('states') / 'states.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def test_tables_match_the_design():
    assert {s.value: {t.value for t in ts} for s, ts in JOB_TRANSITIONS.items()} == EXPECTED
    assert {s.value: {t.value for t in ts} for s, ts in ITEM_TRANSITIONS.items()} == EXPECTED


def _new_job(factory) -> tuple[str, int]:
    with session_scope(factory) as s:
        job = jobs.create_job(s, kind="capture", dataset="d", model="m", dtype="float32",
                              params={}, personas=["a"], queue="q")
        item = s.execute(select(JobItem).where(JobItem.job_id == job.id)).scalar_one()
        return job.id, item.id


def _force(factory, model, row_id, state: str) -> None:
    vals = {"state": state}
    if model is JobItem:
        running = state == "running"
        vals.update(lease_owner="w0" if running else None, attempt=1,
                    lease_expires_at=datetime.now(UTC) + timedelta(hours=1) if running else None)
    with session_scope(factory) as s:
        s.execute(update(model).where(model.id == row_id).values(**vals))
        if model is JobItem:  # keep the job's counters consistent with the forced item
            job_id = s.get(JobItem, row_id).job_id
            s.execute(update(Job).where(Job.id == job_id).values(
                items_done=int(state == "succeeded"), items_failed=int(state == "failed")))


def _snapshot(factory, model, row_id, job_id) -> tuple[dict, int]:
    with session_scope(factory) as s:
        row = s.get(model, row_id)
        cols = {c.key: getattr(row, c.key) for c in model.__table__.columns}
        n = s.execute(select(func.count()).select_from(JobEvent)
                      .where(JobEvent.job_id == job_id)).scalar()
        return cols, n


@pytest.mark.parametrize(("frm", "to"), PAIRS)
def test_job_transition(factory, frm, to):
    job_id, _ = _new_job(factory)
    _force(factory, Job, job_id, frm)
    before, events = _snapshot(factory, Job, job_id, job_id)
    if to in EXPECTED[frm]:
        with session_scope(factory) as s:
            job = jobs.transition_job(s, job_id=job_id, to=to, worker="w1")
            assert job.state == to
        after, events_after = _snapshot(factory, Job, job_id, job_id)
        assert after["state"] == to
        assert events_after == events + 1
        with session_scope(factory) as s:
            last = jobs.list_events(s, job_id=job_id)[-1]
            assert (last.kind, last.from_state, last.to_state) == ("state", frm, to)
            assert last.item_id is None
        assert (after["finished_at"] is not None) == (to in {"succeeded", "failed", "cancelled"})
        if to == "failed":
            assert after["failure_kind"] == "error"
    else:
        with pytest.raises(InvalidTransition) as exc, session_scope(factory) as s:
            jobs.transition_job(s, job_id=job_id, to=to)
        assert frm in str(exc.value) and to in str(exc.value)
        assert _snapshot(factory, Job, job_id, job_id) == (before, events)


@pytest.mark.parametrize(("frm", "to"), PAIRS)
def test_item_transition(factory, frm, to):
    job_id, item_id = _new_job(factory)
    _force(factory, JobItem, item_id, frm)
    before, events = _snapshot(factory, JobItem, item_id, job_id)
    job_before, _ = _snapshot(factory, Job, job_id, job_id)
    if to in EXPECTED[frm]:
        with session_scope(factory) as s:
            item = jobs.transition_item(s, item_id=item_id, to=to, worker="w1", lease_s=30)
            assert item.state == to
        after, events_after = _snapshot(factory, JobItem, item_id, job_id)
        assert after["state"] == to
        assert events_after == events + 1
        with session_scope(factory) as s:
            last = jobs.list_events(s, job_id=job_id)[-1]
            assert (last.kind, last.from_state, last.to_state, last.item_id) == (
                "state", frm, to, item_id)
        if to == "running":
            assert after["lease_owner"] == "w1" and after["attempt"] == before["attempt"] + 1
            assert after["lease_expires_at"] is not None
        else:
            assert after["lease_owner"] is None and after["lease_expires_at"] is None
        job_after, _ = _snapshot(factory, Job, job_id, job_id)
        d_done = (to == "succeeded") - (frm == "succeeded")
        d_failed = (to == "failed") - (frm == "failed")
        assert job_after["items_done"] - job_before["items_done"] == d_done
        assert job_after["items_failed"] - job_before["items_failed"] == d_failed
    else:
        with pytest.raises(InvalidTransition), session_scope(factory) as s:
            jobs.transition_item(s, item_id=item_id, to=to, worker="w1")
        assert _snapshot(factory, JobItem, item_id, job_id) == (before, events)


def test_allowed_from_narrows_the_table(factory):
    job_id, _ = _new_job(factory)
    with pytest.raises(InvalidTransition), session_scope(factory) as s:
        jobs.transition_job(s, job_id=job_id, to=JobState.CANCELLED,
                            allowed_from=[JobState.RUNNING])
    with session_scope(factory) as s:
        assert jobs.get_job(s, job_id=job_id).state == "queued"


def test_unknown_ids(factory):
    from app.errors import JobNotFound, NotFound

    with pytest.raises(JobNotFound), session_scope(factory) as s:
        jobs.transition_job(s, job_id="nope", to=JobState.RUNNING)
    with pytest.raises(NotFound), session_scope(factory) as s:
        jobs.transition_item(s, item_id=10**9, to=ItemState.RUNNING, worker="w")
