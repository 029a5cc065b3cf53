"""The first schema: experiments, runs, epochs, and layer, position and cell results.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-30

Written by hand and frozen: it does not import ctexp's models, so later changes to them never change
what this revision creates. Every constraint and index is named (batch mode on SQLite needs it).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

METRICS = ("loss", "top1", "top5", "top10")
BASELINES = ("prior", "identity")
RUN_STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")


def _float(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.Float(), nullable=nullable)


def _metric_columns() -> list[sa.Column]:
    """The columns shared by the three results tables: counts, metrics, intervals, baselines, lifts."""
    columns = [sa.Column("n", sa.Integer(), nullable=False), sa.Column("problems", sa.Integer(), nullable=False)]
    columns += [_float(metric) for metric in METRICS]
    columns += [_float(f"{metric}_{bound}") for metric in METRICS for bound in ("low", "high")]
    columns += [_float(f"{baseline}_{metric}") for baseline in BASELINES for metric in METRICS]
    return [*columns, _float("lift_prior"), _float("lift_identity")]


def _results_table(table: str, keys: tuple[str, ...]) -> None:
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


def upgrade() -> None:
    op.create_table(
        "ctexp_experiments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("config_json", sa.JSON(), nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ctexp_experiments")),
        sa.UniqueConstraint("name", "config_hash", name=op.f("uq_ctexp_experiments_name_config_hash")),
    )
    statuses = ", ".join(f"'{status}'" for status in RUN_STATUSES)
    op.create_table(
        "ctexp_runs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("config_json", sa.JSON(), nullable=False),
        sa.Column("lens", sa.String(32), nullable=False),
        sa.Column("adapter", sa.String(32), nullable=False),
        sa.Column("split", sa.Text(), nullable=False),
        sa.Column("target", sa.String(32), nullable=False),
        sa.Column("layers", sa.Text(), nullable=False),
        sa.Column("positions", sa.Text(), nullable=False),
        sa.Column("store_hash", sa.String(64), nullable=False),
        sa.Column("store_path", sa.Text(), nullable=True),
        sa.Column("code_version", sa.Text(), nullable=False),
        sa.Column("device", sa.Text(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("sweep_id", sa.Integer(), nullable=True),  # its foreign key comes with the sweeps table
        sa.Column("trial_number", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        *[_float(f"test_{metric}") for metric in ("top1", "top5", "top10", "loss")],
        _float("test_top1_low"),
        _float("test_top1_high"),
        _float("prior_top1"),
        _float("identity_top1"),
        _float("best_val_loss"),
        sa.Column("best_epoch", sa.Integer(), nullable=True),
        sa.Column("n_test_problems", sa.Integer(), nullable=True),
        sa.Column("n_test_states", sa.Integer(), nullable=True),
        _float("seconds"),
        sa.CheckConstraint(f"status IN ({statuses})", name=op.f("ck_ctexp_runs_run_status")),
        sa.ForeignKeyConstraint(["experiment_id"], ["ctexp_experiments.id"],
                                name=op.f("fk_ctexp_runs_experiment_id_ctexp_experiments")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ctexp_runs")),
    )
    for columns in (["status"], ["experiment_id"], ["started_at"], ["name"], ["mlflow_run_id"],
                    ["sweep_id", "trial_number"]):
        op.create_index(op.f(f"ix_ctexp_runs_{'_'.join(columns)}"), "ctexp_runs", columns)

    op.create_table(
        "ctexp_epochs",
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        *[_float(name, nullable=False)
          for name in ("train_loss", "val_loss", "val_top1", "val_top5", "val_top10", "seconds")],
        sa.ForeignKeyConstraint(["run_id"], ["ctexp_runs.id"], name=op.f("fk_ctexp_epochs_run_id_ctexp_runs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "epoch", name=op.f("pk_ctexp_epochs")),
    )
    _results_table("ctexp_layer_results", ("layer",))
    _results_table("ctexp_position_results", ("position",))
    _results_table("ctexp_cell_results", ("layer", "position"))


def downgrade() -> None:
    for table in ("ctexp_cell_results", "ctexp_position_results", "ctexp_layer_results", "ctexp_epochs",
                  "ctexp_runs", "ctexp_experiments"):
        op.drop_table(table)  # their indexes go with them
