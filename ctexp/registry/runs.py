"""The registry's writes of a run's life: start, heartbeat, epochs, results, end, delete; of an
intervention's: start (from the lens run it is of), rows and answers with FINISHED in one transaction; and
of an attention analysis's: start (from its lens run, or its store alone), its report's rows with FINISHED."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ctexp.analysis.groupings import AXES, BREAKDOWNS, Grouping
from ctexp.analysis.result import EpochMetrics, RunResult
from ctexp.errors import RegistryError
from ctexp.registry.database import Database, now, require_run, unknown_run
from ctexp.registry.models import (
    BASELINES,
    BOT_POSITION,
    METRICS,
    TEST_SPLIT,
    AttentionMassRow,
    AttentionTargetRow,
    AttentionTokenRow,
    Epoch,
    Experiment,
    InterventionAnswer,
    InterventionRowResult,
    Result,
    Run,
    RunKind,
    RunStatus,
)

if TYPE_CHECKING:  # the registry's read path (every command's Registry) loads none of them: numpy, the config models
    from ctexp.analysis.attention import AttentionReport, Row
    from ctexp.analysis.intervention import InterventionResult, InterventionRow, ProblemAnswer
    from ctexp.config import ExperimentConfig


class RunWrites(Database):
    """The writes of a run's life (a part of ``Registry``), each one transaction."""

    def start_run(
        self,
        run_id: str,
        name: str,
        config: ExperimentConfig,
        *,
        store_hash: str,
        store_path: str | None,
        device: str,
        code_version: str,
        sweep_id: int | None = None,
        trial_number: int | None = None,
        mlflow_run_id: str | None = None,
    ) -> None:
        """Record a RUNNING run (and its experiment, created on first use), with its heartbeat now.

        Raises:
            RegistryError: the run id is already recorded, or the database fails.
        """
        started = now()

        def work(session: Session) -> None:
            _require_new(session, run_id)
            session.add(Run(
                id=run_id, name=name, experiment_id=_experiment_id(session, config, started),
                status=RunStatus.RUNNING, started_at=started, heartbeat_at=started,
                config_json=config.model_dump(mode="json"), lens=config.lens.value, adapter=config.adapter.value,
                split=str(config.split), target=config.target.value, layers=config.layers,
                positions=config.positions, seed=config.seed, store_hash=store_hash, store_path=store_path,
                code_version=code_version, device=device, mlflow_run_id=mlflow_run_id, sweep_id=sweep_id,
                trial_number=trial_number,
            ))

        self._write(f"record the start of run {run_id}", work)

    def set_mlflow_run_id(self, run_id: str, mlflow_run_id: str) -> None:
        """Link a run to its MLflow run."""
        self._update_run(run_id, f"link run {run_id} to MLflow", mlflow_run_id=mlflow_run_id)

    def heartbeat(self, run_id: str) -> None:
        """Say the run is alive (``mark_stale_runs`` fails runs that stop saying so)."""
        self._update_run(run_id, f"record a heartbeat of run {run_id}", heartbeat_at=now())

    def record_epoch(self, run_id: str, epoch: EpochMetrics) -> None:
        """Record (or replace) one epoch's metrics, and the run's heartbeat."""
        def work(session: Session) -> None:
            require_run(session, run_id).heartbeat_at = now()
            session.merge(_epoch_row(run_id, epoch))

        self._write(f"record epoch {epoch.epoch} of run {run_id}", work)

    def finish_run(self, result: RunResult) -> None:
        """Record a run's results and mark it FINISHED, in one transaction.

        Writes its epochs (replacing those recorded along the way), one results row per group of every
        grouping in ``BREAKDOWNS`` (each layer, position, cell, ...) with intervals and the baselines'
        values on the same states, and the headline metrics (the ``overall`` group). Finishing again
        replaces the results: it is safe to retry.

        Raises:
            RegistryError: the run was never started, or the database fails.
        """
        def work(session: Session) -> None:
            run = require_run(session, result.run_id)
            for table in (Epoch, Result):
                session.execute(delete(table).where(table.run_id == run.id))
            session.add_all(_epoch_row(run.id, epoch) for epoch in result.epochs)
            rows = [row for grouping in BREAKDOWNS for row in _result_rows(result, grouping)]
            if rows:
                session.execute(insert(Result), rows)
            ended = now()
            run.name = result.name
            run.status, run.ended_at, run.heartbeat_at, run.error = RunStatus.FINISHED, ended, ended, None
            for column, value in _headline(result).items():
                setattr(run, column, value)

        self._write(f"record the results of run {result.run_id}", work)

    def start_intervention(
        self,
        run_id: str,
        name: str,
        *,
        lens_run_id: str,
        config: Mapping[str, Any],
        seed: int,
        device: str,
        code_version: str,
    ) -> None:
        """Record a RUNNING intervention of a lens run, with its heartbeat now.

        It joins the lens run's experiment and copies its lens columns (``lens``, ``adapter``, ``split``,
        ``target``, ``layers``, ``positions``, ``store_hash``, ``store_path``), which are NOT NULL for every
        run, so that queries written for lens runs keep working on the whole table.

        Raises:
            RegistryError: the run id is already recorded, the lens run is unknown or not a lens run, or the
                database fails.
        """
        started = now()

        def work(session: Session) -> None:
            _require_new(session, run_id)
            lens = require_run(session, lens_run_id)
            if lens.kind is not RunKind.LENS:
                raise RegistryError(f"run {lens_run_id[:12]} ({lens.name}) is of kind {lens.kind.value}, not a lens run")
            session.add(Run(
                id=run_id, name=name, experiment_id=lens.experiment_id, status=RunStatus.RUNNING,
                kind=RunKind.INTERVENTION, source_run_id=lens.id, started_at=started, heartbeat_at=started,
                config_json=dict(config), lens=lens.lens, adapter=lens.adapter, split=lens.split, target=lens.target,
                layers=lens.layers, positions=lens.positions, seed=seed, store_hash=lens.store_hash,
                store_path=lens.store_path, code_version=code_version, device=device,
            ))

        self._write(f"record the start of intervention {run_id}", work)

    def finish_intervention(self, result: InterventionResult, seconds: float) -> None:
        """Record an intervention's rows and every row's answers (the control's too) and mark it FINISHED,
        in one transaction. Finishing again replaces them: it is safe to retry.

        Raises:
            RegistryError: the run was never started or is not an intervention, or the database fails.
        """
        from ctexp.analysis.intervention import CONTROL_KEY

        def work(session: Session) -> None:
            run = require_run(session, result.run_id)
            if run.kind is not RunKind.INTERVENTION:
                raise RegistryError(f"run {run.id[:12]} ({run.name}) is of kind {run.kind.value}, not an intervention")
            for table in (InterventionRowResult, InterventionAnswer):
                session.execute(delete(table).where(table.run_id == run.id))
            session.execute(insert(InterventionRowResult), [
                _intervention_row(run.id, ordinal, row) for ordinal, row in enumerate(result.rows)
            ])
            answers = [(CONTROL_KEY, result.control.answers), *((row.key, row.answers) for row in result.rows)]
            session.execute(insert(InterventionAnswer), [
                _answer_row(run.id, key, ordinal, answer)
                for key, listed in answers for ordinal, answer in enumerate(listed)
            ])
            ended = now()
            run.config_json = result.config
            run.status, run.ended_at, run.heartbeat_at, run.error = RunStatus.FINISHED, ended, ended, None
            run.seconds = seconds

        self._write(f"record the results of intervention {result.run_id}", work)

    def start_attention(
        self,
        run_id: str,
        name: str,
        *,
        lens_run_id: str | None,
        store_hash: str,
        store_path: str | None,
        layers: str,
        positions: str,
        config: Mapping[str, Any],
        seed: int,
        code_version: str,
    ) -> None:
        """Record a RUNNING attention analysis of a store, with its heartbeat now.

        With a lens run it joins that run's experiment and copies its lens columns, as an intervention
        does. Without one it joins the experiment ``attention`` of its store (the store's hash is the
        experiment's config hash) and holds ``-`` in ``lens``, ``adapter``, ``split`` and ``target`` and its
        own ``layers`` and ``positions`` specs. Its device is ``cpu`` (the statistics run there).

        Raises:
            RegistryError: the run id is already recorded, the lens run is unknown or not a lens run, or the
                database fails.
        """
        started = now()

        def work(session: Session) -> None:
            _require_new(session, run_id)
            values: dict[str, Any]
            if lens_run_id is None:
                experiment = _named_experiment(session, ATTENTION_EXPERIMENT, store_hash, {"store_hash": store_hash},
                                               started)
                values = {"experiment_id": experiment, "lens": "-", "adapter": "-", "split": "-", "target": "-",
                          "layers": layers, "positions": positions}
            else:
                lens = require_run(session, lens_run_id)
                if lens.kind is not RunKind.LENS:
                    raise RegistryError(
                        f"run {lens_run_id[:12]} ({lens.name}) is of kind {lens.kind.value}, not a lens run")
                values = {"experiment_id": lens.experiment_id, "source_run_id": lens.id,
                          **{column: getattr(lens, column) for column in LENS_COLUMNS}}
            session.add(Run(
                id=run_id, name=name, status=RunStatus.RUNNING, kind=RunKind.ATTENTION, started_at=started,
                heartbeat_at=started, config_json=dict(config), seed=seed, store_hash=store_hash,
                store_path=store_path, code_version=code_version, device="cpu", **values,
            ))

        self._write(f"record the start of attention analysis {run_id}", work)

    def finish_attention(self, report: AttentionReport, seconds: float) -> None:
        """Record an attention report's rows (masses, top tokens, and the target contrast with a lens run)
        and mark the run FINISHED, in one transaction. Finishing again replaces them.

        The report's other fields (store, mode, layers, ...) go into ``config_json`` under ``report``, beside
        the settings, so that ``Registry.attention`` reads back the same report.

        Raises:
            RegistryError: the run was never started or is not an attention analysis, or the database fails.
        """
        if report.run_id is None:
            raise ValueError("finish_attention needs a report with its run_id")

        def work(session: Session) -> None:
            run = require_run(session, report.run_id or "")
            if run.kind is not RunKind.ATTENTION:
                raise RegistryError(
                    f"run {run.id[:12]} ({run.name}) is of kind {run.kind.value}, not an attention analysis")
            for table in (AttentionMassRow, AttentionTokenRow, AttentionTargetRow):
                session.execute(delete(table).where(table.run_id == run.id))
            session.execute(insert(AttentionMassRow), [
                {"run_id": run.id, "layer": row.layer, "position": position_number(row.position), "kind": kind,
                 "mass": mass}
                for row in report.kinds for kind, mass in row.mass.items()
            ])
            tokens = [
                {"run_id": run.id, "position": position_number(entry.position), "rank": rank, "token_id": token.id,
                 "token": token.token, "mass": token.mass, "problems": token.problems}
                for entry in report.top_tokens for rank, token in enumerate(entry.tokens)
            ]
            if tokens:
                session.execute(insert(AttentionTokenRow), tokens)
            if report.target:
                session.execute(insert(AttentionTargetRow), [
                    {"run_id": run.id, "position": row.position, "correct_states": row.correct_states,
                     "incorrect_states": row.incorrect_states, "absent_states": row.absent_states,
                     "problems": row.problems, "mass_correct": row.correct, "mass_incorrect": row.incorrect,
                     "difference": row.difference, "ci_low": row.low, "ci_high": row.high}
                    for row in report.target
                ])
            ended = now()
            header = report.model_dump(mode="json", exclude={"run_id", "kinds", "top_tokens", "target"})
            run.config_json = {**run.config_json, "report": header}
            run.status, run.ended_at, run.heartbeat_at, run.error = RunStatus.FINISHED, ended, ended, None
            run.seconds = seconds

        self._write(f"record the results of attention analysis {report.run_id}", work)

    def start_tinycodi(self, run_id: str, name: str, *, settings: Mapping[str, Any], settings_hash: str,
                       out: str, seed: int, code_version: str) -> None:
        """Record a RUNNING tiny-CODI training (``ctexp codi train``), with its heartbeat now.

        It joins the experiment ``tinycodi`` of its settings (their hash is the experiment's config hash, and
        the run's ``store_hash``); its lens columns hold ``-`` and ``store_path`` is the checkpoint directory.

        Raises:
            RegistryError: the run id is already recorded, or the database fails.
        """
        started = now()

        def work(session: Session) -> None:
            _require_new(session, run_id)
            experiment = _named_experiment(session, TINYCODI_EXPERIMENT, settings_hash, dict(settings), started)
            session.add(Run(
                id=run_id, name=name, status=RunStatus.RUNNING, kind=RunKind.TINYCODI, started_at=started,
                heartbeat_at=started, config_json=dict(settings), seed=seed, store_hash=settings_hash, store_path=out,
                code_version=code_version, device="cpu", experiment_id=experiment,
                **{column: "-" for column in ("lens", "adapter", "split", "target", "layers", "positions")},
            ))

        self._write(f"record the start of tiny-CODI training {run_id}", work)

    def finish_tinycodi(self, run_id: str, summary: Mapping[str, Any], seconds: float) -> None:
        """Mark a tiny-CODI training FINISHED, its summary under ``training`` in ``config_json``.

        Raises:
            RegistryError: the run was never started or is not a tiny-CODI training, or the database fails.
        """

        def work(session: Session) -> None:
            run = require_run(session, run_id)
            if run.kind is not RunKind.TINYCODI:
                raise RegistryError(f"run {run.id[:12]} ({run.name}) is of kind {run.kind.value}, not a tiny-CODI run")
            ended = now()
            run.config_json = {**run.config_json, "training": dict(summary)}
            run.status, run.ended_at, run.heartbeat_at, run.error = RunStatus.FINISHED, ended, ended, None
            run.seconds = seconds

        self._write(f"record the end of tiny-CODI training {run_id}", work)

    def end_run(self, run_id: str, status: RunStatus, error: str | None = None) -> None:
        """End a run that did not finish: FAILED, KILLED or PRUNED, with the reason. Its epochs are kept.

        A FINISHED run stays finished (so an error after ``finish_run`` cannot undo its results).

        Raises:
            ValueError: ``status`` is not FAILED, KILLED or PRUNED.
            RegistryError: the run is unknown, or the database fails.
        """
        status = RunStatus(status)
        if status not in (RunStatus.FAILED, RunStatus.KILLED, RunStatus.PRUNED):
            raise ValueError(
                f"end_run takes FAILED, KILLED or PRUNED, not {status.value}; use finish_run for results"
            )

        def work(session: Session) -> None:
            run = require_run(session, run_id)
            if run.status is not RunStatus.FINISHED:
                run.status, run.error, run.ended_at = status, error, now()

        self._write(f"record the end of run {run_id}", work)

    def mark_stale_runs(self, older_than_s: float) -> list[str]:
        """Mark FAILED ("heartbeat lost") the RUNNING runs whose last heartbeat is older than ``older_than_s``.

        Their end time is their last heartbeat, the last time they were known alive.

        Returns:
            The ids of the runs marked.
        """
        cutoff = now() - timedelta(seconds=older_than_s)
        statement = (
            update(Run)
            .where(Run.status == RunStatus.RUNNING, Run.heartbeat_at < cutoff)
            .values(status=RunStatus.FAILED, error="heartbeat lost", ended_at=Run.heartbeat_at)
            .returning(Run.id)
            .execution_options(synchronize_session=False)
        )
        return sorted(self._write("mark stale runs", lambda session: list(session.scalars(statement))))

    def delete_run(self, run_id: str) -> None:
        """Delete a run; its epochs and results go with it (foreign keys cascade in the database).

        Raises:
            RegistryError: the run is unknown, or the database fails.
        """
        def work(session: Session) -> None:
            deleted = session.execute(delete(Run).where(Run.id == run_id)).rowcount
            if not deleted:
                raise unknown_run(run_id)

        self._write(f"delete run {run_id}", work)

    def _update_run(self, run_id: str, action: str, **values: Any) -> None:
        def work(session: Session) -> None:
            if not session.execute(update(Run).where(Run.id == run_id).values(**values)).rowcount:
                raise unknown_run(run_id)

        self._write(action, work)

ATTENTION_EXPERIMENT = "attention"  # the experiment of attention analyses without a lens run
TINYCODI_EXPERIMENT = "tinycodi"  # the experiment of tiny-CODI trainings
LENS_COLUMNS = ("lens", "adapter", "split", "target", "layers", "positions")


def position_number(position: Row) -> int:
    """A report position as the attention tables hold it: bot is ``BOT_POSITION`` (-1)."""
    from ctexp.analysis.attention import BOT

    return BOT_POSITION if position == BOT else int(position)


def _intervention_row(run_id: str, ordinal: int, row: InterventionRow) -> dict[str, Any]:
    """The ``ctexp_intervention_rows`` values of an ``InterventionRow`` (position ``all`` is NULL)."""
    low, high = row.ci or (None, None)
    values = row.model_dump(exclude={"answers", "ci", "position"})
    return {**values, "run_id": run_id, "row_key": row.key, "ordinal": ordinal,
            "position": None if row.position == "all" else row.position, "ci_low": low, "ci_high": high}


def _answer_row(run_id: str, row_key: str, ordinal: int, answer: ProblemAnswer) -> dict[str, Any]:
    return {"run_id": run_id, "row_key": row_key, "ordinal": ordinal, **answer.model_dump()}


def _epoch_row(run_id: str, epoch: EpochMetrics) -> Epoch:
    """The SQL row of an epoch (per-position validation top-1 stays in result.json)."""
    return Epoch(run_id=run_id, **epoch.model_dump(exclude={"val_position_top1"}))


def _require_new(session: Session, run_id: str) -> None:
    """A run's start refuses an id that is recorded already."""
    if session.get(Run, run_id) is not None:
        raise RegistryError(f"run {run_id} is already in the results database; start a run with a new id")


def _experiment_id(session: Session, config: ExperimentConfig, created: datetime) -> int:
    """The id of the experiment ``(config.experiment, config_hash)``, created if new."""
    return _named_experiment(session, config.experiment, config.config_hash(),
                             config.model_dump(mode="json", exclude={"name", "device"}), created)


def _named_experiment(session: Session, name: str, config_hash: str, config_json: dict[str, Any],
                      created: datetime) -> int:
    """The id of the experiment ``(name, config_hash)``, created with ``config_json`` if new."""
    query = select(Experiment.id).where(Experiment.name == name, Experiment.config_hash == config_hash)
    found = session.scalar(query)
    if found is not None:
        return found
    experiment = Experiment(name=name, config_hash=config_hash, created_at=created, config_json=config_json)
    try:
        with session.begin_nested():  # a savepoint: losing a race to another writer keeps our transaction
            session.add(experiment)
    except IntegrityError:
        found = session.scalar(query)  # the other writer's row
        assert found is not None
        return found
    return experiment.id


def _headline(result: RunResult) -> dict[str, Any]:
    """The run row's headline columns: overall test metrics, baselines, training summary."""
    overall = result.overall
    low, high = overall.ci.get("top1") or (None, None)
    best = [epoch.val_loss for epoch in result.epochs if epoch.epoch == result.best_epoch]
    return {
        "test_top1": overall.top1, "test_top5": overall.top5, "test_top10": overall.top10,
        "test_loss": overall.loss, "test_top1_low": low, "test_top1_high": high,
        "prior_top1": overall.prior_top1, "identity_top1": overall.identity_top1,
        "best_val_loss": best[0] if best else min((epoch.val_loss for epoch in result.epochs), default=None),
        "best_epoch": result.best_epoch, "n_test_problems": result.data.problems.get(TEST_SPLIT),
        "n_test_states": overall.n, "seconds": result.seconds,
    }


def _result_rows(result: RunResult, grouping: Grouping) -> list[dict[str, Any]]:
    """One ``ctexp_results`` row per group of ``grouping`` in ``result``, the baselines matched by key."""
    baselines = {
        name: {grouping.key(row): row for row in baseline.rows(grouping.name)}
        for name, baseline in result.baselines.items()
    }
    rows = []
    for group in result.rows(grouping.name):
        key = grouping.key(group)
        values: dict[str, Any] = {"run_id": result.run_id, "split": TEST_SPLIT, "grouping": grouping.name,
                                  "group_key": grouping.group_key(group)}
        values |= {axis: getattr(group, axis) for axis in AXES}
        values |= {"n": group.n, "problems": group.problems, "lift_prior": group.lift_prior,
                   "lift_identity": group.lift_identity}
        for metric in METRICS:
            values[metric] = getattr(group, metric)
            values[f"{metric}_low"], values[f"{metric}_high"] = group.ci.get(metric) or (None, None)
        for name in BASELINES:
            baseline = baselines.get(name, {}).get(key)
            for metric in METRICS:
                values[f"{name}_{metric}"] = None if baseline is None else getattr(baseline, metric)
        rows.append(values)
    return rows
