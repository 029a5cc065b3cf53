"""What a comparison of runs takes and returns: loaded runs with their test states, and typed results.

``compare`` computes; this module only defines its inputs (``ComparedRun``, ``RunStates``, parsed by
``read_states`` from a run's ``predictions.jsonl``) and its output (``Comparison`` down to ``DeltaRow``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field

from ctexp.analysis.groupings import Grouped
from ctexp.errors import RegistryError
from ctexp.records import Record

Metric = Literal["top1", "top5", "top10", "loss"]


# ---------------------------------------------------------------------------------------------------------
# The typed result


class RunInfo(Record):
    """One compared run, as the registry holds it, and where its predictions came from."""

    id: str
    name: str
    experiment: str
    status: str
    lens: str
    split: str
    target: str
    store_hash: str
    mlflow_run_id: str | None
    predictions: Literal["run directory", "mlflow"]
    test_problems: int = Field(description="test problems (from result.json, else those in the predictions)")
    test_states: int = Field(description="lines of predictions.jsonl: (problem, position, layer) states")


class ConfigChange(Record):
    """One flattened config key (``train.lr``) with both runs' values."""

    key: str
    reference: Any
    other: Any
    changed: bool


class HeadlineDelta(Record):
    """A headline test metric of both runs (registry values over each run's own states) and its delta."""

    metric: str
    reference: float | None
    other: float | None
    delta: float | None


class DeltaRow(Record):
    """One row of a comparison's table: overall, or one group of a grouping (a layer, a position, a cell).

    ``reference_*`` and ``other_*`` are the two runs' means (on the shared states when paired),
    ``delta_*`` are ``other - reference``; ``delta_low``/``delta_high`` bound the delta of the
    comparison's metric; ``lost``/``gained`` are McNemar's discordant counts (paired top-k only).
    """

    layer: int | None = None
    position: int | None = None
    n_reference: int
    n_other: int
    problems_reference: int
    problems_other: int
    reference_top1: float | None
    other_top1: float | None
    reference_top5: float | None
    other_top5: float | None
    reference_top10: float | None
    other_top10: float | None
    reference_loss: float | None
    other_loss: float | None
    delta_top1: float | None
    delta_top5: float | None
    delta_top10: float | None
    delta_loss: float | None
    delta_low: float | None
    delta_high: float | None
    lost: int | None = None
    gained: int | None = None
    p_value: float | None
    p_holm: float | None
    significant: bool


class PairComparison(Grouped[DeltaRow]):
    """One run compared against the reference; ``groups`` holds a table of rows per grouping
    (``overall``, ``by_layer``, ``by_position``, ``by_cell`` in JSON)."""

    reference: RunInfo
    other: RunInfo
    metric: Metric
    paired: bool
    note: str | None = Field(description="why the comparison is unpaired, or what the pairing left out")
    statistics: str = Field(description="the tests and intervals used, in words")
    shared_states: int = Field(description="states both runs scored (paired), else 0")
    config: list[ConfigChange]
    headline: list[HeadlineDelta]
    groups: dict[str, list[DeltaRow]]


class Comparison(Record):
    """Every run after the first compared against the first."""

    metric: Metric
    alpha: float
    interval_level: float
    resamples: int
    seed: int
    reference: RunInfo
    comparisons: list[PairComparison]


# ---------------------------------------------------------------------------------------------------------
# The inputs: loaded runs


class RecordedRun(Protocol):
    """What compare reads of a recorded run (the registry's ``RunRecord`` has it all)."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def experiment(self) -> str: ...
    @property
    def status(self) -> StrEnum: ...
    @property
    def lens(self) -> str: ...
    @property
    def split(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def store_hash(self) -> str: ...
    @property
    def mlflow_run_id(self) -> str | None: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def test_top1(self) -> float | None: ...
    @property
    def test_top5(self) -> float | None: ...
    @property
    def test_top10(self) -> float | None: ...
    @property
    def test_loss(self) -> float | None: ...
    @property
    def prior_top1(self) -> float | None: ...
    @property
    def identity_top1(self) -> float | None: ...


@dataclass(frozen=True)
class RunStates:
    """One run's test states from predictions.jsonl."""

    problem_ids: list[str]  # per state
    positions: np.ndarray  # (S,)
    layers: np.ndarray  # (S,)
    metrics: np.ndarray  # (S, 4): loss, hit1, hit5, hit10
    targets: dict[tuple[str, int], tuple[int, ...]]  # per (problem, position)
    test_problem_ids: list[str]

    def keys(self) -> list[tuple[str, int, int]]:
        return list(zip(self.problem_ids, self.positions.tolist(), self.layers.tolist(), strict=True))

    def axes(self) -> dict[str, np.ndarray]:
        """Each state's value on every grouping axis (``groupings.AXES``)."""
        return {"layer": self.layers, "position": self.positions}


@dataclass(frozen=True)
class ComparedRun:
    """One run to compare: its registry record, its test states, and where its predictions came from."""

    record: RecordedRun
    states: RunStates
    source: Literal["run directory", "mlflow"]

    def info(self) -> RunInfo:
        r = self.record
        return RunInfo(
            id=r.id, name=r.name, experiment=r.experiment, status=r.status.value, lens=r.lens, split=r.split,
            target=r.target, store_hash=r.store_hash, mlflow_run_id=r.mlflow_run_id, predictions=self.source,
            test_problems=len(self.states.test_problem_ids), test_states=len(self.states.problem_ids),
        )


def read_states(path: Path, result: Path | None, run_id: str) -> RunStates:
    """One run's test states from its ``predictions.jsonl`` (and its test problem ids from ``result.json``).

    Args:
        path: the predictions, one JSON record per (problem, position, layer) state.
        result: the run's ``result.json`` if at hand; without it (or when it is damaged) the problems
            of the predictions are the test problems.
        run_id: the run's id, for messages.

    Raises:
        RegistryError: the file cannot be read, a line is not a prediction record, or it holds no state.
    """
    problem_ids: list[str] = []
    positions: list[int] = []
    layers: list[int] = []
    metrics: list[tuple[float, float, float, float]] = []
    targets: dict[tuple[str, int], tuple[int, ...]] = {}
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    pid, position, layer = str(row["problem_id"]), int(row["position"]), int(row["layer"])
                    metrics.append((float(row["loss"]), float(row["hit1"]), float(row["hit5"]), float(row["hit10"])))
                    targets.setdefault((pid, position), tuple(int(t) for t in row["targets"]))
                except (ValueError, KeyError, TypeError) as error:
                    raise RegistryError(
                        f"{path} line {number} is not a prediction record ({type(error).__name__}: {error}); "
                        f"the predictions of run {run_id[:12]} are damaged"
                    ) from None
                problem_ids.append(pid)
                positions.append(position)
                layers.append(layer)
    except OSError as error:
        raise RegistryError(f"cannot read {path}: {error.strerror or error}") from None
    if not problem_ids:
        raise RegistryError(f"{path} holds no test states; run {run_id[:12]} has nothing to compare")
    test_ids: list[str] | None = None
    if result is not None:
        try:
            test_ids = [str(p) for p in json.loads(result.read_text(encoding="utf-8"))["data"]["test_problem_ids"]]
        except (OSError, ValueError, KeyError, TypeError):
            test_ids = None  # an older or damaged result.json: the predictions' problems will do
    if test_ids is None:
        test_ids = sorted(set(problem_ids))
    return RunStates(
        problem_ids=problem_ids, positions=np.array(positions, dtype=np.int64),
        layers=np.array(layers, dtype=np.int64), metrics=np.array(metrics, dtype=np.float64).reshape(-1, 4),
        targets=targets, test_problem_ids=test_ids,
    )
