"""Sweeps: an Optuna study over an experiment's search space, every trial a recorded ctexp run.

``run_sweep`` is what ``ctexp sweep`` calls. It checks everything first (experiment, search space,
objective, store, results database, MLflow), opens or resumes the study and its ``ctexp_sweeps`` row
and parent MLflow run, then runs trials in this process or in N spawned worker processes, and records
how the sweep ends (status, best trial, the best configuration as TOML).

The package, by concern: ``request`` (what a sweep is: request, objective, plan), ``space`` (the
search space), ``worker`` (the trial loop), ``storage`` (where a study lives, and the lock its workers
share), ``recovery`` (dead workers), ``summary`` (reading a sweep back) and this module (launching).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import queue as queue_module
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctexp.config import LensKind, parse_index_spec
from ctexp.errors import ConfigError, CtexpError, Interrupted
from ctexp.records import FrozenRecord
from ctexp.registry.locations import Locations
from ctexp.registry.tracking.describe import NOTE_TAG
from ctexp.sweep.recovery import RUN_ATTR, WorkerId, recover
from ctexp.sweep.request import SamplerKind, SweepPlan, SweepRequest
from ctexp.sweep.space import apply_overrides
from ctexp.sweep.storage import SweepLock, mask_storage, open_storage, quiet_optuna, resolve_storage, storage_kind
from ctexp.sweep.summary import Counts, SweepSummary, best_of, counts_of, summarize, write_best_toml
from ctexp.sweep.worker import POLL_S, WorkerReport, run_worker, worker_process

if TYPE_CHECKING:
    import optuna

    from ctexp.experiment.recorder import Recorder
    from ctexp.registry.records import SweepRecord

DEFAULT_N_TRIALS = 20
INTERRUPTED_CODES = (130, 143)  # Ctrl-C, SIGTERM
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
DEFINITION_ATTR = "ctexp_definition"  # study user attribute: what the sweep searches, to refuse a changed rerun


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
    if study.metric_names != [request.objective.metric_name]:  # so optuna-dashboard says val_top1, not Objective 0
        with quiet_optuna():
            study.set_metric_names([request.objective.metric_name])
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
    from ctexp.registry.tracking.names import flatten_config

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
        description=sweep_description(request, sweep),
    )
    winner = recorder.registry.set_sweep_parent(sweep.id, mine)
    if winner != mine:  # another machine created one at the same time: keep theirs
        with contextlib.suppress(CtexpError):
            tracker.delete_run(mine)
    return winner


def sweep_description(request: SweepRequest, sweep: SweepRecord, best: optuna.trial.FrozenTrial | None = None) -> str:
    """The Markdown description of a sweep's parent MLflow run: what it searches, and its best trial so far."""
    objective = request.objective
    lines = [
        (f"**Sweep `{sweep.name}`**: {objective.direction} `{objective.metric_name}` (validation) over "
         f"{sweep.n_trials} trials, {sweep.sampler} sampler, {sweep.pruner} pruner; each trial is a child run."),
        "",
        "**Search space**: " + ", ".join(f"`{key}={spec}`" for key, spec in request.space.specs().items()),
    ]
    if best is not None:
        lines += ["", f"**Best trial**: {best.number}, {objective.metric_name} = {best.value:.4f}, ctexp run "
                      f"`{best.user_attrs.get(RUN_ATTR, '-')}`, params "
                      + ", ".join(f"`{key}={value}`" for key, value in best.params.items())]
    return "\n".join(lines)


def _run_processes(plan: SweepPlan, workers: int, progress: Callable[[], None]) -> list[WorkerReport]:
    """Spawn ``workers`` worker processes and wait for them, showing progress; Ctrl-C stops them."""
    context = multiprocessing.get_context("spawn")
    reports_queue = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    processes = [
        context.Process(target=worker_process, args=(plan.model_dump_json(), index, threads, reports_queue),
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
                    NOTE_TAG: sweep_description(request, sweep, best),
                })
            recorder.tracker.log_metrics(plan.parent_run_id, metrics)
            if status in mlflow_status:
                recorder.tracker.set_status(plan.parent_run_id, mlflow_status[status])  # type: ignore[arg-type]
    summary = summarize(study, sweep, recorder.registry, plan.n_trials)
    warnings_ = [*notes, *(f"worker {r.index}: {r.error}" for r in reports if r.error and r.exit_code not in INTERRUPTED_CODES)]
    return summary.model_copy(update={"best_toml": best_toml, "warnings": warnings_})
