"""What a sweep is: the request as asked for, its objective, and the plan every worker follows.

``build_request`` turns a config file (the experiment plus a ``[search]`` table), flags and
``--search`` specs into a ``SweepRequest``; ``run_sweep`` (in ``study``) checks it against the store
and opens the study, and hands each worker a ``SweepPlan``.

The objective of a trial is its value at its best epoch (lowest validation loss: the checkpoint early
stopping keeps, which ``ctexp run --config best.toml`` reproduces), never the test split. Each epoch
reports the value the trial would have if it stopped then, and the pruner compares those.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field

from ctexp.config import ExperimentConfig, parse_index_spec
from ctexp.errors import ConfigError
from ctexp.lens.metrics import EpochMetrics
from ctexp.records import FrozenRecord
from ctexp.registry.locations import Locations
from ctexp.sweep.space import SearchSpace

# Trial user attributes written by ctexp (shown by optuna-dashboard, too); ``recovery`` holds the worker's
# and the run's (WORKER_ATTR, RUN_ATTR).
OVERRIDES_ATTR, ERROR_ATTR = "ctexp_overrides", "ctexp_error"
INVALID_ATTR = "ctexp_invalid"  # the trial's values made no valid experiment; it never ran


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

    @property
    def metric_name(self) -> str:
        """The study's name for its value (``Study.set_metric_names``), which optuna-dashboard shows:
        ``val_top1``, ``val_loss``, or ``val_top1[positions 2,3]``."""
        if self.kind is ObjectiveKind.POSITIONS:
            return f"val_top1[positions {','.join(map(str, self.positions))}]"
        return self.kind.value

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
# The sweep as asked for, and as planned


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
