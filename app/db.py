"""Engines, sessions and migrations.

Nothing is created at import time: a Celery worker forks, and a connection pool inherited
across a fork hands the same socket to two processes. :func:`default_factory` builds one
engine per process (keyed by pid and URL) the first time it is asked.

SQLite (the embedded default) runs in WAL mode with foreign keys on and a busy timeout, and
every transaction starts with ``BEGIN IMMEDIATE``: the write lock is taken up front, so two
processes claiming items are serialised instead of failing with "database is locked" when
a read transaction tries to upgrade to a write.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_S = 10

_factories: dict[tuple[int, str], sessionmaker] = {}


def _resolve_url(url: str | None) -> str:
    if url:
        return url
    from app.settings import get_settings

    return get_settings().db_url


def make_engine(url: str | None = None, **kw) -> Engine:
    """An engine for ``url`` (default: the settings' database URL)."""
    url = _resolve_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            # a server that drops packets must not hold a request (or a heartbeat) for the
            # kernel's TCP timeout of minutes; refused connections fail at once anyway
            kw.setdefault("connect_args", {}).setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
        return create_engine(url, pool_pre_ping=True, future=True, **kw)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kw)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see module doc)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def session_factory(engine: Engine) -> sessionmaker:
    # expire_on_commit=False: callers read ids/states off objects after the scope commits.
    return sessionmaker(engine, expire_on_commit=False)


def default_factory(url: str | None = None) -> sessionmaker:
    """This process's session factory for ``url`` (default: settings), created on first use."""
    url = _resolve_url(url)
    key = (os.getpid(), url)
    factory = _factories.get(key)
    if factory is None:
        factory = _factories[key] = session_factory(make_engine(url))
    return factory


def dispose_all() -> None:
    """Drop this process's cached engines (tests, or after the settings changed)."""
    for (pid, _url), factory in list(_factories.items()):
        if pid == os.getpid():
            factory.kw["bind"].dispose()
        del _factories[(pid, _url)]


@contextmanager
def session_scope(factory: sessionmaker | None = None) -> Iterator[Session]:
    """One transaction: commit when the block ends, roll back if it raises."""
    session = (factory or default_factory())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str | None = None):
    """An Alembic config for the packaged migrations; the URL travels in ``attributes``
    (not the ini) so passwords with ``%`` survive ConfigParser interpolation."""
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = _resolve_url(url)
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
