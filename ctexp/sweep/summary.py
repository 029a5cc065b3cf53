"""Reading a sweep back: counts by state, the best trial, summaries, importances and the best TOML.

``summarize`` joins a study's trials to their ctexp runs; ``show_sweep`` (``ctexp sweep --show``) adds
parameter importances; ``write_best_toml`` writes the best trial's experiment for ``ctexp run --config``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from ctexp.config import ExperimentConfig, to_toml
from ctexp.errors import ConfigError, CtexpError, RegistryError
from ctexp.records import FrozenRecord
from ctexp.registry.locations import Locations
from ctexp.sweep.recovery import RUN_ATTR
from ctexp.sweep.request import ERROR_ATTR, OVERRIDES_ATTR
from ctexp.sweep.space import apply_overrides
from ctexp.sweep.storage import mask_storage, open_storage, quiet_optuna

if TYPE_CHECKING:
    import optuna

    from ctexp.registry.db import Registry
    from ctexp.registry.records import RunRecord, SweepRecord

TOP_TRIALS = 5


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
        return None, evaluator_name, f"importances unavailable: {one_line(error)}"
    return {key: float(value) for key, value in values.items()}, evaluator_name, None


def list_sweeps(locations: Locations, experiment: str | None = None, limit: int | None = None) -> list[SweepRecord]:
    """The registry's sweeps, newest first."""
    with locations.registry() as registry:
        return registry.list_sweeps(experiment=experiment, limit=limit)


def one_line(error: BaseException) -> str:
    """An error as a trial's or a worker's message: its first line (with its type unless a ``CtexpError``)."""
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    return (f"{type(error).__name__}: {message}" if not isinstance(error, CtexpError) else message)[:500]
