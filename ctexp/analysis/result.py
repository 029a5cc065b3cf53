"""The result of one run: a single typed object that ``--json`` prints and a registry persists."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ctexp.analysis.groupings import Grouped
from ctexp.lens.metrics import EpochMetrics
from ctexp.records import Record


class GroupMetrics(Record):
    """Metrics of a group of test states: overall, a layer, a position or a (layer, position) cell.

    ``layer`` and ``position`` are the group's key values (one field per ``groupings.AXES``), None where
    its grouping does not key on them.

    ``n`` counts states, ``problems`` the distinct problems behind them; ``ci`` holds 95% bootstrap
    intervals (problems resampled). ``prior_top1`` and ``identity_top1`` are the baselines on the same
    states, and ``lift_*`` the lens's top-1 minus theirs.
    """

    layer: int | None = None
    position: int | None = None
    n: int
    problems: int
    loss: float | None
    top1: float | None
    top5: float | None
    top10: float | None
    ci: dict[str, tuple[float, float] | None]
    prior_top1: float | None = None
    identity_top1: float | None = None
    lift_prior: float | None = None
    lift_identity: float | None = None


class BaselineResult(Grouped[GroupMetrics]):
    """A baseline's metrics on the lens's test states, by grouping (``overall``, ``by_layer``, ...)."""

    groups: dict[str, list[GroupMetrics]]


class SampleToken(Record):
    id: int
    token: str
    prob: float | None = None


class Sample(Record):
    """One decoded test prediction, as the reference's "Sample Predictions Analysis" shows them."""

    problem_id: str
    layer: int
    position: int
    steps: list[str]
    slice_tokens: list[str]
    targets: list[SampleToken]
    predictions: list[SampleToken]
    correct: bool
    in_top5: bool


class DataSummary(Record):
    """What the aligned dataset holds: problems and samples per split, empty slices per position."""

    problems: dict[str, int]
    samples: dict[str, int]
    states: dict[str, int]
    layers: list[int]
    positions: list[int]
    empty: dict[str, list[int]] = Field(description="per position: empty slices, skipped, filled (nearest)")
    test_problem_ids: list[str]


class StoreInfo(Record):
    path: str | None
    content_hash: str
    model: str
    tokenizer: str


class RunResult(Grouped[GroupMetrics]):
    """Everything a run computed. ``config`` is the resolved experiment configuration.

    ``groups`` holds the lens's test metrics by grouping (``ctexp.analysis.groupings``); in JSON they are
    the keys ``overall``, ``by_layer``, ``by_position`` and ``by_cell``.
    """

    run_id: str
    name: str
    created: str
    config: dict[str, Any]
    config_hash: str
    store: StoreInfo
    device: str
    seconds: float
    data: DataSummary
    lens_parameters: int
    epochs: list[EpochMetrics]
    best_epoch: int | None
    stopped_early: bool
    groups: dict[str, list[GroupMetrics]]
    baselines: dict[str, BaselineResult]
    samples: list[Sample]
