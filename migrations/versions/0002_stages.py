"""stages: one item per (stage, persona); the pipeline job kind

Existing items get their job's kind as their stage (a capture job's items are its capture
stage), so every job already stored reads the same after the upgrade.

Revision ID: 0002_stages
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_stages"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STAGES = ("capture", "rollout", "generate", "judge", "minilm", "vectors", "axis")
KINDS_OLD = ("capture", "rollout")
KINDS_NEW = ("capture", "rollout", "pipeline")


def _in(column: str, values) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _jobs_kind(kinds) -> None:
    """Replace the kind CHECK (SQLite rebuilds the table; env.py turns its foreign keys off
    for that, so the rebuild cascades nothing)."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_jobs_kind"), _in("kind", kinds))


def upgrade() -> None:
    with op.batch_alter_table("job_items") as batch:
        batch.add_column(sa.Column("stage", sa.String(length=16), nullable=True))
    op.execute("UPDATE job_items SET stage = (SELECT kind FROM jobs WHERE jobs.id = "
               "job_items.job_id)")
    with op.batch_alter_table("job_items") as batch:
        batch.alter_column("stage", existing_type=sa.String(length=16), nullable=False)
        batch.drop_constraint(op.f("uq_job_items_job_id_persona"), type_="unique")
        batch.create_unique_constraint(op.f("uq_job_items_job_id_stage_persona"),
                                       ["job_id", "stage", "persona"])
        batch.create_check_constraint(op.f("ck_job_items_stage"), _in("stage", STAGES))
    _jobs_kind(KINDS_NEW)


def downgrade() -> None:
    # pipeline jobs cannot exist without stages; their children go first (SQLite migrates
    # with foreign keys off, so nothing cascades there)
    for child in ("job_events", "artifacts", "job_items"):
        op.execute(f"DELETE FROM {child} WHERE job_id IN "
                   "(SELECT id FROM jobs WHERE kind = 'pipeline')")
    op.execute("DELETE FROM jobs WHERE kind = 'pipeline'")
    _jobs_kind(KINDS_OLD)
    with op.batch_alter_table("job_items") as batch:
        batch.drop_constraint(op.f("ck_job_items_stage"), type_="check")
        batch.drop_constraint(op.f("uq_job_items_job_id_stage_persona"), type_="unique")
        batch.create_unique_constraint(op.f("uq_job_items_job_id_persona"), ["job_id", "persona"])
        batch.drop_column("stage")
