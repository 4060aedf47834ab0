"""Alembic environment: the URL comes from app.settings (or app.db.upgrade's argument).

SQLite cannot ALTER most things, so on SQLite migrations render and run in batch mode
(copy-and-move tables); Postgres runs them directly, inside one transaction.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.pool import NullPool

from app.db import make_engine
from app.models import Base
from app.settings import get_settings

config = context.config
target_metadata = Base.metadata

if "url" not in config.attributes and config.config_file_name:
    # run from the alembic command line: use the ini's logging; the library call leaves the
    # application's logging alone
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    return config.attributes.get("url") or get_settings().db_url


def _configure(**kw) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kw)


def run_offline() -> None:
    url = _url()
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"),
               dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run(connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds a table by dropping it; with foreign keys on, that drop runs
        # the children's ON DELETE actions (items, events and artifacts of every job lost).
        # SQLite changes this pragma only outside a transaction: set it on the raw
        # connection before the migration's transaction begins, and back after it ended.
        _pragma(connection, "PRAGMA foreign_keys=OFF")
    try:
        _configure(connection=connection, render_as_batch=sqlite)
        with context.begin_transaction():
            context.run_migrations()
        if sqlite:
            connection.commit()  # end the transaction (even an empty one) before the pragma
    except BaseException:
        if sqlite:
            connection.rollback()
        raise
    finally:
        if sqlite:
            _pragma(connection, "PRAGMA foreign_keys=ON")
    if sqlite:
        bad = _pragma(connection, "PRAGMA foreign_key_check")
        if bad:
            raise RuntimeError(f"foreign keys broken after migrating: {bad[:5]}")


def _pragma(connection, sql: str) -> list:
    raw = connection.connection.dbapi_connection
    if raw.in_transaction:
        raise RuntimeError(f"{sql} needs to run outside a transaction")
    cur = raw.execute(sql)
    try:
        return cur.fetchall()
    finally:
        cur.close()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
