"""Attention analyses: run kind ``attention`` and the tables of an attention report's rows.

Revision ID: 0005_attention
Revises: 0004_interventions
Create Date: 2026-12-16

``ctexp_runs.kind`` accepts ``attention`` (a batch ALTER of the CHECK: SQLite cannot alter a CHECK in
place, so the table is copied, with SQLite's foreign keys off as for every ctexp migration; PostgreSQL
gets plain ALTERs). Three tables hold a ``ctexp attention`` report:

- ``ctexp_attention_masses``: the mass of one (layer, position) on one context kind;
- ``ctexp_attention_tokens``: the question tokens a position attends to most, by rank;
- ``ctexp_attention_targets``: with a lens run, the correct vs incorrect contrast of one thought position.

A position is an integer: a thought position 0..T-1, or -1 for bot (so that positions sort and compare
as numbers). Written by hand and frozen. Downgrading deletes attention runs (their rows go with the
tables) before it restores the old CHECK.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_attention"
down_revision: str | None = "0004_interventions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_RUN_KINDS = ("lens", "intervention")
RUN_KINDS = (*OLD_RUN_KINDS, "attention")
KIND_CHECK = "ck_ctexp_runs_run_kind"
MASSES = "ctexp_attention_masses"
TOKENS = "ctexp_attention_tokens"
TARGETS = "ctexp_attention_targets"


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in values)})"


def _run_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["run_id"], ["ctexp_runs.id"], name=op.f(f"fk_{table}_run_id_ctexp_runs"),
                                   ondelete="CASCADE")


def _kinds(values: Sequence[str]) -> None:
    with op.batch_alter_table("ctexp_runs") as batch:
        batch.drop_constraint(op.f(KIND_CHECK), type_="check")
        batch.create_check_constraint(op.f(KIND_CHECK), _in("kind", values))


def upgrade() -> None:
    _kinds(RUN_KINDS)
    op.create_table(
        MASSES,
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),  # -1: bot
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("mass", sa.Float(), nullable=False),
        _run_fk(MASSES),
        sa.PrimaryKeyConstraint("run_id", "layer", "position", "kind", name=op.f(f"pk_{MASSES}")),
    )
    op.create_table(
        TOKENS,
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),  # -1: bot
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.Column("mass", sa.Float(), nullable=False),
        sa.Column("problems", sa.Integer(), nullable=False),
        _run_fk(TOKENS),
        sa.PrimaryKeyConstraint("run_id", "position", "rank", name=op.f(f"pk_{TOKENS}")),
    )
    op.create_table(
        TARGETS,
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("correct_states", sa.Integer(), nullable=False),
        sa.Column("incorrect_states", sa.Integer(), nullable=False),
        sa.Column("absent_states", sa.Integer(), nullable=False),
        sa.Column("problems", sa.Integer(), nullable=False),
        *[sa.Column(name, sa.Float(), nullable=True)
          for name in ("mass_correct", "mass_incorrect", "difference", "ci_low", "ci_high")],
        _run_fk(TARGETS),
        sa.PrimaryKeyConstraint("run_id", "position", name=op.f(f"pk_{TARGETS}")),
    )


def downgrade() -> None:
    for table in (TARGETS, TOKENS, MASSES):
        op.drop_table(table)
    op.execute("DELETE FROM ctexp_runs WHERE kind = 'attention'")  # older revisions know no attention runs
    _kinds(OLD_RUN_KINDS)
