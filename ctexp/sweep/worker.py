"""The worker: the trial loop every sweep process runs, and one trial as a recorded ctexp run.

A worker loads the store once and keeps one ``Recorder`` for all its trials, so every trial is a row
in ``ctexp_runs`` (``sweep_id``, ``trial_number``) and a child MLflow run of the sweep's parent run.

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
(``recovery``; the storages and the lock are in ``storage``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ctexp.config import ExperimentConfig
from ctexp.errors import ConfigError, CtexpError, Interrupted, TrainingDiverged
from ctexp.lens.metrics import EpochMetrics
from ctexp.records import FrozenRecord
from ctexp.sweep.recovery import MLFLOW_RUN_ATTR, RUN_ATTR, WORKER_ATTR, WorkerId, recover
from ctexp.sweep.request import ERROR_ATTR, INVALID_ATTR, OVERRIDES_ATTR, PrunerKind, SamplerKind, SweepPlan
from ctexp.sweep.space import SearchSpace, apply_overrides
from ctexp.sweep.storage import SweepLock, open_storage, quiet_optuna
from ctexp.sweep.summary import counts_of, one_line

if TYPE_CHECKING:
    import optuna

    from ctexp.experiment.pipeline import Prepared
    from ctexp.experiment.recorder import Recorder

MAX_CONSECUTIVE_FAILURES = 3  # a worker stops after this many failed trials in a row ...
MAX_CONSECUTIVE_INVALID = 20  # ... or this many trials whose values made no valid experiment
POLL_S = 1.0  # how often an idle worker, or the launcher, looks at the study


# ---------------------------------------------------------------------------------------------------------
# Samplers and pruners


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


# ---------------------------------------------------------------------------------------------------------
# The worker loop


class WorkerReport(FrozenRecord):
    """How a worker ended: the trials it ran, and its error and exit code if it stopped on one."""

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
                on_tracked=lambda mlflow_run_id: trial.set_user_attr(MLFLOW_RUN_ATTR, mlflow_run_id),
                extra_tags={"ctexp.sweep": plan.name, "ctexp.trial_number": str(trial.number),
                            **{f"ctexp.search.{key}": str(value) for key, value in recorded.items()}},
            )
            if not result.epochs:
                raise ConfigError(f"trial {trial.number} trained nothing (lens {config.lens.value}); nothing to compare")
            return plan.objective.value_so_far(result.epochs)
        except RunPruned as pruned:
            raise optuna.TrialPruned(str(pruned)) from None
        except TrainingDiverged as diverged:
            # The sampled values lie where training blows up: the run is FAILED, and the trial is PRUNED, so
            # that it counts as done, the sampler learns to avoid the region, and the sweep goes on.
            trial.set_user_attr(ERROR_ATTR, str(diverged))
            raise optuna.TrialPruned(str(diverged)) from None
        except Interrupted as stop:  # Ctrl-C or SIGTERM: the run is KILLED, the trial FAIL; then stop
            interrupted.append(stop)
            trial.set_user_attr(ERROR_ATTR, str(stop))
            raise
        except Exception as error:
            trial.set_user_attr(ERROR_ATTR, one_line(error))
            raise

    study.sampler = make_sampler(plan, len(study.get_trials(deepcopy=False)))
    study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda _, trial: finished.append(trial)])
    if interrupted:
        raise interrupted[0]
    if not finished:
        raise CtexpError(f"sweep {plan.name}: Optuna ran no trial (the study was stopped)")
    return finished[0]


def worker_process(plan_json: str, index: int, threads: int, reports: Any) -> None:
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
        report = WorkerReport(index=index, trials=0, error=f"internal error {one_line(error)}", exit_code=1)
    reports.put(report.model_dump_json())
