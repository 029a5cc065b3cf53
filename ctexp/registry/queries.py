"""The registry's reads: runs by reference or filter, epochs, results, the best run per group, an
intervention's result and an attention analysis's report.

The records of interventions and attention analyses (numpy, their statistics) are imported by the two
reads that return them, so that ``ctexp runs``, ``show`` and ``best`` load neither.
"""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, Select, and_, func, select
from sqlalchemy.orm import Session

from ctexp.analysis.groupings import BREAKDOWNS, Grouping, grouping, names
from ctexp.analysis.result import EpochMetrics
from ctexp.errors import ConfigError, RegistryError
from ctexp.registry.database import Database, require_run
from ctexp.registry.models import (
    BOT_POSITION,
    HEADLINE_METRICS,
    HIGHER_IS_BETTER,
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
from ctexp.registry.records import BestRow, ResultRow, RunRecord

if TYPE_CHECKING:
    from ctexp.analysis.attention import AttentionReport
    from ctexp.analysis.intervention import InterventionResult, InterventionRow, ProblemAnswer

MIN_PREFIX = 4
RUN_SORTS = ("started_at", *HEADLINE_METRICS)


class RunQueries(Database):
    """The reads of runs and their results (a part of ``Registry``)."""

    def resolve(self, ref: str) -> RunRecord:
        """Find one run by a full id, a unique id prefix (4+ characters), a run name (the latest run of
        that name), an MLflow run id, or ``latest``; exact matches win over prefixes.

        Raises:
            RegistryError: nothing matches, or the prefix matches several runs (they are listed).
        """
        ref = ref.strip()
        with self._session(f"find run {ref!r}") as session:
            if ref == "latest":
                row = session.execute(_runs().order_by(Run.started_at.desc(), Run.id.desc()).limit(1)).first()
                if row is None:
                    raise RegistryError(f"the results database at {self.masked_url} holds no runs yet")
                return _record(row)
            for condition in (Run.id == ref.lower(), Run.mlflow_run_id == ref, Run.name == ref):
                row = session.execute(_runs().where(condition).order_by(Run.started_at.desc()).limit(1)).first()
                if row is not None:
                    return _record(row)
            if len(ref) >= MIN_PREFIX and re.fullmatch(r"[0-9a-fA-F]+", ref):
                query = _runs().where(Run.id.startswith(ref.lower(), autoescape=True)).order_by(Run.started_at.desc())
                rows = session.execute(query.limit(6)).all()
                if len(rows) == 1:
                    return _record(rows[0])
                if rows:
                    listed = ", ".join(f"{row.Run.id[:12]} ({row.Run.name})" for row in rows[:5])
                    more = ", ..." if len(rows) > 5 else ""
                    raise RegistryError(f"run id prefix {ref!r} is ambiguous: {listed}{more}; give more of the id")
        raise RegistryError(
            f"no run matches {ref!r}; RUN may be a run id, a unique id prefix of {MIN_PREFIX}+ characters, "
            "a run name, an MLflow run id, or 'latest'"
        )

    def list_runs(
        self,
        *,
        experiment: str | None = None,
        lens: str | None = None,
        split: str | None = None,
        target: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
        sweep_id: int | None = None,
        kind: str | None = None,
        sort: str = "started_at",
        descending: bool = True,
        limit: int | None = None,
    ) -> list[RunRecord]:
        """Runs matching every filter given, sorted by ``started_at`` or a headline metric (missing last).

        ``split`` is the split rule as written (``uniform``, ``weighted:...``); ``since`` without a
        timezone is taken as UTC; ``kind`` is ``lens`` or ``intervention`` (an intervention matches the
        lens filters by the lens run it is of).

        Raises:
            RegistryError: an unknown ``sort``, ``status`` or ``kind`` (the choices are listed).
        """
        if sort not in RUN_SORTS:
            raise RegistryError(f"cannot sort runs by {sort!r}; choose one of: {', '.join(RUN_SORTS)}")
        query = _runs().where(*_run_filters(experiment=experiment, lens=lens, split=split, target=target))
        if status is not None:
            query = query.where(Run.status == _status(status))
        if since is not None:
            query = query.where(Run.started_at >= _as_utc(since))
        if sweep_id is not None:
            query = query.where(Run.sweep_id == sweep_id)
        if kind is not None:
            query = query.where(Run.kind == _kind(kind))
        column = getattr(Run, sort)
        query = query.order_by((column.desc() if descending else column.asc()).nulls_last(), Run.id)
        if limit is not None:
            query = query.limit(limit)
        with self._session("list runs") as session:
            return [_record(row) for row in session.execute(query)]

    def epochs(self, run_id: str) -> list[EpochMetrics]:
        """A run's epochs, in order.

        Raises:
            RegistryError: the run is unknown.
        """
        with self._session(f"read the epochs of run {run_id}") as session:
            require_run(session, run_id)
            epochs = session.scalars(select(Epoch).where(Epoch.run_id == run_id).order_by(Epoch.epoch))
            return [EpochMetrics.model_validate(epoch, from_attributes=True) for epoch in epochs]

    def results(self, run_id: str, by: str) -> list[ResultRow]:
        """A run's test results of one grouping (``layer``, ``position``, ``cell``, ...), ordered by its keys.

        Raises:
            RegistryError: the run or the grouping is unknown.
        """
        grouping = _breakdown(by)
        with self._session(f"read the results of run {run_id}") as session:
            require_run(session, run_id)
            return _result_rows(session, run_id, grouping)

    def breakdowns(self, run_id: str) -> dict[str, list[ResultRow]]:
        """A run's test results of every grouping in ``BREAKDOWNS``, by grouping name, in one transaction.

        Raises:
            RegistryError: the run is unknown.
        """
        with self._session(f"read the results of run {run_id}") as session:
            require_run(session, run_id)
            return {grouping.name: _result_rows(session, run_id, grouping) for grouping in BREAKDOWNS}

    def best(
        self,
        by: str,
        metric: str = "top1",
        *,
        experiment: str | None = None,
        lens: str | None = None,
        split: str | None = None,
        target: str | None = None,
        split_name: str = TEST_SPLIT,
    ) -> list[BestRow]:
        """For each group of a grouping (each layer, position, cell, ...): the finished run with the best ``metric``.

        Best is highest for top-k and lowest for loss; ties go to the earlier run. One SQL query: the
        best value per group (``MAX``/``MIN`` with ``GROUP BY``), then a ``ROW_NUMBER()`` window over the
        runs that reach it (the ties only), joined to their results by primary key. A window over every
        (run, group) row was twice as slow: its sort costs by the rows, the aggregate does not sort.

        Args:
            by: the grouping, one of ``BREAKDOWNS`` (``layer``, ``position``, ``cell``).
            metric: ``top1``, ``top5``, ``top10`` or ``loss``.
            experiment, lens, split, target: keep only runs of this experiment name, lens kind, split
                rule and target rule.
            split_name: the evaluated data split the results are of.

        Raises:
            RegistryError: an unknown grouping or metric.
        """
        if metric not in METRICS:
            raise RegistryError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
        grouping = _breakdown(by)
        names = grouping.keys
        keys = [getattr(Result, key) for key in names]
        value = getattr(Result, metric)
        of_grouping = (Result.grouping == grouping.name, Result.split == split_name)

        def eligible(*columns: Any) -> Select:
            """``columns`` of the grouping's results of finished runs that pass the filters."""
            query = (
                select(*columns)
                .join(Run, Run.id == Result.run_id)
                .where(*of_grouping, Run.status == RunStatus.FINISHED, value.is_not(None))
                .where(*_run_filters(lens=lens, split=split, target=target))
            )
            if experiment is not None:
                query = query.join(Experiment, Experiment.id == Run.experiment_id).where(Experiment.name == experiment)
            return query

        best_value = (func.max if HIGHER_IS_BETTER[metric] else func.min)(value)
        bests = eligible(*keys, best_value.label("best")).group_by(*keys).subquery()
        rank = func.row_number().over(partition_by=keys, order_by=(Run.started_at, Run.id))
        reaching = [key == bests.c[name] for key, name in zip(keys, names, strict=True)]
        ranked = (
            eligible(*keys, Run.id.label("run_id"), rank.label("rank"))
            .join(bests, and_(*reaching, value == bests.c.best))
            .subquery()
        )
        same_group = [getattr(Result, key) == ranked.c[key] for key in names]
        query = (
            select(
                *(ranked.c[key] for key in names), value.label("value"),
                getattr(Result, f"{metric}_low").label("low"), getattr(Result, f"{metric}_high").label("high"),
                Result.n, ranked.c.run_id, Run.name.label("run_name"), Experiment.name.label("experiment"),
                Run.lens, Run.adapter, Run.split.label("split_rule"), Run.target,
            )
            .select_from(ranked)
            .join(Result, and_(Result.run_id == ranked.c.run_id, *of_grouping, *same_group))
            .join(Run, Run.id == ranked.c.run_id)
            .join(Experiment, Experiment.id == Run.experiment_id)
            .where(ranked.c.rank == 1)
            .order_by(*(ranked.c[key] for key in names))
        )
        with self._session(f"find the best runs by {grouping.name}") as session:
            return [
                BestRow(
                    **{key: getattr(row, key) for key in names}, metric=metric, value=row.value,
                    low=row.low, high=row.high, n=row.n, run_id=row.run_id, run_name=row.run_name,
                    experiment=row.experiment, lens=row.lens, adapter=row.adapter, split=row.split_rule,
                    target=row.target,
                )
                for row in session.execute(query)
            ]

    def intervention(self, run_id: str) -> InterventionResult:
        """A finished intervention's result as ``ctexp intervene`` computed it: control, rows and every answer.

        Raises:
            RegistryError: the run is unknown, not an intervention, or not finished.
        """
        from ctexp.analysis.intervention import CONTROL_KEY, InterventionResult, ProblemAnswer, summarize_control

        with self._session(f"read the intervention {run_id}") as session:
            run = require_run(session, run_id)
            if run.kind is not RunKind.INTERVENTION:
                raise RegistryError(f"run {run.id[:12]} ({run.name}) is of kind {run.kind.value}, not an intervention")
            if run.status is not RunStatus.FINISHED:
                raise RegistryError(
                    f"intervention {run.id[:12]} ({run.name}) is {run.status.value}; only a finished one has results"
                )
            answers: dict[str, list[ProblemAnswer]] = defaultdict(list)
            query = select(InterventionAnswer).where(InterventionAnswer.run_id == run_id)
            for answer in session.scalars(query.order_by(InterventionAnswer.row_key, InterventionAnswer.ordinal)):
                answers[answer.row_key].append(ProblemAnswer.model_validate(answer, from_attributes=True))
            rows = session.scalars(select(InterventionRowResult).where(InterventionRowResult.run_id == run_id)
                                   .order_by(InterventionRowResult.ordinal))
            return InterventionResult(
                run_id=run.id, lens_run=run.config_json["run"], config=run.config_json,
                control=summarize_control(answers[CONTROL_KEY]),
                rows=[_intervention_row(row, answers[row.row_key]) for row in rows],
            )

    def attention(self, run_id: str) -> AttentionReport:
        """A finished attention analysis's report as ``ctexp attention`` computed it (with its ``run_id``).

        Raises:
            RegistryError: the run is unknown, not an attention analysis, or not finished.
        """
        from ctexp.analysis.attention import (
            BOT,
            KIND_COLUMNS,
            AttentionReport,
            KindMass,
            TargetContrast,
            TokenMass,
            TopTokens,
        )

        with self._session(f"read the attention analysis {run_id}") as session:
            run = require_run(session, run_id)
            if run.kind is not RunKind.ATTENTION:
                raise RegistryError(
                    f"run {run.id[:12]} ({run.name}) is of kind {run.kind.value}, not an attention analysis")
            if run.status is not RunStatus.FINISHED:
                raise RegistryError(
                    f"attention analysis {run.id[:12]} ({run.name}) is {run.status.value}; only a finished one "
                    "has results"
                )
            header = run.config_json["report"]
            masses = {(row.layer, row.position, row.kind): row.mass for row in
                      session.scalars(select(AttentionMassRow).where(AttentionMassRow.run_id == run_id))}
            tokens: dict[int, list[TokenMass]] = defaultdict(list)
            query = select(AttentionTokenRow).where(AttentionTokenRow.run_id == run_id)
            for token in session.scalars(query.order_by(AttentionTokenRow.position, AttentionTokenRow.rank)):
                tokens[token.position].append(TokenMass(id=token.token_id, token=token.token, mass=token.mass,
                                                        problems=token.problems))
            targets = session.scalars(select(AttentionTargetRow).where(AttentionTargetRow.run_id == run_id)
                                      .order_by(AttentionTargetRow.position))
            target = [TargetContrast(
                position=row.position, correct_states=row.correct_states, incorrect_states=row.incorrect_states,
                absent_states=row.absent_states, problems=row.problems, correct=row.mass_correct,
                incorrect=row.mass_incorrect, difference=row.difference, low=row.ci_low, high=row.ci_high,
            ) for row in targets]
        numbers = [(position, BOT_POSITION if position == BOT else int(position)) for position in header["positions"]]
        return AttentionReport.model_validate({
            **header, "run_id": run_id,
            "kinds": [KindMass(layer=layer, position=position, problems=header["problems"],
                               mass={kind: masses[(layer, number, kind)] for kind in KIND_COLUMNS})
                      for layer in header["layers"] for position, number in numbers],
            "top_tokens": [TopTokens(position=position, tokens=tokens[number]) for position, number in numbers],
            "target": target if header.get("run") is not None else None,
        })

    def list_trials(self, sweep_id: int) -> list[RunRecord]:
        """The runs of a sweep's trials, by trial number (a retried trial's runs in start order)."""
        query = _runs().where(Run.sweep_id == sweep_id).order_by(Run.trial_number, Run.started_at, Run.id)
        with self._session(f"list the trials of sweep {sweep_id}") as session:
            return [_record(row) for row in session.execute(query)]


def parse_since(text: str) -> datetime:
    """``2026-11-30``, ``2026-11-30T08:00``, or a relative ``90m`` / ``12h`` / ``7d`` (UTC): ``--since``.

    Raises:
        ConfigError: none of these.
    """
    relative = re.fullmatch(r"(\d+)\s*([mhd])", text.strip())
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        delta = {"m": timedelta(minutes=amount), "h": timedelta(hours=amount), "d": timedelta(days=amount)}[unit]
        return datetime.now(UTC) - delta
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r} is not a date; use 2026-11-30, 2026-11-30T08:00, 90m, 12h or 7d") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _status(text: str) -> RunStatus:
    try:
        return RunStatus(str(text).upper())
    except ValueError:
        raise RegistryError(
            f"unknown run status {text!r}; choose one of: {', '.join(status.value for status in RunStatus)}"
        ) from None


def _kind(text: str) -> RunKind:
    try:
        return RunKind(str(text).lower())
    except ValueError:
        raise RegistryError(f"unknown run kind {text!r}; choose one of: {', '.join(kind.value for kind in RunKind)}") from None


def _intervention_row(row: InterventionRowResult, answers: list[ProblemAnswer]) -> InterventionRow:
    from ctexp.analysis.intervention import InterventionRow

    ci = None if row.ci_low is None or row.ci_high is None else (row.ci_low, row.ci_high)
    return InterventionRow(
        position="all" if row.position is None else row.position, mode=row.mode, site=row.site, layer=row.layer,
        n=row.n, accuracy=row.accuracy, control_accuracy=row.control_accuracy, delta=row.delta, ci=ci,
        changed=row.changed, lost=row.lost, gained=row.gained, p_value=row.p_value, p_holm=row.p_holm,
        significant=row.significant, answers=answers,
    )


def _breakdown(by: str) -> Grouping:
    try:
        return grouping(by, BREAKDOWNS)
    except KeyError:
        raise RegistryError(f"unknown breakdown {by!r}; choose one of: {', '.join(names(BREAKDOWNS))}") from None


def _result_rows(session: Session, run_id: str, grouping: Grouping) -> list[ResultRow]:
    keys = [getattr(Result, key) for key in grouping.keys]
    query = select(Result).where(Result.run_id == run_id, Result.grouping == grouping.name)
    rows = session.scalars(query.order_by(Result.split, *keys))
    return [ResultRow.model_validate(row, from_attributes=True) for row in rows]


def _runs() -> Select[tuple[Run, str]]:
    return select(Run, Experiment.name.label("experiment")).join(Experiment, Experiment.id == Run.experiment_id)


def _run_filters(**equal: str | None) -> list[Any]:
    """Equality filters on runs; ``experiment`` is the experiment's name, the rest are run columns."""
    conditions = []
    for field, value in equal.items():
        if value is None:
            continue
        # str(): a StrEnum (LensKind.LAYER) compares by its value, whatever the driver does with enums.
        column = Experiment.name if field == "experiment" else getattr(Run, field)
        conditions.append(column == str(value))
    return conditions


def _record(row: Row[Any]) -> RunRecord:
    run: Run = row.Run
    values = {name: getattr(run, name) for name in RunRecord.model_fields if name not in ("experiment", "config")}
    return RunRecord(**values, experiment=row.experiment, config=run.config_json)
