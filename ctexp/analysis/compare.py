"""Compare runs: what changed between them, and whether each per-layer, per-position or per-cell delta is real.

``compare_runs(locations, ["A", "B", "C"])`` compares every run against the first (the reference) and
returns a typed ``Comparison``; ``ctexp compare`` prints it. For each pair it reports the config keys
that differ, the headline metrics with deltas, and tables by layer, by position and by (layer,
position) cell of the two runs' top-1/5/10 and loss, their deltas (``other - reference``; a negative
``delta_loss`` is an improvement), an interval of the delta of the chosen metric, a p-value, its Holm
adjustment across the rows of the table, and whether the delta is significant.

Statistics, from the per-state predictions that every run keeps (``HOME/runs/RUN_ID/predictions.jsonl``,
or the MLflow artifact ``run/predictions.jsonl``):

* **Paired** (both runs read the same store, have the same test problems and the same targets at every
  (problem, position) that both scored; the usual case for runs that differ in lens, adapter, training
  options or layer/position selection): rows are computed on the states both runs scored.

  - p-value for ``top1``/``top5``/``top10``: exact two-sided McNemar test on the states' top-k
    correctness: with ``lost`` states that the reference got right and the other run wrong and
    ``gained`` the reverse, ``p = min(1, 2 * P[Binomial(lost + gained, 1/2) <= min(lost, gained)])``
    (1 when both are 0). It treats states as independent, which they are not: the states of one
    problem (its layers and positions) are correlated, so McNemar p-values are optimistic for
    rows that pool many states per problem. The interval below respects the correlation, and the
    significance verdict requires both (see ``significant``).
  - p-value for ``loss``: a paired sign-flip permutation test at the problem level: each problem's
    summed loss difference keeps or flips its sign at random ``F`` times, the statistic being the
    total difference; ``p = (1 + #{|T*| >= |T|}) / (1 + F)``. It respects the within-problem
    correlation. Its smallest value is ``1 / (1 + F)``, so ``F = max(resamples, ceil(2 m / alpha))``
    with ``m`` the rows of the largest table, so that Holm can reach ``alpha`` even in the grid.
  - interval: a paired bootstrap of the delta, resampling *problems* (all states of a problem move
    together, in both runs at once), ``resamples`` times; percentile interval at level ``1 - alpha``.
  - ``p_holm``: Holm's step-down adjustment across the rows of one table (by layer, by position, by
    cell; the overall row is a family of one).
  - ``significant``: ``p_holm <= alpha`` *and* the paired bootstrap interval excludes 0. The second
    condition guards against McNemar's independence assumption (a row whose states come from few
    problems can pass McNemar while its problem-level interval straddles 0); it only makes the
    verdict more conservative, so the family-wise error stays at most ``alpha``.

* **Unpaired** (different stores, different test problems, or different targets per state, e.g.
  another split or target rule, or no state in common): one line says why (``note``), and each run's
  problems are bootstrapped independently to give an interval of the difference of the two means.
  There are no p-values (null). ``significant`` is true when the Bonferroni-widened interval (level
  ``1 - alpha / m`` for the ``m`` rows of the table) excludes 0, so that the family-wise error rate
  stays at ``alpha`` as Holm's does in the paired case; the reported interval is the plain
  ``1 - alpha`` one.

Comparing a run with itself gives zero deltas, ``p_value = 1`` and nothing significant.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from ctexp.errors import ConfigError, RegistryError
from ctexp.records import Record
from ctexp.registry.db import RunRecord
from ctexp.registry.locations import Locations

Metric = Literal["top1", "top5", "top10", "loss"]
METRICS: tuple[Metric, ...] = ("top1", "top5", "top10", "loss")
COLUMN = {"loss": 0, "top1": 1, "top5": 2, "top10": 3}  # columns of the per-state metrics array
HEADLINE = (
    ("top1", "test_top1"), ("top5", "test_top5"), ("top10", "test_top10"), ("loss", "test_loss"),
    ("prior_top1", "prior_top1"), ("identity_top1", "identity_top1"),
)
PREDICTIONS_FILE = "predictions.jsonl"
RESULT_FILE = "result.json"
RUN_ARTIFACTS = "run"
MIN_RESAMPLES = 100
EXACT_BINOMIAL_MAX_N = 2000  # above this, the binomial tail is summed in log space


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
    """One row (overall, a layer or a position) or cell (a layer and a position) of a comparison.

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


class PairComparison(Record):
    """One run compared against the reference."""

    reference: RunInfo
    other: RunInfo
    metric: Metric
    paired: bool
    note: str | None = Field(description="why the comparison is unpaired, or what the pairing left out")
    statistics: str = Field(description="the tests and intervals used, in words")
    shared_states: int = Field(description="states both runs scored (paired), else 0")
    config: list[ConfigChange]
    headline: list[HeadlineDelta]
    overall: DeltaRow
    by_layer: list[DeltaRow]
    by_position: list[DeltaRow]
    by_cell: list[DeltaRow]


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
# Exact tests and corrections


def mcnemar_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts.

    ``p = min(1, 2 * P[X <= min(lost, gained)])`` with ``X ~ Binomial(lost + gained, 1/2)``; 1 when
    there is no discordant pair. Exact integer arithmetic up to 2,000 discordant pairs, a log-space sum
    above.

    Examples: ``mcnemar_p(0, 5) == 0.0625``, ``mcnemar_p(1, 9) == 0.021484375``.
    """
    if lost < 0 or gained < 0:
        raise ValueError(f"discordant counts must be non-negative, not {lost}, {gained}")
    n, k = lost + gained, min(lost, gained)
    if n == 0:
        return 1.0
    if 2 * k >= n:  # lost == gained: the two tails cover everything
        return 1.0
    if n <= EXACT_BINOMIAL_MAX_N:
        total, term = 0, 1
        for i in range(k + 1):
            total += term
            term = term * (n - i) // (i + 1)
        return min(1.0, (2 * total) / (1 << n))  # int / int is correctly rounded, however large
    i = np.arange(k, dtype=np.float64)
    log_terms = np.concatenate([[0.0], np.cumsum(np.log(n - i) - np.log(i + 1))])  # log C(n, 0..k)
    top = log_terms.max()
    log_tail = top + math.log(float(np.exp(log_terms - top).sum())) - n * math.log(2.0)
    return min(1.0, math.exp(math.log(2.0) + log_tail))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values; None entries are skipped and stay None.

    With the ``m`` p-values sorted ascending, ``p_(i)`` becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``;
    rejecting where the adjusted value is at most ``alpha`` controls the family-wise error at ``alpha``.
    """
    present = [(p, index) for index, p in enumerate(p_values) if p is not None]
    present.sort()
    m = len(present)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted


# ---------------------------------------------------------------------------------------------------------
# Per-state predictions


@dataclass(frozen=True)
class _States:
    """One run's test states from predictions.jsonl."""

    problem_ids: list[str]  # per state
    positions: np.ndarray  # (S,)
    layers: np.ndarray  # (S,)
    metrics: np.ndarray  # (S, 4): loss, hit1, hit5, hit10
    targets: dict[tuple[str, int], tuple[int, ...]]  # per (problem, position)
    test_problem_ids: list[str]

    def keys(self) -> list[tuple[str, int, int]]:
        return list(zip(self.problem_ids, self.positions.tolist(), self.layers.tolist(), strict=True))


@dataclass(frozen=True)
class _Loaded:
    record: RunRecord
    states: _States
    source: Literal["run directory", "mlflow"]

    def info(self) -> RunInfo:
        r = self.record
        return RunInfo(
            id=r.id, name=r.name, experiment=r.experiment, status=r.status.value, lens=r.lens, split=r.split,
            target=r.target, store_hash=r.store_hash, mlflow_run_id=r.mlflow_run_id, predictions=self.source,
            test_problems=len(self.states.test_problem_ids), test_states=len(self.states.problem_ids),
        )


def _load_run(locations: Locations, record: RunRecord, scratch: Path) -> _Loaded:
    """Read a run's predictions (and test problem ids) from its run directory, else from MLflow."""
    if record.status.value != "FINISHED":
        raise RegistryError(
            f"run {record.id[:12]} ({record.name}) is {record.status.value}; only finished runs can be compared"
        )
    run_dir = locations.home / "runs" / record.id
    predictions, result = run_dir / PREDICTIONS_FILE, run_dir / RESULT_FILE
    source: Literal["run directory", "mlflow"] = "run directory"
    if not predictions.is_file():
        downloaded = None
        if record.mlflow_run_id:
            tracker = locations.tracker()
            target = scratch / record.id
            target.mkdir(parents=True, exist_ok=True)
            downloaded = tracker.download_artifact(record.mlflow_run_id, f"{RUN_ARTIFACTS}/{PREDICTIONS_FILE}", target)
            if downloaded is not None and not result.is_file():
                result = tracker.download_artifact(
                    record.mlflow_run_id, f"{RUN_ARTIFACTS}/{RESULT_FILE}", target
                ) or result
        if downloaded is None:
            where = f" nor in MLflow run {record.mlflow_run_id} ({RUN_ARTIFACTS}/{PREDICTIONS_FILE})" if (
                record.mlflow_run_id) else " and the run has no MLflow run"
            raise RegistryError(
                f"run {record.id[:12]} ({record.name}) has no per-state predictions: not in {predictions}{where}"
            )
        predictions, source = downloaded, "mlflow"
    return _Loaded(record, _read_states(predictions, result if result.is_file() else None, record), source)


def _read_states(path: Path, result: Path | None, record: RunRecord) -> _States:
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
                        f"the predictions of run {record.id[:12]} are damaged"
                    ) from None
                problem_ids.append(pid)
                positions.append(position)
                layers.append(layer)
    except OSError as error:
        raise RegistryError(f"cannot read {path}: {error.strerror or error}") from None
    if not problem_ids:
        raise RegistryError(f"{path} holds no test states; run {record.id[:12]} has nothing to compare")
    test_ids: list[str] | None = None
    if result is not None:
        try:
            test_ids = [str(p) for p in json.loads(result.read_text(encoding="utf-8"))["data"]["test_problem_ids"]]
        except (OSError, ValueError, KeyError, TypeError):
            test_ids = None  # an older or damaged result.json: the predictions' problems will do
    if test_ids is None:
        test_ids = sorted(set(problem_ids))
    return _States(
        problem_ids=problem_ids, positions=np.array(positions, dtype=np.int64),
        layers=np.array(layers, dtype=np.int64), metrics=np.array(metrics, dtype=np.float64).reshape(-1, 4),
        targets=targets, test_problem_ids=test_ids,
    )


# ---------------------------------------------------------------------------------------------------------
# Groups: overall, each layer, each position, each cell


@dataclass(frozen=True)
class _Groups:
    layers: list[int]
    positions: list[int]

    @property
    def count(self) -> int:
        n_l, n_p = len(self.layers), len(self.positions)
        return 1 + n_l + n_p + n_l * n_p

    def ids(self, layers: np.ndarray, positions: np.ndarray) -> list[np.ndarray]:
        """For each state, its group id in each of the four breakdowns (overall, layer, position, cell)."""
        n_l, n_p = len(self.layers), len(self.positions)
        layer_rank = np.searchsorted(np.array(self.layers), layers)
        position_rank = np.searchsorted(np.array(self.positions), positions)
        return [
            np.zeros(len(layers), dtype=np.int64), 1 + layer_rank, 1 + n_l + position_rank,
            1 + n_l + n_p + layer_rank * n_p + position_rank,
        ]

    def key(self, group: int) -> tuple[str, int | None, int | None]:
        n_l, n_p = len(self.layers), len(self.positions)
        if group == 0:
            return "overall", None, None
        if group <= n_l:
            return "layer", self.layers[group - 1], None
        if group <= n_l + n_p:
            return "position", None, self.positions[group - 1 - n_l]
        cell = group - 1 - n_l - n_p
        return "cell", self.layers[cell // n_p], self.positions[cell % n_p]


def _sums(
    groups: _Groups, problem_of: np.ndarray, n_problems: int, layers: np.ndarray, positions: np.ndarray,
    metrics: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-problem sums of the metrics (P, G, 4) and state counts (P, G) in every group."""
    sums = np.zeros((n_problems, groups.count, 4))
    counts = np.zeros((n_problems, groups.count))
    for gid in groups.ids(layers, positions):
        np.add.at(sums, (problem_of, gid), metrics)
        np.add.at(counts, (problem_of, gid), 1.0)
    return sums, counts


def _means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    total = counts.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total[:, None] > 0, sums.sum(0) / np.where(total > 0, total, 1)[:, None], np.nan)


def _resampled_means(weights: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(R, G, 4) means under problem weights (R, P); NaN where a resample holds no state of a group."""
    n_problems, n_groups, n_metrics = sums.shape
    numerator = (weights @ sums.reshape(n_problems, -1)).reshape(-1, n_groups, n_metrics)
    denominator = (weights @ counts)[:, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def _multinomial(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _percentiles(samples: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bounds along axis 0, NaN where every sample is NaN."""
    valid = ~np.isnan(samples).all(0)
    lows = np.full(samples.shape[1:], np.nan)
    highs = np.full(samples.shape[1:], np.nan)
    if valid.any():
        lows[valid] = np.nanpercentile(samples[:, valid], 100 * low, axis=0)
        highs[valid] = np.nanpercentile(samples[:, valid], 100 * high, axis=0)
    return lows, highs


def _num(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


# ---------------------------------------------------------------------------------------------------------
# One pair


def _pairing(reference: _States, other: _States, ref: RunRecord, oth: RunRecord) -> str | None:
    """None when the two runs were scored on the same test set; else one line saying how they differ."""
    if ref.store_hash != oth.store_hash:
        return (f"test sets differ: the runs read different stores ({ref.store_hash[:12]} vs {oth.store_hash[:12]}); "
                "unpaired intervals, no p-values")
    if set(reference.test_problem_ids) != set(other.test_problem_ids):
        shared = len(set(reference.test_problem_ids) & set(other.test_problem_ids))
        return (f"test sets differ: different test problems ({len(reference.test_problem_ids)} vs "
                f"{len(other.test_problem_ids)}, {shared} shared; another seed, split fractions or subset); "
                "unpaired intervals, no p-values")
    common = reference.targets.keys() & other.targets.keys()
    differing = sum(reference.targets[key] != other.targets[key] for key in common)
    if differing:
        return (f"test sets differ: the targets differ at {differing} of {len(common)} shared (problem, position) "
                "states (another split, target or empty rule); unpaired intervals, no p-values")
    if not common:
        return "test sets differ: no (problem, position) state in common; unpaired intervals, no p-values"
    return None


def _compare_pair(
    reference: _Loaded, other: _Loaded, metric: Metric, resamples: int, seed: int, alpha: float,
    include_unchanged: bool,
) -> PairComparison:
    note = _pairing(reference.states, other.states, reference.record, other.record)
    rng = np.random.default_rng(seed)
    if note is None:
        rows, shared, note, flips = _paired_rows(reference.states, other.states, metric, resamples, rng, alpha)
        paired = True
        statistics = (
            f"paired on {shared:,} shared states: "
            + (f"sign-flip permutation test of the per-problem loss differences ({flips:,} flips)"
               if metric == "loss" else f"exact McNemar test on {metric} correctness per state")
            + f", paired bootstrap of problems ({resamples:,} resamples) for the {100 * (1 - alpha):g}% interval, "
            f"Holm across the rows of each table; significant: Holm-adjusted p <= {alpha:g} and the interval "
            "excludes 0"
        )
    else:
        rows = _unpaired_rows(reference.states, other.states, metric, resamples, rng, alpha)
        paired, shared = False, 0
        statistics = (
            f"unpaired: each run's problems bootstrapped independently ({resamples:,} resamples) for the "
            f"{100 * (1 - alpha):g}% interval; no p-values; significant when the Bonferroni-widened interval "
            f"(level 1 - {alpha:g}/rows) excludes 0"
        )
    return PairComparison(
        reference=reference.info(), other=other.info(), metric=metric, paired=paired, note=note,
        statistics=statistics, shared_states=shared,
        config=config_changes(reference.record.config, other.record.config, include_unchanged),
        headline=[
            HeadlineDelta(
                metric=name, reference=getattr(reference.record, column), other=getattr(other.record, column),
                delta=_delta(getattr(reference.record, column), getattr(other.record, column)),
            )
            for name, column in HEADLINE
        ],
        overall=rows["overall"][0], by_layer=rows["layer"], by_position=rows["position"], by_cell=rows["cell"],
    )


def _delta(reference: float | None, other: float | None) -> float | None:
    return None if reference is None or other is None else other - reference


def _paired_rows(
    reference: _States, other: _States, metric: Metric, resamples: int, rng: np.random.Generator, alpha: float,
) -> tuple[dict[str, list[DeltaRow]], int, str | None, int]:
    other_index = {key: index for index, key in enumerate(other.keys())}
    ia, ib = [], []
    for index, key in enumerate(reference.keys()):
        match = other_index.get(key)
        if match is not None:
            ia.append(index)
            ib.append(match)
    a_idx, b_idx = np.array(ia, dtype=np.int64), np.array(ib, dtype=np.int64)
    left_out = len(reference.problem_ids) + len(other.problem_ids) - 2 * len(ia)
    note = (f"paired on the {len(ia):,} states both runs scored; {left_out:,} states scored by one run only "
            "(other layers or positions) are left out") if left_out else None
    layers, positions = reference.layers[a_idx], reference.positions[a_idx]
    problems, problem_of = np.unique(np.array(reference.problem_ids, dtype=object)[a_idx].astype(str),
                                     return_inverse=True)
    groups = _Groups(sorted(set(layers.tolist())), sorted(set(positions.tolist())))
    metrics_a, metrics_b = reference.metrics[a_idx], other.metrics[b_idx]
    sums_a, counts = _sums(groups, problem_of, len(problems), layers, positions, metrics_a)
    sums_b, _ = _sums(groups, problem_of, len(problems), layers, positions, metrics_b)
    means_a, means_b = _means(sums_a, counts), _means(sums_b, counts)
    column = COLUMN[metric]

    weights = _multinomial(rng, len(problems), resamples)
    deltas = _resampled_means(weights, sums_b[:, :, [column]], counts) - _resampled_means(
        weights, sums_a[:, :, [column]], counts)
    low, high = _percentiles(deltas[:, :, 0], alpha / 2, 1 - alpha / 2)

    lost = gained = None
    largest = max(len(groups.layers) * len(groups.positions), len(groups.layers), len(groups.positions))
    flips = max(resamples, math.ceil(2 * largest / alpha))
    if metric == "loss":
        differences = sums_b[:, :, 0] - sums_a[:, :, 0]  # (P, G)
        observed = np.abs(differences.sum(0))
        signs = rng.choice(np.array([-1.0, 1.0]), size=(flips, len(problems)))
        flipped = np.abs(signs @ differences)
        tolerance = 1e-9 * np.maximum(1.0, observed)
        p_values = (1 + (flipped >= observed - tolerance).sum(0)) / (1 + flips)
    else:
        hit_a, hit_b = metrics_a[:, column] > 0.5, metrics_b[:, column] > 0.5
        lost, gained = np.zeros(groups.count, dtype=np.int64), np.zeros(groups.count, dtype=np.int64)
        for gid in groups.ids(layers, positions):
            lost += np.rint(np.bincount(gid, weights=(hit_a & ~hit_b).astype(np.float64), minlength=groups.count)).astype(np.int64)
            gained += np.rint(np.bincount(gid, weights=(~hit_a & hit_b).astype(np.float64), minlength=groups.count)).astype(np.int64)
        p_values = np.array([mcnemar_p(int(b), int(c)) for b, c in zip(lost, gained, strict=True)])

    present = counts.sum(0) > 0
    n_states = counts.sum(0).astype(np.int64)
    n_problems = (counts > 0).sum(0).astype(np.int64)
    tables: dict[str, list[DeltaRow]] = {"overall": [], "layer": [], "position": [], "cell": []}
    for group in range(groups.count):
        if not present[group]:
            continue
        kind, layer, position = groups.key(group)
        tables[kind].append(_row(
            layer, position, (int(n_states[group]),) * 2, (int(n_problems[group]),) * 2, means_a[group],
            means_b[group], (low[group], high[group]),
            None if lost is None else (int(lost[group]), int(gained[group])), float(p_values[group]),
        ))
    for kind, rows in tables.items():
        for row, adjusted in zip(rows, holm([row.p_value for row in rows]), strict=True):
            row.p_holm = adjusted
            row.significant = adjusted is not None and adjusted <= alpha and _excludes_zero(row.delta_low, row.delta_high)
    return tables, len(ia), note, flips


def _unpaired_rows(
    reference: _States, other: _States, metric: Metric, resamples: int, rng: np.random.Generator, alpha: float,
) -> dict[str, list[DeltaRow]]:
    groups = _Groups(
        sorted(set(reference.layers.tolist()) | set(other.layers.tolist())),
        sorted(set(reference.positions.tolist()) | set(other.positions.tolist())),
    )
    column = COLUMN[metric]
    per_run = []
    for states in (reference, other):
        problems, problem_of = np.unique(np.array(states.problem_ids, dtype=str), return_inverse=True)
        sums, counts = _sums(groups, problem_of, len(problems), states.layers, states.positions, states.metrics)
        resampled = _resampled_means(_multinomial(rng, len(problems), resamples), sums[:, :, [column]], counts)
        per_run.append((sums, counts, _means(sums, counts), resampled[:, :, 0]))
    (_, counts_a, means_a, boot_a), (_, counts_b, means_b, boot_b) = per_run
    deltas = boot_b - boot_a
    low, high = _percentiles(deltas, alpha / 2, 1 - alpha / 2)
    both = (counts_a.sum(0) > 0) & (counts_b.sum(0) > 0)
    tables: dict[str, list[DeltaRow]] = {"overall": [], "layer": [], "position": [], "cell": []}
    members: dict[str, list[int]] = {"overall": [], "layer": [], "position": [], "cell": []}
    for group in range(groups.count):
        if not both[group]:
            continue
        kind, layer, position = groups.key(group)
        members[kind].append(group)
        tables[kind].append(_row(
            layer, position, (int(counts_a[:, group].sum()), int(counts_b[:, group].sum())),
            (int((counts_a[:, group] > 0).sum()), int((counts_b[:, group] > 0).sum())), means_a[group],
            means_b[group], (low[group], high[group]), None, None,
        ))
    for kind, rows in tables.items():
        if not rows:
            continue
        family = alpha / len(rows)  # Bonferroni: the decision interval is widened for the table's rows
        wide_low, wide_high = _percentiles(deltas[:, members[kind]], family / 2, 1 - family / 2)
        for row, lo, hi in zip(rows, wide_low, wide_high, strict=True):
            row.significant = _excludes_zero(_num(lo), _num(hi))
    return tables


def _excludes_zero(low: float | None, high: float | None) -> bool:
    return low is not None and high is not None and (low > 0 or high < 0)


def _row(
    layer: int | None, position: int | None, n: tuple[int, int], problems: tuple[int, int], means_a: np.ndarray,
    means_b: np.ndarray, interval: tuple[float, float], discordant: tuple[int, int] | None, p_value: float | None,
) -> DeltaRow:
    values: dict[str, Any] = {}
    for metric in METRICS:
        a, b = _num(means_a[COLUMN[metric]]), _num(means_b[COLUMN[metric]])
        values[f"reference_{metric}"], values[f"other_{metric}"] = a, b
        values[f"delta_{metric}"] = _delta(a, b)
    low, high = _num(interval[0]), _num(interval[1])
    return DeltaRow(
        layer=layer, position=position, n_reference=n[0], n_other=n[1], problems_reference=problems[0],
        problems_other=problems[1], **values, delta_low=low, delta_high=high,
        lost=None if discordant is None else discordant[0], gained=None if discordant is None else discordant[1],
        p_value=p_value, p_holm=p_value, significant=False,
    )


# ---------------------------------------------------------------------------------------------------------
# Config differences


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys with their JSON values (``{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


_MISSING = "<absent>"


def config_changes(reference: Mapping[str, Any], other: Mapping[str, Any], include_unchanged: bool = False) -> list[ConfigChange]:
    """The flattened config keys whose values differ (every key with ``include_unchanged``), sorted."""
    a, b = flatten(reference), flatten(other)
    changes = []
    for key in sorted(a.keys() | b.keys()):
        left, right = a.get(key, _MISSING), b.get(key, _MISSING)
        changed = left != right
        if changed or include_unchanged:
            changes.append(ConfigChange(key=key, reference=left, other=right, changed=changed))
    return changes


# ---------------------------------------------------------------------------------------------------------
# Entry point


def compare_runs(
    locations: Locations,
    refs: list[str],
    *,
    metric: str = "top1",
    include_unchanged: bool = False,
    resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Comparison:
    """Compare every run in ``refs[1:]`` against ``refs[0]``, with paired statistics where the test sets match.

    Args:
        locations: where runs live (``Locations.resolve(home, db_url, tracking_uri)``).
        refs: two or more runs, each a run id, a unique id prefix, a run name, an MLflow run id or ``latest``;
            the first is the reference.
        metric: the metric whose delta gets an interval, a p-value and a significance verdict
            (``top1``, ``top5``, ``top10`` or ``loss``); every row shows the deltas of all four.
        include_unchanged: list every config key, not only those that differ.
        resamples: bootstrap resamples (and sign flips, for loss), at least 100.
        seed: seed of the resampling (the same seed gives the same intervals).
        alpha: significance level of the Holm-corrected tests; intervals are at ``1 - alpha``.

    Returns:
        A ``Comparison`` with one ``PairComparison`` per run after the first.

    Raises:
        ConfigError: fewer than two runs, an unknown metric, too few resamples or alpha outside (0, 1).
        RegistryError: a run is unknown, not finished, or has no per-state predictions (neither in its run
            directory nor as the MLflow artifact ``run/predictions.jsonl``).
        TrackingError: MLflow had to be asked for predictions and could not be reached.
    """
    if len(refs) < 2:
        raise ConfigError(f"compare needs at least two runs (a reference and one to compare), got {len(refs)}")
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    if resamples < MIN_RESAMPLES:
        raise ConfigError(f"--resamples must be at least {MIN_RESAMPLES}, not {resamples}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be between 0 and 1, not {alpha}")
    with locations.registry() as registry:
        records = [registry.resolve(ref) for ref in refs]
    with tempfile.TemporaryDirectory(prefix="ctexp-compare-") as scratch:
        loaded: dict[str, _Loaded] = {}
        for record in records:
            if record.id not in loaded:
                loaded[record.id] = _load_run(locations, record, Path(scratch))
    reference = loaded[records[0].id]
    chosen: Metric = metric  # type: ignore[assignment]  # checked above
    return Comparison(
        metric=chosen, alpha=alpha, interval_level=1 - alpha, resamples=resamples, seed=seed,
        reference=reference.info(),
        comparisons=[
            _compare_pair(reference, loaded[record.id], chosen, resamples, seed, alpha, include_unchanged)
            for record in records[1:]
        ],
    )
