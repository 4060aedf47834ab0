"""Migrations produce exactly the models' schema, on Postgres and on SQLite, and round-trip.

Alembic's autogenerate comparison sees tables, columns, types, nullability, indexes, unique
and foreign keys; CHECK constraints it does not compare, so those are probed by inserting a
row that breaks each one.
"""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from app.db import current_revision, downgrade, make_engine, upgrade
from app.models import Base

TABLES = {"jobs", "job_items", "job_events", "artifacts", "workers"}


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request, tmp_path):
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'nested' / 'migrate.db'}"  # data dir created on demand


def _diffs(url):
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def _tables(url) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_matches_models_and_round_trips(db_url):
    assert _tables(db_url) == set()
    upgrade(db_url)
    assert _tables(db_url) == TABLES
    assert _diffs(db_url) == []
    assert current_revision(db_url) is not None

    downgrade(db_url, "base")
    assert _tables(db_url) == set()
    assert current_revision(db_url) is None

    upgrade(db_url)
    assert _tables(db_url) == TABLES
    assert _diffs(db_url) == []


BAD_ROWS = {
    "ck_jobs_state": "INSERT INTO jobs VALUES ('j2', 'capture', 'd', 'm', 'f', '{}', 'q', "
                     "'done', NULL, NULL, false, 0, 0, 0, 0, NULL, NULL, :t, NULL, NULL, :t)",
    "ck_jobs_kind": "INSERT INTO jobs VALUES ('j3', 'train', 'd', 'm', 'f', '{}', 'q', "
                    "'queued', NULL, NULL, false, 0, 0, 0, 0, NULL, NULL, :t, NULL, NULL, :t)",
    "ck_jobs_failure_kind": "UPDATE jobs SET failure_kind = 'gremlins' WHERE id = 'j1'",
    "ck_jobs_counters": "UPDATE jobs SET items_done = -1 WHERE id = 'j1'",
    "ck_job_items_state": "UPDATE job_items SET state = 'paused'",
    "ck_job_items_running_lease": "UPDATE job_items SET state = 'running'",
    "ck_job_items_stage": "UPDATE job_items SET stage = 'dream'",
    "uq_job_items_job_id_stage_persona": "INSERT INTO job_items (job_id, stage, persona, "
                                         "position, state, attempt, samples_done) VALUES "
                                         "('j1', 'capture', 'a', 1, 'queued', 0, 0)",
    "fk_job_items_job_id_jobs": "INSERT INTO job_items (job_id, stage, persona, position, state, "
                                "attempt, samples_done) VALUES ('zz', 'capture', 'b', 0, "
                                "'queued', 0, 0)",
    "ck_workers_state": "INSERT INTO workers (name, queues, state, model_info, heartbeat_at, "
                        "started_at) VALUES ('w', '[]', 'napping', '{}', :t, :t)",
}


@pytest.mark.parametrize("constraint", sorted(BAD_ROWS))
def test_migrated_schema_enforces_constraints(db_url, constraint):
    from datetime import UTC, datetime

    upgrade(db_url)
    engine = make_engine(db_url)
    t = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            conn.execute(text(BAD_ROWS["ck_jobs_state"].replace("'j2'", "'j1'")
                              .replace("'done'", "'queued'")), {"t": t})
            conn.execute(text("INSERT INTO job_items (job_id, stage, persona, position, state, "
                              "attempt, samples_done) VALUES ('j1', 'capture', 'a', 0, 'queued', "
                              "0, 0)"))
        with pytest.raises(IntegrityError) as exc, engine.begin() as conn:
            conn.execute(text(BAD_ROWS[constraint]), {"t": t})
        # the right constraint refused it (SQLite names only CHECK constraints)
        if engine.dialect.name == "postgresql" or constraint.startswith("ck_"):
            assert constraint in str(exc.value)
    finally:
        engine.dispose()


def test_stages_upgrade_keeps_existing_items(db_url):
    """0001 -> 0002_stages: items stored before stages existed get their job's kind as
    stage; the same persona may then appear once per stage of a pipeline job."""
    from datetime import UTC, datetime

    upgrade(db_url, "0001")
    engine = make_engine(db_url)
    t = datetime.now(UTC)
    row = ("INSERT INTO jobs VALUES ('{id}', '{kind}', 'd', 'm', 'f', '{{}}', 'q', 'queued', "
           "NULL, NULL, false, 0, 0, 0, 0, NULL, NULL, :t, NULL, NULL, :t)")
    try:
        with engine.begin() as conn:
            for job_id, kind in (("c1", "capture"), ("r1", "rollout")):
                conn.execute(text(row.format(id=job_id, kind=kind)), {"t": t})
                conn.execute(text("INSERT INTO job_items (job_id, persona, position, state, "
                                  f"attempt, samples_done) VALUES ('{job_id}', 'a', 0, "
                                  "'succeeded', 1, 3)"))
            conn.execute(text("INSERT INTO job_events (job_id, item_id, at, kind, data) "
                              "SELECT job_id, id, :t, 'state', '{}' FROM job_items"), {"t": t})
        upgrade(db_url)
        with engine.begin() as conn:
            got = conn.execute(text("SELECT job_id, stage, state, samples_done FROM job_items "
                                    "ORDER BY job_id")).all()
            assert [tuple(r) for r in got] == [("c1", "capture", "succeeded", 3),
                                               ("r1", "rollout", "succeeded", 3)]
            # SQLite rebuilds job_items; its events keep their item (no ON DELETE SET NULL)
            assert conn.execute(text("SELECT count(*) FROM job_events WHERE item_id IS NOT "
                                     "NULL")).scalar() == 2
            conn.execute(text(row.format(id="p1", kind="pipeline")), {"t": t})
            for stage in ("generate", "judge"):
                conn.execute(text("INSERT INTO job_items (job_id, stage, persona, position, "
                                  f"state, attempt, samples_done) VALUES ('p1', '{stage}', "
                                  "'a', 0, 'queued', 0, 0)"))
        downgrade(db_url, "0001")
        with engine.begin() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 2
    finally:
        engine.dispose()


def test_upgrade_at_head_is_a_no_op(db_url):
    """The CLI migrates on every in-process start: a second upgrade at head must pass (on
    SQLite it runs with foreign keys off and turns them back on outside a transaction)."""
    upgrade(db_url)
    upgrade(db_url)
    assert _diffs(db_url) == []
    engine = make_engine(db_url)
    try:
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()
