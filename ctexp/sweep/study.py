"""Sweeps: an Optuna study over an experiment's search space, every trial a recorded ctexp run.

``run_sweep`` is what ``ctexp sweep`` calls. It checks everything first (experiment, search space,
objective, store, results database, MLflow), opens or resumes the study and its ``ctexp_sweeps`` row
and parent MLflow run, then runs trials in this process or in N spawned worker processes. Each worker
loads the store once and keeps one ``Recorder`` for all its trials, so every trial is a row in
``ctexp_runs`` (``sweep_id``, ``trial_number``) and a child MLflow run of the sweep's parent run.

Exactly ``n_trials``: a worker starts a trial only while the study holds fewer than ``n_trials``
complete, pruned, running or waiting trials, and it checks and asks under a lock shared by every
worker of the study (a file lock beside a journal or SQLite storage, a PostgreSQL advisory lock), so
that workers on one machine or many never overshoot. Failed trials do not count; the loop goes on
until ``n_trials`` are complete or pruned, the timeout passes, or trials keep failing.

Dead workers: a trial whose worker died (``kill -9``, a lost machine) is failed and retried with the
same parameters (``RetryHeartbeatStaleTrialCallback``, as a WAITING trial), never left RUNNING. It is
found dead when its worker process, on this machine, is gone; when its ctexp run is no longer RUNNING
(the registry fails runs whose heartbeat is 5 minutes old, on any machine); or, with an RDB storage,
by Optuna's own heartbeat (JournalStorage has none in Optuna 5). Its ctexp run is marked FAILED
(``sweep_recovery``; the storages and the lock are in ``sweep_storage``).

The objective of a trial is its value at its best epoch (lowest validation loss: the checkpoint early
stopping keeps, which ``ctexp run --config best.toml`` reproduces), never the test split. Each epoch
reports the value the trial would have if it stopped then, and the pruner compares those.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import queue as queue_module
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from ctexp.analysis.result import EpochMetrics
from ctexp.config import ExperimentConfig, LensKind, parse_index_spec, to_toml
from ctexp.errors import ConfigError, CtexpError, Interrupted, RegistryError
from ctexp.records import FrozenRecord
from ctexp.registry.locations import Locations
from ctexp.sweep.recovery import RUN_ATTR, WORKER_ATTR, WorkerId, recover
from ctexp.sweep.space import SearchSpace, apply_overrides
from ctexp.sweep.storage import (
    SweepLock,
    mask_storage,
    open_storage,
    quiet_optuna,
    resolve_storage,
    storage_kind,
)

if TYPE_CHECKING:
    import optuna

    from ctexp.experiment.pipeline import Prepared
    from ctexp.experiment.recorder import Recorder
    from ctexp.registry.db import Registry
    from ctexp.registry.records import RunRecord, SweepRecord

DEFAULT_N_TRIALS = 20
MAX_CONSECUTIVE_FAILURES = 3  # a worker stops after this many failed trials in a row ...
MAX_CONSECUTIVE_INVALID = 20  # ... or this many trials whose values made no valid experiment
INTERRUPTED_CODES = (130, 143)  # Ctrl-C, SIGTERM
POLL_S = 1.0  # how often an idle worker, or the launcher, looks at the study
TOP_TRIALS = 5
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Trial user attributes written by ctexp (shown by optuna-dashboard, too).
OVERRIDES_ATTR, ERROR_ATTR = "ctexp_overrides", "ctexp_error"  # and sweep_recovery's WORKER_ATTR, RUN_ATTR
INVALID_ATTR = "ctexp_invalid"  # the trial's values made no valid experiment; it never ran
DEFINITION_ATTR = "ctexp_definition"  # study user attribute: what the sweep searches, to refuse a changed rerun


class SamplerKind(StrEnum):
    TPE = "tpe"  # Optuna's TPESampler (constant liar, for parallel workers)
    RANDOM = "random"
    GRID = "grid"  # every combination of finite values


class PrunerKind(StrEnum):
    MEDIAN = "median"
    HYPERBAND = "hyperband"
    NONE = "none"


class ObjectiveKind(StrEnum):
    VAL_TOP1 = "val_top1"
    VAL_LOSS = "val_loss"
    POSITIONS = "positions"


class Objective(FrozenRecord):
    """What a sweep optimises, on the validation split: ``val_top1`` (maximise), ``val_loss``
    (minimise) or ``positions:SPEC`` (the mean validation top-1 of those positions, maximise)."""

    kind: ObjectiveKind = ObjectiveKind.VAL_TOP1
    positions: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind is ObjectiveKind.POSITIONS:
            return "positions:" + ",".join(map(str, self.positions))
        return self.kind.value

    @property
    def direction(self) -> str:
        return "minimize" if self.kind is ObjectiveKind.VAL_LOSS else "maximize"

    def epoch_value(self, epoch: EpochMetrics) -> float:
        """The objective on one epoch's validation metrics.

        Raises:
            ConfigError: a position of the objective has no validation states.
        """
        if self.kind is ObjectiveKind.VAL_LOSS:
            return epoch.val_loss
        if self.kind is ObjectiveKind.VAL_TOP1:
            return epoch.val_top1
        missing = [p for p in self.positions if p not in epoch.val_position_top1]
        if missing:
            raise ConfigError(
                f"objective {self}: position {missing[0]} has no validation states in this experiment "
                "(check --positions and the split)"
            )
        return sum(epoch.val_position_top1[p] for p in self.positions) / len(self.positions)

    def value_so_far(self, epochs: list[EpochMetrics]) -> float:
        """The value the trial would have if it stopped now: at its best epoch so far (lowest val loss,
        the earliest on ties, as early stopping keeps it)."""
        best = min(epochs, key=lambda epoch: (epoch.val_loss, epoch.epoch))
        return self.epoch_value(best)


def parse_objective(text: str) -> Objective:
    """``val_top1``, ``val_loss`` or ``positions:2-3``.

    Raises:
        ConfigError: anything else.
    """
    text = text.strip()
    if text in (ObjectiveKind.VAL_TOP1, ObjectiveKind.VAL_LOSS):
        return Objective(kind=ObjectiveKind(text))
    if text.startswith("positions:"):
        try:
            positions = parse_index_spec(text.removeprefix("positions:"), upper=None)
        except ValueError as error:
            raise ConfigError(f"--objective {text!r}: {error}") from None
        if positions is None:
            return Objective(kind=ObjectiveKind.VAL_TOP1)  # positions:all is every position
        return Objective(kind=ObjectiveKind.POSITIONS, positions=tuple(positions))
    raise ConfigError(f"unknown objective {text!r}; use val_top1, val_loss or positions:SPEC (e.g. positions:2-3)")


def parse_choice(kind: type[StrEnum], text: str, flag: str) -> Any:
    try:
        return kind(text.strip().lower())
    except ValueError:
        raise ConfigError(f"unknown {flag} {text!r}; choose one of: {', '.join(k.value for k in kind)}") from None


# ---------------------------------------------------------------------------------------------------------
# What a sweep is


class SweepRequest(FrozenRecord):
    """A sweep as asked for: the base experiment, the space, and how to search it."""

    base: ExperimentConfig
    space: SearchSpace
    objective: Objective = Field(default_factory=Objective)
    sampler: SamplerKind = SamplerKind.TPE
    pruner: PrunerKind = PrunerKind.MEDIAN
    seed: int = 0
    n_trials: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0)
    workers: int = Field(1, ge=1)
    name: str | None = None
    storage: str | None = None
    best_out: str | None = None

    def definition(self) -> dict[str, Any]:
        """What identifies the sweep: rerunning with the same definition resumes it."""
        return {
            "experiment": self.base.experiment,
            "base_config": self.base.model_dump(mode="json", exclude={"name", "device"}),
            "search_space": self.space.model_dump(mode="json"),
            "objective": str(self.objective),
        }

    def default_name(self) -> str:
        canonical = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"))
        return f"sweep-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


class SweepPlan(FrozenRecord):
    """Everything a worker needs, passed to spawned workers as JSON."""

    name: str
    storage: str
    base: ExperimentConfig
    space: SearchSpace
    objective: Objective
    sampler: SamplerKind
    pruner: PrunerKind
    seed: int
    n_trials: int
    deadline: float | None  # time.time() after which no trial starts
    sweep_id: int
    parent_run_id: str | None
    home: str
    db_url: str
    tracking_uri: str

    @property
    def locations(self) -> Locations:
        return Locations(Path(self.home), self.db_url, self.tracking_uri)


class Counts(FrozenRecord):
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def done(self) -> int:
        return self.complete + self.pruned


class TrialRow(FrozenRecord):
    """One trial as a summary shows it."""

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    run_id: str | None
    run_status: str | None
    epochs: int
    seconds: float | None
    error: str | None
    retry_of: int | None


class SweepSummary(FrozenRecord):
    """A sweep's state: what ``ctexp sweep`` prints at the end and ``ctexp sweep --show`` prints."""

    sweep: dict[str, Any]
    n_trials: int
    counts: Counts
    best: TrialRow | None
    top: list[TrialRow]
    trials: list[TrialRow]
    best_config: dict[str, Any] | None
    best_toml: str | None = None
    importances: dict[str, float] | None = None
    importance_evaluator: str | None = None
    importance_note: str | None = None
    seconds: float | None = None
    warnings: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Samplers, pruners, the study


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number``: the same trial draws the same, whichever worker asks."""
    return (seed * 1_000_003 + number * 7_919) % 2**32


def make_sampler(plan: SweepPlan, number: int) -> optuna.samplers.BaseSampler:
    """A sampler for the next trial, seeded by the sweep's seed and the trial's number (the grid sampler
    by the sweep's seed alone: it sets the grid's order, and trial k takes grid point k).

    TPE starts after ``max(3, min(10, n_trials // 3))`` random trials and uses a constant liar so that
    parallel workers spread out.
    """
    import optuna

    seed = trial_seed(plan.seed, number)
    with quiet_optuna():
        if plan.sampler is SamplerKind.RANDOM:
            return optuna.samplers.RandomSampler(seed=seed)
        if plan.sampler is SamplerKind.GRID:  # one seed for every trial: it shuffles the grid's order
            return optuna.samplers.GridSampler(plan.space.grid(), seed=plan.seed)
        return optuna.samplers.TPESampler(
            seed=seed, constant_liar=True, n_startup_trials=max(3, min(10, plan.n_trials // 3)),
        )


def make_pruner(kind: PrunerKind, base: ExperimentConfig, space: SearchSpace, n_trials: int) -> optuna.pruners.BasePruner:
    """The pruner, fed the objective after every epoch.

    ``median``: a trial stops when its value so far is worse than the median of the complete trials'
    at the same epoch, once ``max(2, min(5, n_trials // 4))`` trials are complete, and not before it
    has trained ``patience`` epochs (the horizon early stopping gives a trial to improve).
    ``hyperband``: successive halving over 1..epochs (reduction factor 3).
    """
    import optuna

    if kind is PrunerKind.NONE:
        return optuna.pruners.NopPruner()
    if kind is PrunerKind.HYPERBAND:
        epochs = base.train.epochs
        param = space.params.get("train.epochs")
        if param is not None:
            values = param.grid() or [param.high]
            epochs = int(max(float(v) for v in values))  # type: ignore[arg-type]
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, epochs), reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, n_trials // 4)),
                                       n_warmup_steps=base.train.patience)


def counts_of(study: optuna.Study) -> Counts:
    from optuna.trial import TrialState

    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
             TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    values = dict.fromkeys(names.values(), 0)
    for trial in study.get_trials(deepcopy=False):
        values[names[trial.state]] += 1
    return Counts(**values)


def best_of(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    return min(complete, key=lambda t: (sign * float(t.value), t.number))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# The worker loop


class WorkerReport(FrozenRecord):
    index: int
    trials: int
    error: str | None = None
    exit_code: int = 0


class _Stop(Exception):
    """Ends the worker loop with an error message."""


def run_worker(
    plan: SweepPlan,
    index: int = 0,
    prepared: Prepared | None = None,
    on_trial: Callable[[], None] | None = None,
) -> WorkerReport:
    """Run trials until the study holds ``n_trials`` complete or pruned ones, the deadline passes, or
    trials keep failing. Loads the store once (unless given) and records every trial as a ctexp run.

    Args:
        plan: the sweep.
        index: this worker's number (for messages).
        prepared: the store and tokenizer, already loaded (in-process sweeps reuse the launcher's).
        on_trial: called after every trial (progress).
    """
    import optuna

    from ctexp.experiment.pipeline import prepare
    from ctexp.experiment.recorder import Recorder

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(plan.storage)
    with quiet_optuna():
        study = optuna.load_study(
            study_name=plan.name, storage=storage,
            pruner=make_pruner(plan.pruner, plan.base, plan.space, plan.n_trials),
        )
    me = WorkerId.current()
    lock = SweepLock(plan.storage, plan.name)
    trials = failures = invalid = 0
    last_error = ""
    try:
        with Recorder(plan.locations) as recorder:
            prepared = prepared or prepare(plan.base)
            n_positions = prepared.store.meta.n_positions
            while plan.deadline is None or time.time() < plan.deadline:
                with lock.held():
                    recover(study, recorder.registry, recorder.tracker, plan.sweep_id, me)
                    counts = counts_of(study)
                    if counts.done >= plan.n_trials:
                        break
                    if failures >= MAX_CONSECUTIVE_FAILURES:
                        raise _Stop(f"{failures} trials failed in a row; the last: {last_error}")
                    if invalid >= MAX_CONSECUTIVE_INVALID:
                        raise _Stop(f"the search space made {invalid} invalid experiments in a row; the last: {last_error}")
                    idle = counts.waiting == 0 and counts.done + counts.running >= plan.n_trials
                    if not idle:
                        finished = _one_trial(study, plan, recorder, prepared, n_positions, lock, me)
                        trials += 1
                if idle:
                    time.sleep(POLL_S)  # others run the last trials; wait in case one dies
                    continue
                if finished.state.name == "FAIL":
                    last_error = finished.user_attrs.get(ERROR_ATTR, "unknown error")
                    if finished.user_attrs.get(INVALID_ATTR):
                        invalid += 1
                    else:
                        failures += 1
                else:
                    failures = invalid = 0
                if on_trial is not None:
                    on_trial()
    except _Stop as stop:
        return WorkerReport(index=index, trials=trials, error=str(stop), exit_code=1)
    finally:
        lock.close()
    return WorkerReport(index=index, trials=trials)


def _one_trial(
    study: optuna.Study, plan: SweepPlan, recorder: Recorder, prepared: Prepared, n_positions: int,
    lock: SweepLock, me: WorkerId,
) -> optuna.trial.FrozenTrial:
    """Ask for one trial (under the lock, which the objective releases once the trial is noted) and run it."""
    import optuna

    from ctexp.experiment.pipeline import plan_run
    from ctexp.experiment.recorder import RunPruned

    finished: list[optuna.trial.FrozenTrial] = []
    interrupted: list[Interrupted] = []

    def objective(trial: optuna.trial.Trial) -> float:
        try:
            recorded = plan.space.suggest(trial)
            overrides = plan.space.overrides(recorded, n_positions)
            run_id = uuid.uuid4().hex
            trial.set_user_attr(WORKER_ATTR, me.model_dump())
            trial.set_user_attr(RUN_ATTR, run_id)
            trial.set_user_attr(OVERRIDES_ATTR, overrides)
        finally:
            lock.release()  # the trial is noted: other workers may ask now
        history: list[EpochMetrics] = []

        def on_epoch(epoch: EpochMetrics) -> None:
            history.append(epoch)
            trial.report(plan.objective.value_so_far(history), epoch.epoch)
            if trial.should_prune():
                raise RunPruned(f"pruned at epoch {epoch.epoch} by the {plan.pruner.value} pruner")

        try:
            config = apply_overrides(plan.base, {**overrides, "name": f"{plan.name}-t{trial.number}"},
                                     f"trial {trial.number}")
        except ConfigError as error:  # a combination of values that is no experiment (lens x adapter)
            trial.set_user_attr(ERROR_ATTR, str(error))
            trial.set_user_attr(INVALID_ATTR, True)
            raise
        try:
            result = recorder.run(
                config, plan=plan_run(config, prepared), on_epoch=on_epoch, parent_mlflow_run_id=plan.parent_run_id,
                sweep_id=plan.sweep_id, trial_number=trial.number, run_id=run_id,
                extra_tags={"ctexp.sweep": plan.name, "ctexp.trial_number": str(trial.number),
                            **{f"ctexp.search.{key}": str(value) for key, value in recorded.items()}},
            )
            if not result.epochs:
                raise ConfigError(f"trial {trial.number} trained nothing (lens {config.lens.value}); nothing to compare")
            return plan.objective.value_so_far(result.epochs)
        except RunPruned as pruned:
            raise optuna.TrialPruned(str(pruned)) from None
        except Interrupted as stop:  # Ctrl-C or SIGTERM: the run is KILLED, the trial FAIL; then stop
            interrupted.append(stop)
            trial.set_user_attr(ERROR_ATTR, str(stop))
            raise
        except Exception as error:
            trial.set_user_attr(ERROR_ATTR, _one_line(error))
            raise

    study.sampler = make_sampler(plan, len(study.get_trials(deepcopy=False)))
    study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda _, trial: finished.append(trial)])
    if interrupted:
        raise interrupted[0]
    if not finished:
        raise CtexpError(f"sweep {plan.name}: Optuna ran no trial (the study was stopped)")
    return finished[0]


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    return (f"{type(error).__name__}: {message}" if not isinstance(error, CtexpError) else message)[:500]


def _worker_process(plan_json: str, index: int, threads: int, reports: Any) -> None:
    """A spawned worker: run ``run_worker`` and put its report (or its error) on the queue."""
    import torch

    from ctexp.experiment.recorder import sigterm_as_interrupt

    torch.set_num_threads(threads)
    plan = SweepPlan.model_validate_json(plan_json)
    try:
        with sigterm_as_interrupt():
            report = run_worker(plan, index)
    except CtexpError as error:
        report = WorkerReport(index=index, trials=0, error=str(error), exit_code=error.exit_code)
    except KeyboardInterrupt:
        report = WorkerReport(index=index, trials=0, error="interrupted", exit_code=130)
    except Exception as error:  # noqa: BLE001 - a bug: report it in one line, as the CLI would
        report = WorkerReport(index=index, trials=0, error=f"internal error {_one_line(error)}", exit_code=1)
    reports.put(report.model_dump_json())


# ---------------------------------------------------------------------------------------------------------
# Launching


class Progress(FrozenRecord):
    """What the live display shows."""

    n_trials: int
    counts: Counts
    best_value: float | None
    best_trial: int | None


def run_sweep(
    request: SweepRequest,
    locations: Locations,
    on_start: Callable[[SweepPlan], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> SweepSummary:
    """Check, open or resume, run and summarise a sweep.

    Args:
        request: the sweep.
        locations: home, results database, MLflow.
        on_start: called once everything is checked, before the first trial.
        on_progress: called with the study's counts and best value as trials end.

    Raises:
        ConfigError: bad input (before any trial runs), or a study of that name with another definition.
        RegistryError, TrackingError: a store cannot be reached.
        CtexpError: trials kept failing (the sweep is left resumable).
    """
    import optuna

    from ctexp.experiment.pipeline import plan_run, prepare
    from ctexp.experiment.recorder import Recorder, sigterm_as_interrupt

    started = time.monotonic()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    name = request.name or request.default_name()
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"--study {name!r}: use letters, digits, '.', '_' and '-' (up to 100, starting alphanumeric)")
    storage = resolve_storage(request.storage, locations.home)
    storage_kind(storage)
    n_trials = request.n_trials or DEFAULT_N_TRIALS
    notes: list[str] = []
    if request.sampler is SamplerKind.GRID:
        grid = request.space.grid()
        size = math.prod(len(values) for values in grid.values())
        if request.n_trials is None or n_trials > size:
            if request.n_trials is not None:
                notes.append(f"the grid has {size} points: n_trials {n_trials} -> {size}")
            n_trials = size

    # Check everything before the first trial: experiment, space, objective, then the stores.
    prepared = prepare(request.base)
    plan_run(request.base, prepared)
    meta = prepared.store.meta
    _check_request(request, meta.n_positions, meta.n_states)
    if request.sampler is SamplerKind.GRID:
        _check_grid(request, meta.n_positions)

    with Recorder(locations) as recorder:
        optuna_storage = open_storage(storage)
        study = _open_study(request, name, optuna_storage, storage)
        sweep = _open_sweep(request, name, storage, n_trials, recorder)
        parent = _parent_run(request, sweep, recorder)
        deadline = None if request.timeout is None else time.time() + request.timeout
        plan = SweepPlan(
            name=name, storage=storage, base=request.base, space=request.space, objective=request.objective,
            sampler=request.sampler, pruner=request.pruner, seed=request.seed, n_trials=n_trials, deadline=deadline,
            sweep_id=sweep.id, parent_run_id=parent, home=str(locations.home), db_url=locations.db_url,
            tracking_uri=locations.tracking_uri,
        )
        lock = SweepLock(storage, name)
        try:
            with lock.held():
                recover(study, recorder.registry, recorder.tracker, sweep.id, WorkerId.current())
        finally:
            lock.close()
        if on_start is not None:
            on_start(plan)

        def progress() -> None:
            if on_progress is not None:
                best = best_of(study)
                on_progress(Progress(n_trials=n_trials, counts=counts_of(study),
                                     best_value=None if best is None else best.value,
                                     best_trial=None if best is None else best.number))

        progress()
        reports: list[WorkerReport] = []
        try:
            with sigterm_as_interrupt():
                if request.workers == 1:
                    reports.append(run_worker(plan, 0, prepared, on_trial=progress))
                else:
                    del prepared  # the workers load their own
                    reports = _run_processes(plan, request.workers, progress)
        except BaseException as error:
            with contextlib.suppress(Exception):  # record how far it got; the original error wins
                _finish(study, plan, sweep, recorder, reports, True, request, notes)
            if isinstance(error, (KeyboardInterrupt, Interrupted)):
                raise _interrupted(error, name, counts_of(study).done, n_trials) from None
            raise
        summary = _finish(study, plan, sweep, recorder, reports, False, request, notes)
        summary = summary.model_copy(update={"seconds": round(time.monotonic() - started, 1)})
    errors = [report for report in reports if report.error]
    if errors and summary.counts.done < n_trials:
        first = errors[0]
        error = CtexpError(
            f"sweep {name}: worker {first.index} stopped: {first.error}; {summary.counts.done} of {n_trials} trials "
            "are done, and the same command resumes the sweep"
        )
        error.exit_code = first.exit_code or 1
        raise error
    return summary


def _interrupted(error: BaseException, name: str, done: int, n_trials: int) -> Interrupted:
    """Ctrl-C or SIGTERM as one line (exit 130 or 143): where the sweep stands, and how to resume it."""
    from ctexp.experiment.recorder import Terminated

    code = error.exit_code if isinstance(error, Interrupted) else (143 if isinstance(error, Terminated) else 130)
    how = "terminated (SIGTERM)" if code == 143 else "interrupted"
    return Interrupted(
        f"{how}: sweep {name} stopped with {done} of {n_trials} trials done (running trials recorded as KILLED); "
        "the same command resumes it", code,
    )


def _check_request(request: SweepRequest, n_positions: int, n_states: int) -> None:
    base = request.base
    lens = request.space.params.get("lens")
    lenses = [lens.value(label) for label in lens.labels] if lens is not None else [base.lens.value]
    if LensKind.IDENTITY.value in lenses:
        raise ConfigError("the identity lens trains nothing, so a sweep has nothing to compare; search trained lenses")
    request.space.check(base, n_positions, n_states)
    if request.objective.kind.value == "positions":
        beyond = [p for p in request.objective.positions if p >= n_positions]
        if beyond:
            raise ConfigError(f"--objective {request.objective}: position {beyond[0]} is beyond the store's 0-{n_positions - 1}")
        if "positions" not in request.space.params:
            selected = parse_index_spec(base.positions, n_positions) or []
            missing = [p for p in request.objective.positions if p not in selected]
            if missing:
                raise ConfigError(
                    f"--objective {request.objective}: position {missing[0]} is not among the experiment's "
                    f"positions ({base.positions})"
                )


def _check_grid(request: SweepRequest, n_positions: int) -> None:
    """Every grid point must be a valid experiment (the grid sampler would visit each)."""
    import itertools

    grid = request.space.grid()
    keys = list(grid)
    for values in itertools.product(*grid.values()):
        recorded = dict(zip(keys, values, strict=True))
        point = ", ".join(f"{key}={value}" for key, value in recorded.items())
        apply_overrides(request.base, request.space.overrides(recorded, n_positions), f"grid point {point}")


def _open_study(request: SweepRequest, name: str, storage: Any, storage_text: str) -> optuna.Study:
    import optuna

    with quiet_optuna():
        study = optuna.create_study(storage=storage, study_name=name, direction=request.objective.direction,
                                    load_if_exists=True)
    if study.direction.name.lower() != request.objective.direction:
        raise ConfigError(
            f"study {name!r} in {mask_storage(storage_text)} {study.direction.name.lower()}s, but objective "
            f"{request.objective} needs to {request.objective.direction}; give another --study"
        )
    definition = request.definition()
    existing = study.user_attrs.get(DEFINITION_ATTR)
    if existing is None:
        study.set_user_attr(DEFINITION_ATTR, definition)
    else:
        _same_definition(name, existing, definition)
    return study


def _same_definition(name: str, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    labels = {"experiment": "experiment name", "base_config": "base experiment", "search_space": "search space",
              "objective": "objective"}
    for key, label in labels.items():
        if existing.get(key) != wanted.get(key):
            raise ConfigError(
                f"sweep {name!r} exists with another {label}; rerun it with the same settings to resume it, "
                "or give a new --study NAME"
            )


def _open_sweep(request: SweepRequest, name: str, storage: str, n_trials: int, recorder: Recorder) -> SweepRecord:
    from ctexp.registry.models import SweepStatus

    registry = recorder.registry
    definition = request.definition()
    sweep, created = registry.open_sweep(
        name=name, study_name=name, storage=mask_storage(storage), experiment=request.base.experiment,
        objective=str(request.objective), direction=request.objective.direction, sampler=request.sampler.value,
        pruner=request.pruner.value, n_trials=n_trials, search_space=definition["search_space"],
        base_config=definition["base_config"],
    )
    if not created:
        if sweep.storage != mask_storage(storage):
            raise ConfigError(
                f"sweep {name!r} lives in storage {sweep.storage}, not {mask_storage(storage)}; pass that --storage "
                "to resume it, or give a new --study NAME"
            )
        _same_definition(name, {"experiment": sweep.experiment, "base_config": sweep.base_config,
                                "search_space": sweep.search_space, "objective": sweep.objective}, definition)
        sweep = registry.update_sweep(sweep.id, status=SweepStatus.RUNNING, n_trials=n_trials,
                                      sampler=request.sampler.value, pruner=request.pruner.value)
    return sweep


def _parent_run(request: SweepRequest, sweep: SweepRecord, recorder: Recorder) -> str:
    """The sweep's parent MLflow run: created once, by whoever gets there first; reopened on resume."""
    from ctexp.registry.mlflow_names import flatten_config

    tracker = recorder.tracker
    if sweep.mlflow_parent_run_id is not None:
        tracker.set_status(sweep.mlflow_parent_run_id, "RUNNING")
        return sweep.mlflow_parent_run_id
    params = flatten_config(request.base.model_dump(mode="json"))
    params.update({f"search.{key}": spec for key, spec in request.space.specs().items()})
    params["sweep.objective"] = str(request.objective)
    mine = tracker.start_run(
        experiment=request.base.experiment, run_name=f"sweep {sweep.name}", ctexp_run_id=f"sweep:{sweep.name}",
        params=params, tags={"ctexp.sweep": sweep.name, "ctexp.sweep_id": str(sweep.id),
                             "ctexp.kind": "sweep", "ctexp.storage": sweep.storage},
    )
    winner = recorder.registry.set_sweep_parent(sweep.id, mine)
    if winner != mine:  # another machine created one at the same time: keep theirs
        with contextlib.suppress(CtexpError):
            tracker.delete_run(mine)
    return winner


def _run_processes(plan: SweepPlan, workers: int, progress: Callable[[], None]) -> list[WorkerReport]:
    """Spawn ``workers`` worker processes and wait for them, showing progress; Ctrl-C stops them."""
    context = multiprocessing.get_context("spawn")
    reports_queue = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    processes = [
        context.Process(target=_worker_process, args=(plan.model_dump_json(), index, threads, reports_queue),
                        name=f"ctexp-sweep-{plan.name}-{index}", daemon=False)
        for index in range(workers)
    ]
    reports: dict[int, WorkerReport] = {}
    try:
        for process in processes:
            process.start()
        while any(process.is_alive() for process in processes):
            _drain(reports_queue, reports)
            progress()
            time.sleep(POLL_S)
        _drain(reports_queue, reports)
    except KeyboardInterrupt:
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker's run ends KILLED, its trial FAIL
        for process in processes:
            process.join(timeout=60)
        raise
    for index, process in enumerate(processes):
        process.join(timeout=10)
        if index not in reports:
            reason = f"signal {-process.exitcode}" if process.exitcode and process.exitcode < 0 else f"exit code {process.exitcode}"
            reports[index] = WorkerReport(index=index, trials=0, error=f"worker process died ({reason})",
                                          exit_code=1)
    progress()
    return [reports[index] for index in sorted(reports)]


def _drain(reports_queue: Any, reports: dict[int, WorkerReport]) -> None:
    while True:
        try:
            report = WorkerReport.model_validate_json(reports_queue.get_nowait())
        except queue_module.Empty:
            return
        reports[report.index] = report


def _finish(
    study: optuna.Study, plan: SweepPlan, sweep: SweepRecord, recorder: Recorder, reports: list[WorkerReport],
    interrupted: bool, request: SweepRequest, notes: list[str],
) -> SweepSummary:
    """Record how the sweep stands (status, best trial, parent run) and write the best config."""
    from ctexp.registry.models import SweepStatus

    counts = counts_of(study)
    best = best_of(study)
    if counts.done >= plan.n_trials:
        status = SweepStatus.FINISHED
    elif counts.running:
        status = SweepStatus.RUNNING  # other machines are still at it
    elif any(report.error and report.exit_code not in INTERRUPTED_CODES for report in reports) and not interrupted:
        status = SweepStatus.FAILED
    else:
        status = SweepStatus.STOPPED
    with contextlib.suppress(CtexpError):
        sweep = recorder.registry.update_sweep(
            sweep.id, status=status, best_trial_number=None if best is None else best.number,
            best_value=None if best is None else best.value,
        )
    best_toml = None
    if best is not None:
        out = Path(request.best_out) if request.best_out else Path(plan.home) / "sweeps" / plan.name / "best.toml"
        best_toml = str(write_best_toml(best, plan.base, plan.name, str(plan.objective), out))
    if plan.parent_run_id is not None:
        mlflow_status = {SweepStatus.FINISHED: "FINISHED", SweepStatus.FAILED: "FAILED", SweepStatus.STOPPED: "KILLED"}
        with contextlib.suppress(CtexpError):
            metrics = {"trials_complete": counts.complete, "trials_pruned": counts.pruned,
                       "trials_failed": counts.failed}
            if best is not None:
                metrics["best_value"] = float(best.value)  # type: ignore[arg-type]
                recorder.tracker.set_tags(plan.parent_run_id, {
                    "ctexp.best_trial": str(best.number), "ctexp.best_run_id": best.user_attrs.get(RUN_ATTR, ""),
                })
            recorder.tracker.log_metrics(plan.parent_run_id, metrics)
            if status in mlflow_status:
                recorder.tracker.set_status(plan.parent_run_id, mlflow_status[status])  # type: ignore[arg-type]
    summary = summarize(study, sweep, recorder.registry, plan.n_trials)
    warnings_ = [*notes, *(f"worker {r.index}: {r.error}" for r in reports if r.error and r.exit_code not in INTERRUPTED_CODES)]
    return summary.model_copy(update={"best_toml": best_toml, "warnings": warnings_})


def write_best_toml(best: optuna.trial.FrozenTrial, base: ExperimentConfig, name: str, objective: str, out: Path) -> Path:
    """Write the best trial's experiment as TOML that ``ctexp run --config`` reads (atomically)."""
    config = apply_overrides(base, {**best.user_attrs.get(OVERRIDES_ATTR, {}), "name": f"{name}-best"})
    header = (
        f"# The best trial ({best.number}) of sweep {name}: {objective} = {best.value:.6g} on validation, run "
        f"{best.user_attrs.get(RUN_ATTR, '?')}.\n# Re-run it with: ctexp run --config {out}\n"
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp", encoding="utf-8") as handle:
            handle.write(header + to_toml(config))
        Path(handle.name).replace(out)
    except OSError as error:
        raise ConfigError(f"cannot write the best configuration to {out}: {error.strerror}; check --best-out") from None
    return out


# ---------------------------------------------------------------------------------------------------------
# Summaries


def summarize(study: optuna.Study, sweep: SweepRecord, registry: Registry, n_trials: int | None = None) -> SweepSummary:
    """Counts by state, the best trials, every trial with its ctexp run, and the best configuration."""
    runs: dict[str, RunRecord] = {record.id: record for record in registry.list_trials(sweep.id)}
    rows = [_trial_row(trial, runs) for trial in study.get_trials(deepcopy=False)]
    complete = [row for row in rows if row.state == "COMPLETE"]
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    top = sorted(complete, key=lambda row: (sign * (row.value or 0.0), row.number))[:TOP_TRIALS]
    best = best_of(study)
    best_config = None
    if best is not None:
        base = ExperimentConfig.model_validate({**sweep.base_config, "experiment": sweep.experiment})
        best_config = apply_overrides(base, best.user_attrs.get(OVERRIDES_ATTR, {})).model_dump(mode="json")
    return SweepSummary(
        sweep=sweep.to_json(), n_trials=n_trials or sweep.n_trials, counts=counts_of(study),
        best=top[0] if top else None, top=top, trials=rows, best_config=best_config,
    )


def _trial_row(trial: optuna.trial.FrozenTrial, runs: dict[str, RunRecord]) -> TrialRow:
    run = runs.get(trial.user_attrs.get(RUN_ATTR, ""))
    seconds = None
    if trial.datetime_start is not None and trial.datetime_complete is not None:
        seconds = round((trial.datetime_complete - trial.datetime_start).total_seconds(), 2)
    return TrialRow(
        number=trial.number, state=trial.state.name, value=trial.value, params=dict(trial.params),
        run_id=trial.user_attrs.get(RUN_ATTR), run_status=None if run is None else run.status.value,
        epochs=len(trial.intermediate_values), seconds=seconds, error=trial.user_attrs.get(ERROR_ATTR),
        retry_of=trial.system_attrs.get("failed_trial"),
    )


def show_sweep(ref: str, locations: Locations, storage: str | None = None, importance: bool = True) -> SweepSummary:
    """Summarise a recorded sweep from its study, with parameter importances.

    Importances: fANOVA (``FanovaImportanceEvaluator(seed=0)``, needs scikit-learn, which MLflow
    installs) over the complete trials; PED-ANOVA (Optuna's default, no dependency) without scikit-learn.

    Raises:
        RegistryError: no such sweep, or its storage cannot be reached.
        ConfigError: the recorded storage URL had a password (give ``--storage``).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with locations.registry() as registry:
        sweep = registry.sweep(ref)
        target = storage or sweep.storage
        if "***" in target:
            raise ConfigError(f"sweep {sweep.name}'s storage {sweep.storage} has a password; give it with --storage URL")
        try:
            study = optuna.load_study(study_name=sweep.study_name, storage=open_storage(target))
        except KeyError:
            raise RegistryError(
                f"study {sweep.study_name!r} is not in the Optuna storage {mask_storage(target)}; check --storage"
            ) from None
        summary = summarize(study, sweep, registry)
    if importance:
        values, evaluator, note = importances(study)
        summary = summary.model_copy(update={"importances": values, "importance_evaluator": evaluator,
                                             "importance_note": note})
    return summary


def importances(study: optuna.Study) -> tuple[dict[str, float] | None, str | None, str | None]:
    """Parameter importances over the complete trials: (importances, evaluator name, note)."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, None, f"importances need at least 2 complete trials, the study has {len(complete)}"
    try:
        import sklearn  # noqa: F401 - fANOVA's random forest

        evaluator: Any = optuna.importance.FanovaImportanceEvaluator(seed=0)
        evaluator_name = "fanova"
    except ImportError:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        evaluator_name = "ped-anova"
    try:
        with quiet_optuna():
            values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError) as error:
        return None, evaluator_name, f"importances unavailable: {_one_line(error)}"
    return {key: float(value) for key, value in values.items()}, evaluator_name, None


def list_sweeps(locations: Locations, experiment: str | None = None, limit: int | None = None) -> list[SweepRecord]:
    """The registry's sweeps, newest first."""
    with locations.registry() as registry:
        return registry.list_sweeps(experiment=experiment, limit=limit)


def build_request(
    config_file: Path | None,
    overrides: dict[str, Any],
    search: list[str],
    *,
    objective: str = "val_top1",
    sampler: str = "tpe",
    pruner: str = "median",
    seed: int = 0,
    n_trials: int | None = None,
    timeout: float | None = None,
    workers: int = 1,
    study: str | None = None,
    storage: str | None = None,
    best_out: Path | None = None,
) -> SweepRequest:
    """A sweep request from a config file (experiment + ``[search]`` table), flags and ``--search`` specs.

    Raises:
        ConfigError: any bad input, in one line.
    """
    from ctexp.config import build_config, read_toml
    from ctexp.sweep.space import build_space

    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"--n-trials must be at least 1, got {n_trials}")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"--timeout must be positive (seconds), got {timeout:g}")
    base = build_config(config_file, overrides)
    table = read_toml(config_file).get("search") if config_file is not None else None
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"[search] in {config_file} must be a table of KEY = SPEC")
    space = build_space(table, search, str(config_file))
    return SweepRequest(
        base=base, space=space, objective=parse_objective(objective),
        sampler=parse_choice(SamplerKind, sampler, "--sampler"), pruner=parse_choice(PrunerKind, pruner, "--pruner"),
        seed=seed, n_trials=n_trials, timeout=timeout, workers=workers, name=study, storage=storage,
        best_out=str(best_out) if best_out is not None else None,
    )
