"""Tiny-CODI training runs: run kind ``tinycodi``.

Revision ID: 0006_tinycodi
Revises: 0005_attention
Create Date: 2026-12-05

``ctexp_runs.kind`` accepts ``tinycodi`` (``ctexp codi train``), by a batch ALTER of the CHECK as in
0004 and 0005. A training run keeps its settings and summary in ``config_json``; it has no rows of its
own. Written by hand and frozen. Downgrading deletes tinycodi runs before it restores the old CHECK.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006_tinycodi"
down_revision: str | None = "0005_attention"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_RUN_KINDS = ("lens", "intervention", "attention")
RUN_KINDS = (*OLD_RUN_KINDS, "tinycodi")
KIND_CHECK = "ck_ctexp_runs_run_kind"


def _kinds(values: Sequence[str]) -> None:
    with op.batch_alter_table("ctexp_runs") as batch:
        batch.drop_constraint(op.f(KIND_CHECK), type_="check")
        batch.create_check_constraint(op.f(KIND_CHECK), f"kind IN ({', '.join(repr(v) for v in values)})")


def upgrade() -> None:
    _kinds(RUN_KINDS)


def downgrade() -> None:
    op.execute("DELETE FROM ctexp_runs WHERE kind = 'tinycodi'")  # older revisions know no tinycodi runs
    _kinds(OLD_RUN_KINDS)
