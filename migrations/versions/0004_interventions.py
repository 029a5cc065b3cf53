"""Interventions: ctexp_runs.kind and source_run_id, and the tables of an intervention's rows and answers.

Revision ID: 0004_interventions
Revises: 0003_results
Create Date: 2026-12-14

``ctexp_runs`` gains ``kind`` (``lens`` for every existing row, ``intervention``; VARCHAR + CHECK like
the status columns, so that a later kind is a batch ALTER of the CHECK) and ``source_run_id``, the lens
run an intervention is of (``ON DELETE SET NULL``: deleting a lens run keeps its interventions). It
changes in batch mode: SQLite cannot add a CHECK or a foreign key in place, so the table is copied
(ctexp runs migrations with SQLite's foreign keys off, so the copy does not cascade into the results
tables); PostgreSQL gets plain ALTERs.

``ctexp_intervention_rows`` holds one row per (position, mode) of an intervention and
``ctexp_intervention_answers`` every row's per-problem answers (row key ``control`` for the control's).

Written by hand and frozen: the tables are defined here, never imported from ctexp's models.
Downgrading deletes intervention runs (their rows and answers go with the two tables) before it drops
the columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_interventions"
down_revision: str | None = "0003_results"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUN_KINDS = ("lens", "intervention")
KIND_CHECK = "ck_ctexp_runs_run_kind"
SOURCE_FK = "fk_ctexp_runs_source_run_id_ctexp_runs"
ROWS = "ctexp_intervention_rows"
ANSWERS = "ctexp_intervention_answers"


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in values)})"


def _run_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["run_id"], ["ctexp_runs.id"], name=op.f(f"fk_{table}_run_id_ctexp_runs"),
                                   ondelete="CASCADE")


def upgrade() -> None:
    with op.batch_alter_table("ctexp_runs") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="lens"))
        batch.add_column(sa.Column("source_run_id", sa.String(32), nullable=True))
        batch.create_check_constraint(op.f(KIND_CHECK), _in("kind", RUN_KINDS))
        batch.create_foreign_key(op.f(SOURCE_FK), "ctexp_runs", ["source_run_id"], ["id"], ondelete="SET NULL")
        batch.create_index(op.f("ix_ctexp_runs_kind"), ["kind"])
        batch.create_index(op.f("ix_ctexp_runs_source_run_id"), ["source_run_id"])
    op.create_table(
        ROWS,
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("row_key", sa.String(64), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=True),  # NULL: every position at once
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("site", sa.String(16), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=True),
        sa.Column("n", sa.Integer(), nullable=False),
        *[sa.Column(name, sa.Float(), nullable=True)
          for name in ("accuracy", "control_accuracy", "delta", "ci_low", "ci_high", "changed")],
        sa.Column("lost", sa.Integer(), nullable=False),
        sa.Column("gained", sa.Integer(), nullable=False),
        sa.Column("p_value", sa.Float(), nullable=False),
        sa.Column("p_holm", sa.Float(), nullable=True),
        sa.Column("significant", sa.Boolean(), nullable=False),
        _run_fk(ROWS),
        sa.PrimaryKeyConstraint("run_id", "row_key", name=op.f(f"pk_{ROWS}")),
    )
    op.create_index(op.f(f"ix_{ROWS}_mode_position"), ROWS, ["mode", "position"])
    op.create_table(
        ANSWERS,
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("row_key", sa.String(64), nullable=False),
        sa.Column("problem_id", sa.Text(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("parsed", sa.Text(), nullable=True),
        sa.Column("correct", sa.Boolean(), nullable=False),
        _run_fk(ANSWERS),
        sa.PrimaryKeyConstraint("run_id", "row_key", "problem_id", name=op.f(f"pk_{ANSWERS}")),
    )


def downgrade() -> None:
    op.drop_table(ANSWERS)
    op.drop_table(ROWS)  # its index goes with it
    op.execute("UPDATE ctexp_runs SET source_run_id = NULL")
    op.execute("DELETE FROM ctexp_runs WHERE kind <> 'lens'")  # older revisions know lens runs only
    with op.batch_alter_table("ctexp_runs") as batch:
        batch.drop_index(op.f("ix_ctexp_runs_source_run_id"))
        batch.drop_index(op.f("ix_ctexp_runs_kind"))
        batch.drop_constraint(op.f(SOURCE_FK), type_="foreignkey")
        batch.drop_constraint(op.f(KIND_CHECK), type_="check")
        batch.drop_column("source_run_id")
        batch.drop_column("kind")
