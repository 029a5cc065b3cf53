"""The results database's tables, as SQLAlchemy 2 typed models.

Alembic (``migrations/``) is the only thing that creates or alters these tables; the models here are
what the code reads and writes, and a test checks that they match the migrated schema exactly.

Every table, index and constraint name starts with ``ctexp_`` (directly, or through the naming
convention) so the database can be shared with Optuna's and MLflow's tables without a clash.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The choices live with the records, free of SQLAlchemy, so the CLI can offer them without importing it.
from ctexp.registry.records import METRICS, RunKind, RunStatus, SweepStatus

TABLE_PREFIX = "ctexp_"
VERSION_TABLE = "ctexp_alembic_version"  # Optuna and MLflow keep theirs in `alembic_version`
# The newest migration, which these models describe. Opening a database compares its revision with this
# constant instead of reading migrations/ every time; a test fails when a new migration is not named here.
HEAD_REVISION = "0006_tinycodi"

# Headline and per-group metrics (METRICS, from records). Top-k rates are better high, loss is better low.
BASELINES = ("prior", "identity")
HIGHER_IS_BETTER = {"loss": False, "top1": True, "top5": True, "top10": True}
TEST_SPLIT = "test"  # the evaluated data split that results are of (the `split` column of ctexp_results)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _status_enum(kind: type[StrEnum], name: str) -> Enum:
    # VARCHAR + CHECK rather than a native PostgreSQL enum: a later value is a batch ALTER, not a type change.
    return Enum(kind, name=name, native_enum=False, create_constraint=True, length=16,
                values_callable=lambda kinds: [k.value for k in kinds])


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python, naive UTC in the database.

    SQLite has no timezone type, so both backends store naive UTC and every value read back is
    made aware again: comparisons never mix naive and aware datetimes.
    """

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the results database; use UTC-aware datetimes")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy's declarative setting, read once
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        float: Float(),
        str: Text(),
    }


class Experiment(Base):
    """A named configuration: runs of equal ``(name, config_hash)`` share one row."""

    __tablename__ = "ctexp_experiments"
    __table_args__ = (UniqueConstraint("name", "config_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str]
    config_json: Mapped[dict[str, Any]]
    config_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]


class Sweep(Base):
    """A hyperparameter search: an Optuna study of one base experiment; its trials are runs.

    ``storage`` is the Optuna storage with any password masked; ``n_trials`` is the number of complete
    or pruned trials asked for (the latest command's); ``best_*`` is as the last command saw it.
    """

    __tablename__ = "ctexp_sweeps"
    __table_args__ = (UniqueConstraint("name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    study_name: Mapped[str] = mapped_column(String(128))
    storage: Mapped[str]
    experiment: Mapped[str]
    objective: Mapped[str] = mapped_column(String(64))
    direction: Mapped[str] = mapped_column(String(16))
    sampler: Mapped[str] = mapped_column(String(16))
    pruner: Mapped[str] = mapped_column(String(16))
    n_trials: Mapped[int]
    search_space_json: Mapped[dict[str, Any]]
    base_config_json: Mapped[dict[str, Any]]
    mlflow_parent_run_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[SweepStatus] = mapped_column(_status_enum(SweepStatus, "sweep_status"))
    created_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    best_trial_number: Mapped[int | None]
    best_value: Mapped[float | None]


class Run(Base):
    """One execution of an experiment: its provenance, status and headline (overall test) metrics."""

    __tablename__ = "ctexp_runs"
    __table_args__ = (
        Index("ix_ctexp_runs_status", "status"),
        Index("ix_ctexp_runs_experiment_id", "experiment_id"),
        Index("ix_ctexp_runs_started_at", "started_at"),
        Index("ix_ctexp_runs_name", "name"),
        Index("ix_ctexp_runs_mlflow_run_id", "mlflow_run_id"),
        Index("ix_ctexp_runs_sweep_id_trial_number", "sweep_id", "trial_number"),
        Index("ix_ctexp_runs_kind", "kind"),
        Index("ix_ctexp_runs_source_run_id", "source_run_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # ctexp's 32-hex run id
    name: Mapped[str]
    experiment_id: Mapped[int] = mapped_column(ForeignKey("ctexp_experiments.id"))
    status: Mapped[RunStatus] = mapped_column(_status_enum(RunStatus, "run_status"))
    kind: Mapped[RunKind] = mapped_column(_status_enum(RunKind, "run_kind"), server_default=RunKind.LENS.value)
    # The lens run an intervention is of; deleting that run keeps the intervention (its lens columns stay).
    source_run_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("ctexp_runs.id", ondelete="SET NULL"))
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime]
    config_json: Mapped[dict[str, Any]]
    lens: Mapped[str] = mapped_column(String(32))
    adapter: Mapped[str] = mapped_column(String(32))
    split: Mapped[str]
    target: Mapped[str] = mapped_column(String(32))
    layers: Mapped[str]  # the spec as given: "all", "0-7,15"
    positions: Mapped[str]
    store_hash: Mapped[str] = mapped_column(String(64))
    store_path: Mapped[str | None]
    code_version: Mapped[str]
    device: Mapped[str]
    seed: Mapped[int]
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("ctexp_sweeps.id", ondelete="SET NULL"))
    trial_number: Mapped[int | None]
    error: Mapped[str | None]
    test_top1: Mapped[float | None]
    test_top5: Mapped[float | None]
    test_top10: Mapped[float | None]
    test_loss: Mapped[float | None]
    test_top1_low: Mapped[float | None]
    test_top1_high: Mapped[float | None]
    prior_top1: Mapped[float | None]
    identity_top1: Mapped[float | None]
    best_val_loss: Mapped[float | None]
    best_epoch: Mapped[int | None]
    n_test_problems: Mapped[int | None]
    n_test_states: Mapped[int | None]
    seconds: Mapped[float | None]


# Headline columns a run list can be sorted by, besides started_at.
HEADLINE_METRICS = (
    "test_top1", "test_top5", "test_top10", "test_loss", "test_top1_low", "test_top1_high", "prior_top1",
    "identity_top1", "best_val_loss", "best_epoch", "n_test_problems", "n_test_states", "seconds",
)


class Epoch(Base):
    """One training epoch's losses and validation metrics."""

    __tablename__ = "ctexp_epochs"

    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("ctexp_runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(primary_key=True)
    train_loss: Mapped[float]
    val_loss: Mapped[float]
    val_top1: Mapped[float]
    val_top5: Mapped[float]
    val_top10: Mapped[float]
    seconds: Mapped[float]


def metric_column_names() -> list[str]:
    """The metric columns of the results table, in table order (see ``GroupMetricsColumns``)."""
    names = ["n", "problems", *METRICS]
    names += [f"{metric}_{bound}" for metric in METRICS for bound in ("low", "high")]
    names += [f"{baseline}_{metric}" for baseline in BASELINES for metric in METRICS]
    return [*names, "lift_prior", "lift_identity"]


class GroupMetricsColumns:
    """The metric columns of a result row (declared apart so that a test can hold them equal to
    ``metric_column_names()``, which lists the same columns in the same order).

    Metrics are nullable: a position with no test state (``n == 0``) has none. Bounds are the 95%
    bootstrap interval; ``prior_*`` and ``identity_*`` are the baselines on the same states.
    """

    n: Mapped[int]
    problems: Mapped[int]
    loss: Mapped[float | None]
    top1: Mapped[float | None]
    top5: Mapped[float | None]
    top10: Mapped[float | None]
    loss_low: Mapped[float | None]
    loss_high: Mapped[float | None]
    top1_low: Mapped[float | None]
    top1_high: Mapped[float | None]
    top5_low: Mapped[float | None]
    top5_high: Mapped[float | None]
    top10_low: Mapped[float | None]
    top10_high: Mapped[float | None]
    prior_loss: Mapped[float | None]
    prior_top1: Mapped[float | None]
    prior_top5: Mapped[float | None]
    prior_top10: Mapped[float | None]
    identity_loss: Mapped[float | None]
    identity_top1: Mapped[float | None]
    identity_top5: Mapped[float | None]
    identity_top10: Mapped[float | None]
    lift_prior: Mapped[float | None]
    lift_identity: Mapped[float | None]


class Result(Base, GroupMetricsColumns):
    """Test metrics of one run for one group of one grouping (a layer, a position, a cell, ...).

    One long table for every grouping of ``ctexp.analysis.groupings.BREAKDOWNS``: a new grouping needs no
    new table, and cross-run queries read ``WHERE grouping = 'position'``. ``layer`` and ``position`` hold
    the group's key values (NULL where its grouping does not key on them); ``group_key`` is the same key
    as non-null text (``layer=3,position=2``), since unique constraints treat NULLs as distinct.
    """

    __tablename__ = "ctexp_results"
    __table_args__ = (
        PrimaryKeyConstraint("run_id", "split", "grouping", "group_key"),
        # Cross-run queries look groups up by their key values (by layer, and by cell; by position), as
        # `best` does for the best value of each group. Key columns lead: led by grouping and split, the
        # planner scanned every row of a grouping instead, which made `best` twice as slow.
        Index("ix_ctexp_results_layer_position_grouping_split", "layer", "position", "grouping", "split"),
        Index("ix_ctexp_results_position_grouping_split", "position", "grouping", "split"),
    )

    # Deleting a run deletes its results in the database itself, whoever deletes it.
    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("ctexp_runs.id", ondelete="CASCADE"))
    split: Mapped[str] = mapped_column(String(16))  # the evaluated split (TEST_SPLIT)
    grouping: Mapped[str] = mapped_column(String(32))
    group_key: Mapped[str] = mapped_column(String(128))
    layer: Mapped[int | None]
    position: Mapped[int | None]


CONTROL_ROW = "control"  # the row key of the control's answers in ctexp_intervention_answers


class InterventionRowResult(Base):
    """One row of an intervention: a (position, mode) replacement against the control on the same problems.

    ``row_key`` is ``p{position}/{mode}`` (``pall/{mode}`` for every position at once, where ``position``
    is NULL); ``ordinal`` is the row's place in the command's output. The statistics are those of
    ``ctexp.analysis.intervention.InterventionRow``; ``ci_low``/``ci_high`` bound ``delta``.
    """

    __tablename__ = "ctexp_intervention_rows"
    __table_args__ = (
        PrimaryKeyConstraint("run_id", "row_key"),
        Index("ix_ctexp_intervention_rows_mode_position", "mode", "position"),
    )

    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("ctexp_runs.id", ondelete="CASCADE"))
    row_key: Mapped[str] = mapped_column(String(64))
    ordinal: Mapped[int]
    position: Mapped[int | None]
    mode: Mapped[str] = mapped_column(String(16))
    site: Mapped[str] = mapped_column(String(16))
    layer: Mapped[int | None]
    n: Mapped[int]
    accuracy: Mapped[float | None]
    control_accuracy: Mapped[float | None]
    delta: Mapped[float | None]
    ci_low: Mapped[float | None]
    ci_high: Mapped[float | None]
    changed: Mapped[float | None]
    lost: Mapped[int]
    gained: Mapped[int]
    p_value: Mapped[float]
    p_holm: Mapped[float | None]
    significant: Mapped[bool] = mapped_column(Boolean())


class InterventionAnswer(Base):
    """One problem's decoded answer in one row of an intervention (``row_key`` ``control`` for the control).

    ``ordinal`` is the answer's place in its row (the command's problem order).
    """

    __tablename__ = "ctexp_intervention_answers"
    __table_args__ = (PrimaryKeyConstraint("run_id", "row_key", "problem_id"),)

    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("ctexp_runs.id", ondelete="CASCADE"))
    row_key: Mapped[str] = mapped_column(String(64))
    problem_id: Mapped[str]
    ordinal: Mapped[int]
    text: Mapped[str]
    parsed: Mapped[str | None]
    correct: Mapped[bool] = mapped_column(Boolean())


BOT_POSITION = -1  # bot's row in the attention tables, whose positions are integers (thoughts are 0..T-1)


class AttentionMassRow(Base):
    """The mean attention mass of one (layer, position) of an attention analysis on one context kind.

    ``position`` is a thought position, or ``BOT_POSITION`` (-1) for bot's row; ``kind`` is one of
    ``ctexp.analysis.attention.KIND_COLUMNS``.
    """

    __tablename__ = "ctexp_attention_masses"
    __table_args__ = (PrimaryKeyConstraint("run_id", "layer", "position", "kind"),)

    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("ctexp_runs.id", ondelete="CASCADE"))
    layer: Mapped[int]
    position: Mapped[int]
    kind: Mapped[str] = mapped_column(String(16))
    mass: Mapped[float]


class AttentionTokenRow(Base):
    """A question token a position attends to most (``rank`` 0 is the most), averaged over the chosen layers."""

    __tablename__ = "ctexp_attention_tokens"
    __table_args__ = (PrimaryKeyConstraint("run_id", "position", "rank"),)

    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("ctexp_runs.id", ondelete="CASCADE"))
    position: Mapped[int]
    rank: Mapped[int]
    token_id: Mapped[int]
    token: Mapped[str]
    mass: Mapped[float]
    problems: Mapped[int]


class AttentionTargetRow(Base):
    """With a lens run: the attention on test states' target occurrences at one thought position, correct
    vs incorrect states (top-1), and the difference with its 95% problem-bootstrap interval."""

    __tablename__ = "ctexp_attention_targets"
    __table_args__ = (PrimaryKeyConstraint("run_id", "position"),)

    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("ctexp_runs.id", ondelete="CASCADE"))
    position: Mapped[int]
    correct_states: Mapped[int]
    incorrect_states: Mapped[int]
    absent_states: Mapped[int]
    problems: Mapped[int]
    mass_correct: Mapped[float | None]
    mass_incorrect: Mapped[float | None]
    difference: Mapped[float | None]
    ci_low: Mapped[float | None]
    ci_high: Mapped[float | None]
