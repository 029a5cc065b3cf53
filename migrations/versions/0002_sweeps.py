"""Sweeps: the ctexp_sweeps table, ctexp_runs.sweep_id's foreign key to it, and the PRUNED run status.

Revision ID: 0002_sweeps
Revises: 0001_initial
Create Date: 2026-12-07

Written by hand and frozen, like 0001. ``ctexp_runs`` changes in batch mode: SQLite cannot alter a
CHECK constraint or add a foreign key in place, so the table is copied (ctexp runs migrations with
SQLite's foreign keys off, so the copy does not cascade into the results tables); PostgreSQL gets plain
ALTERs. Downgrading turns PRUNED runs into KILLED ones (the nearest older status) before restoring the
old CHECK, and unlinks runs from sweeps before dropping the table.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_sweeps"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_RUN_STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")
RUN_STATUSES = (*OLD_RUN_STATUSES, "PRUNED")
SWEEP_STATUSES = ("RUNNING", "FINISHED", "STOPPED", "FAILED")
RUN_STATUS_CHECK = "ck_ctexp_runs_run_status"
SWEEP_FK = "fk_ctexp_runs_sweep_id_ctexp_sweeps"


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in values)})"


def upgrade() -> None:
    op.create_table(
        "ctexp_sweeps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("study_name", sa.String(128), nullable=False),
        sa.Column("storage", sa.Text(), nullable=False),  # masked: never a password
        sa.Column("experiment", sa.Text(), nullable=False),
        sa.Column("objective", sa.String(64), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("sampler", sa.String(16), nullable=False),
        sa.Column("pruner", sa.String(16), nullable=False),
        sa.Column("n_trials", sa.Integer(), nullable=False),
        sa.Column("search_space_json", sa.JSON(), nullable=False),
        sa.Column("base_config_json", sa.JSON(), nullable=False),
        sa.Column("mlflow_parent_run_id", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("best_trial_number", sa.Integer(), nullable=True),
        sa.Column("best_value", sa.Float(), nullable=True),
        sa.CheckConstraint(_in("status", SWEEP_STATUSES), name=op.f("ck_ctexp_sweeps_sweep_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ctexp_sweeps")),
        sa.UniqueConstraint("name", name=op.f("uq_ctexp_sweeps_name")),
    )
    with op.batch_alter_table("ctexp_runs") as batch:
        batch.drop_constraint(op.f(RUN_STATUS_CHECK), type_="check")
        batch.create_check_constraint(op.f(RUN_STATUS_CHECK), _in("status", RUN_STATUSES))
        batch.create_foreign_key(op.f(SWEEP_FK), "ctexp_sweeps", ["sweep_id"], ["id"], ondelete="SET NULL")


def downgrade() -> None:
    op.execute("UPDATE ctexp_runs SET status = 'KILLED' WHERE status = 'PRUNED'")
    op.execute("UPDATE ctexp_runs SET sweep_id = NULL, trial_number = NULL WHERE sweep_id IS NOT NULL")
    with op.batch_alter_table("ctexp_runs") as batch:
        batch.drop_constraint(op.f(SWEEP_FK), type_="foreignkey")
        batch.drop_constraint(op.f(RUN_STATUS_CHECK), type_="check")
        batch.create_check_constraint(op.f(RUN_STATUS_CHECK), _in("status", OLD_RUN_STATUSES))
    op.drop_table("ctexp_sweeps")
