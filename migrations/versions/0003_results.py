"""One long results table: ctexp_results (a row per run, split, grouping and group) replaces the layer,
position and cell tables.

Revision ID: 0003_results
Revises: 0002_sweeps
Create Date: 2026-12-10

A grouping is a value of the ``grouping`` column rather than a table of its own, so a new grouping
needs no migration and a cross-run query reads ``WHERE grouping = 'position'``. The key columns
``layer`` and ``position`` are NULL where a grouping does not key on them; the primary key uses
``group_key``, the same key as non-null text (``layer=3,position=2``), because unique constraints treat
NULLs as distinct on both SQLite and PostgreSQL.

Written by hand and frozen: the tables are defined here, never imported from ctexp's models. Upgrading
creates the table, copies every row of the three old tables (the key text built in SQL, ``||`` and
``CAST`` reading the same on both backends) and drops them; downgrading does the reverse for the
layer, position and cell rows (rows of later groupings have no old table and are dropped). No table is
altered, so SQLite needs no batch copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_results"
down_revision: str | None = "0002_sweeps"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

METRICS = ("loss", "top1", "top5", "top10")
BASELINES = ("prior", "identity")
RESULTS = "ctexp_results"
# The tables of revisions 0001-0002, by grouping, with their key columns.
OLD_TABLES = {
    "layer": ("ctexp_layer_results", ("layer",)),
    "position": ("ctexp_position_results", ("position",)),
    "cell": ("ctexp_cell_results", ("layer", "position")),
}
AXES = ("layer", "position")


def _metric_names() -> list[str]:
    names = ["n", "problems", *METRICS]
    names += [f"{metric}_{bound}" for metric in METRICS for bound in ("low", "high")]
    names += [f"{baseline}_{metric}" for baseline in BASELINES for metric in METRICS]
    return [*names, "lift_prior", "lift_identity"]


def _metric_columns() -> list[sa.Column]:
    return [sa.Column(name, sa.Integer() if name in ("n", "problems") else sa.Float(),
                      nullable=name not in ("n", "problems")) for name in _metric_names()]


def _create_results() -> None:
    op.create_table(
        RESULTS,
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("grouping", sa.String(32), nullable=False),
        sa.Column("group_key", sa.String(128), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=True),
        sa.Column("position", sa.Integer(), nullable=True),
        *_metric_columns(),
        sa.ForeignKeyConstraint(["run_id"], ["ctexp_runs.id"], name=op.f(f"fk_{RESULTS}_run_id_ctexp_runs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "split", "grouping", "group_key", name=op.f(f"pk_{RESULTS}")),
    )
    for columns in (["layer", "position", "grouping", "split"], ["position", "grouping", "split"]):
        op.create_index(op.f(f"ix_{RESULTS}_{'_'.join(columns)}"), RESULTS, columns)


def _create_old(table: str, keys: tuple[str, ...]) -> None:
    """An old results table exactly as revision 0001 created it."""
    op.create_table(
        table,
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        *[sa.Column(key, sa.Integer(), nullable=False) for key in keys],
        *_metric_columns(),
        sa.ForeignKeyConstraint(["run_id"], ["ctexp_runs.id"], name=op.f(f"fk_{table}_run_id_ctexp_runs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "split", *keys, name=op.f(f"pk_{table}")),
    )
    op.create_index(op.f(f"ix_{table}_{'_'.join(keys)}_split"), table, [*keys, "split"])


def _table(name: str, columns: Sequence[str]) -> sa.TableClause:
    """A frozen, lightweight definition of a table's columns, for INSERT ... SELECT."""
    return sa.table(name, *(sa.column(column) for column in columns))


def _group_key(source: sa.TableClause, keys: tuple[str, ...]) -> sa.ColumnElement[str]:
    """``layer=3,position=2`` from the key columns, as ctexp writes it."""
    parts: list[sa.ColumnElement[str]] = []
    for index, key in enumerate(keys):
        prefix = f"{',' if index else ''}{key}="
        parts += [sa.literal(prefix, sa.Text()), sa.cast(source.c[key], sa.Text())]
    text = parts[0]
    for part in parts[1:]:
        text = text.op("||")(part)
    return text


def upgrade() -> None:
    _create_results()
    metrics = _metric_names()
    target = _table(RESULTS, ["run_id", "split", "grouping", "group_key", *AXES, *metrics])
    for grouping, (name, keys) in OLD_TABLES.items():
        source = _table(name, ["run_id", "split", *keys, *metrics])
        axes = [source.c[axis] if axis in keys else sa.null() for axis in AXES]
        select = sa.select(source.c.run_id, source.c.split, sa.literal(grouping, sa.String()),
                           _group_key(source, keys), *axes, *(source.c[metric] for metric in metrics))
        op.execute(target.insert().from_select(list(target.c.keys()), select))
        op.drop_table(name)  # its index goes with it


def downgrade() -> None:
    metrics = _metric_names()
    source = _table(RESULTS, ["run_id", "split", "grouping", *AXES, *metrics])
    for grouping, (name, keys) in OLD_TABLES.items():
        _create_old(name, keys)
        target = _table(name, ["run_id", "split", *keys, *metrics])
        select = sa.select(source.c.run_id, source.c.split, *(source.c[key] for key in keys),
                           *(source.c[metric] for metric in metrics)).where(source.c.grouping == grouping)
        op.execute(target.insert().from_select(list(target.c.keys()), select))
    op.drop_table(RESULTS)
