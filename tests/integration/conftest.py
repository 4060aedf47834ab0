"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from app.db import make_engine, session_factory, upgrade


@pytest.fixture(params=["postgres", "sqlite"])
def factory(request, tmp_path):
    """A session factory on a freshly migrated database: real Postgres, then SQLite."""
    url = (request.getfixturevalue("pg_url") if request.param == "postgres"
           else f"sqlite:///{tmp_path / 'jobs.db'}")
    upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


from tests.integration.finished_job import finished_job  # noqa: F401  (session-scoped)
