"""What the registry's reads return: plain typed values, detached from any session, and the choices
(status, kind) its rows hold. Free of SQLAlchemy, so that the CLI defines its options without it."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from ctexp.analysis.result import GroupMetrics
from ctexp.records import FrozenRecord

# Headline and per-group metrics, here rather than in ``models`` so that reading them needs no SQLAlchemy.
METRICS = ("loss", "top1", "top5", "top10")


class RunStatus(StrEnum):
    """A run's life cycle, in MLflow's words so the two stores read alike."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"
    PRUNED = "PRUNED"  # a sweep's pruner stopped it; its epochs are kept, it has no test results


class RunKind(StrEnum):
    """What a run is: a trained lens, an intervention on a CODI model through a lens run's store, an
    attention analysis of a store (``ctexp attention``), or a tiny CODI's training (``ctexp codi train``).

    Rows of ``ctexp_runs`` of every kind keep the lens columns (``lens``, ``split``, ``target``, ...): an
    intervention, or an attention analysis with a lens run, copies them from the lens run it is of, so
    that queries written for lens runs keep working; an attention analysis without one holds ``-`` there.
    A new kind is a new value here and a batch ALTER of the CHECK by a migration.
    """

    LENS = "lens"
    INTERVENTION = "intervention"
    ATTENTION = "attention"
    TINYCODI = "tinycodi"  # a tiny CODI trained by ``ctexp codi train``: settings and summary in config_json


class SweepStatus(StrEnum):
    """A sweep's life cycle, as the last command that worked on it left it."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"  # the study holds its n_trials complete or pruned trials
    STOPPED = "STOPPED"  # ended early (timeout, Ctrl-C); the same command resumes it
    FAILED = "FAILED"  # trials kept failing; fix the cause and resume


class RunRecord(FrozenRecord):
    """One run as the registry holds it: provenance, status and headline test metrics.

    An intervention (``kind``) carries the lens columns of the lens run it is of (``source_run_id``)
    and no headline test metrics; its results are ``Registry.intervention(run_id)``.
    """

    id: str
    name: str
    experiment: str
    status: RunStatus
    kind: RunKind = RunKind.LENS
    source_run_id: str | None = None
    started_at: datetime
    ended_at: datetime | None
    heartbeat_at: datetime
    lens: str
    adapter: str
    split: str
    target: str
    layers: str
    positions: str
    seed: int
    device: str
    store_hash: str
    store_path: str | None
    code_version: str
    mlflow_run_id: str | None
    sweep_id: int | None
    trial_number: int | None
    error: str | None
    config: dict[str, Any]
    test_top1: float | None
    test_top5: float | None
    test_top10: float | None
    test_loss: float | None
    test_top1_low: float | None
    test_top1_high: float | None
    prior_top1: float | None
    identity_top1: float | None
    best_val_loss: float | None
    best_epoch: int | None
    n_test_problems: int | None
    n_test_states: int | None
    seconds: float | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ISO 8601 datetimes, status as its name)."""
        return self.model_dump(mode="json")


class ResultRow(FrozenRecord):
    """Test metrics of one group (a layer, a position, a cell, ...) of a run, with intervals and baselines.

    Which grouping it belongs to is where it was read from (``Registry.results(run_id, grouping)``).
    """

    run_id: str
    split: str
    layer: int | None = None
    position: int | None = None
    n: int
    problems: int
    loss: float | None
    top1: float | None
    top5: float | None
    top10: float | None
    loss_low: float | None
    loss_high: float | None
    top1_low: float | None
    top1_high: float | None
    top5_low: float | None
    top5_high: float | None
    top10_low: float | None
    top10_high: float | None
    prior_loss: float | None
    prior_top1: float | None
    prior_top5: float | None
    prior_top10: float | None
    identity_loss: float | None
    identity_top1: float | None
    identity_top5: float | None
    identity_top10: float | None
    lift_prior: float | None
    lift_identity: float | None

    def interval(self, metric: str) -> tuple[float, float] | None:
        """The 95% interval of ``metric`` (loss, top1, top5, top10), or None."""
        low, high = getattr(self, f"{metric}_low"), getattr(self, f"{metric}_high")
        return None if low is None or high is None else (low, high)

    def as_group_metrics(self) -> GroupMetrics:
        """This row in the run result's shape (``RunResult.rows(name)``), e.g. for the run tables and reports."""
        return GroupMetrics(
            layer=self.layer, position=self.position, n=self.n, problems=self.problems, loss=self.loss,
            top1=self.top1, top5=self.top5, top10=self.top10,
            ci={metric: self.interval(metric) for metric in METRICS},
            prior_top1=self.prior_top1, identity_top1=self.identity_top1, lift_prior=self.lift_prior,
            lift_identity=self.lift_identity,
        )


class BestRow(FrozenRecord):
    """The finished run with the best value of a metric in one group (a layer, a position, a cell, ...)."""

    layer: int | None = None
    position: int | None = None
    metric: str
    value: float
    low: float | None
    high: float | None
    n: int
    run_id: str
    run_name: str
    experiment: str
    lens: str
    adapter: str
    split: str  # the run's split rule
    target: str


class SweepRecord(FrozenRecord):
    """One sweep as the registry holds it, with its trials' runs counted by status."""

    id: int
    name: str
    study_name: str
    storage: str
    experiment: str
    objective: str
    direction: str
    sampler: str
    pruner: str
    n_trials: int
    search_space: dict[str, Any]
    base_config: dict[str, Any]
    mlflow_parent_run_id: str | None
    status: SweepStatus
    created_at: datetime
    ended_at: datetime | None
    best_trial_number: int | None
    best_value: float | None
    runs: dict[str, int]  # ctexp runs of its trials by status (FINISHED, PRUNED, FAILED, ...)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ISO 8601 datetimes, status as its name)."""
        return self.model_dump(mode="json")
