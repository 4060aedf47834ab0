"""Database tables: jobs, their per-persona items, artifacts, the event log and workers.

Postgres is the source of truth; SQLite runs the same schema for the embedded default, so
types stay portable (``JSON``, strings for states with CHECK constraints rather than native
enums). A naming convention gives every constraint a stable name, so Alembic autogenerate
and the migration test compare like with like.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, synonym

from app.states import FailureKind, ItemState, JobKind, JobState, Stage, WorkerState

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def _in(column: str, enum) -> str:
    values = ", ".join(f"'{m.value}'" for m in enum)
    return f"{column} IN ({values})"


TS = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict] = {dict[str, Any]: JSON, list[str]: JSON, datetime: TS}


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("state", JobState), name="state"),
        CheckConstraint(_in("kind", JobKind), name="kind"),
        CheckConstraint(f"failure_kind IS NULL OR {_in('failure_kind', FailureKind)}",
                        name="failure_kind"),
        CheckConstraint("items_done >= 0 AND items_failed >= 0 AND items_total >= 0",
                        name="counters"),
        Index("ix_jobs_state_created_at", "state", "created_at"),
        Index("ix_jobs_model_dtype", "model", "dtype"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))
    dataset: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(300))
    dtype: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    queue: Mapped[str] = mapped_column(String(300))
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    failure_kind: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    items_total: Mapped[int] = mapped_column(Integer, default=0)
    items_done: Mapped[int] = mapped_column(Integer, default=0)
    items_failed: Mapped[int] = mapped_column(Integer, default=0)
    artifact_prefix: Mapped[str | None] = mapped_column(String(1000))
    manifest_key: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobItem(Base):
    """One (stage, persona) of a job: the unit of progress, retry and resume. Capture and
    rollout jobs have one stage (their kind); pipeline jobs one row per stage and persona."""

    __tablename__ = "job_items"
    __table_args__ = (
        UniqueConstraint("job_id", "stage", "persona"),
        CheckConstraint(_in("state", ItemState), name="state"),
        CheckConstraint(_in("stage", Stage), name="stage"),
        CheckConstraint(f"failure_kind IS NULL OR {_in('failure_kind', FailureKind)}",
                        name="failure_kind"),
        CheckConstraint("attempt >= 0", name="attempt"),
        # a running item always has a holder; the reaper relies on it
        CheckConstraint("state <> 'running' OR (lease_owner IS NOT NULL AND "
                        "lease_expires_at IS NOT NULL)", name="running_lease"),
        Index("ix_job_items_job_id_state_position", "job_id", "state", "position"),
        Index("ix_job_items_state_lease_expires_at", "state", "lease_expires_at"),
        Index("ix_job_items_lease_owner", "lease_owner"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(16))
    persona: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=ItemState.QUEUED.value)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    batch_size: Mapped[int | None] = mapped_column(Integer)  # after OOM halving
    samples_done: Mapped[int] = mapped_column(Integer, default=0)
    samples_total: Mapped[int | None] = mapped_column(Integer)
    artifact_key: Mapped[str | None] = mapped_column(String(1000))
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    failure_kind: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (Index("ix_artifacts_job_id", "job_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    item_id: Mapped[int | None] = mapped_column(ForeignKey("job_items.id", ondelete="SET NULL"))
    key: Mapped[str] = mapped_column(String(1000), unique=True)
    kind: Mapped[str] = mapped_column(String(32), default="persona")
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)  # shapes, dtype, layers, ...
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    """Append-only history: every state change plus notable facts (OOM retries, engine
    restarts, lost workers). Never updated or deleted by the service."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    item_id: Mapped[int | None] = mapped_column(ForeignKey("job_items.id", ondelete="SET NULL"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))  # state, oom_retry, engine_restart, lost, ...
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    worker: Mapped[str | None] = mapped_column(String(200))
    message: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)

    created_at = synonym("at")


class Worker(Base):
    __tablename__ = "workers"
    __table_args__ = (CheckConstraint(_in("state", WorkerState), name="state"),)

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    gpu: Mapped[str | None] = mapped_column(String(64))
    queues: Mapped[list[str]] = mapped_column(default=list)
    model: Mapped[str | None] = mapped_column(String(300))
    dtype: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=WorkerState.STARTING.value)
    current_job_id: Mapped[str | None] = mapped_column(String(32))
    current_item_id: Mapped[int | None] = mapped_column(Integer)
    gpu_mem_used: Mapped[int | None] = mapped_column(BigInteger)
    gpu_mem_total: Mapped[int | None] = mapped_column(BigInteger)
    gpu_mem_baseline: Mapped[int | None] = mapped_column(BigInteger)
    model_info: Mapped[dict[str, Any]] = mapped_column(default=dict)  # num_layers, hidden_size
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)

    last_heartbeat = synonym("heartbeat_at")
