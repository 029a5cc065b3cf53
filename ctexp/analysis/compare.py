"""Compare runs: what changed between them, and whether each per-layer, per-position or per-cell delta is real.

``compare_runs([A, B, C])`` compares every loaded run (``comparison.ComparedRun``: what the registry holds of
it and its per-state predictions; ``registry.readback.load_compared_runs`` loads them) against the first (the
reference) and returns a typed ``Comparison``; ``ctexp compare`` prints it. For each pair it reports the
config keys that differ, the headline metrics with deltas, and a table per grouping
(``groupings.GROUPINGS``: overall, by layer, by position, by (layer, position) cell) of the two runs' top-1/5/10 and loss, their deltas (``other - reference``; a negative
``delta_loss`` is an improvement), an interval of the delta of the chosen metric, a p-value, its Holm
adjustment across the rows of the table, and whether the delta is significant.

Statistics (``statistics``), from the per-state predictions that every run keeps (``HOME/runs/RUN_ID/predictions.jsonl``,
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
  - ``p_holm``: Holm's step-down adjustment across the rows of one table (one grouping: by layer, by
    position, by cell; the overall row is a family of one).
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

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ctexp.analysis.comparison import (
    ComparedRun,
    Comparison,
    ConfigChange,
    DeltaRow,
    HeadlineDelta,
    Metric,
    PairComparison,
    RecordedRun,
    RunStates,
)
from ctexp.analysis.groupings import GROUPINGS, GroupIndex
from ctexp.analysis.statistics import (
    excludes_zero,
    holm,
    mcnemar_p,
    means,
    multinomial,
    percentiles,
    resampled_means,
)
from ctexp.errors import ConfigError

METRICS: tuple[Metric, ...] = ("top1", "top5", "top10", "loss")
COLUMN = {"loss": 0, "top1": 1, "top5": 2, "top10": 3}  # columns of the per-state metrics array
HEADLINE = (
    ("top1", "test_top1"), ("top5", "test_top5"), ("top10", "test_top10"), ("loss", "test_loss"),
    ("prior_top1", "prior_top1"), ("identity_top1", "identity_top1"),
)
MIN_RESAMPLES = 100


# ---------------------------------------------------------------------------------------------------------
# One pair


def _pairing(reference: RunStates, other: RunStates, ref: RecordedRun, oth: RecordedRun) -> str | None:
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
    reference: ComparedRun, other: ComparedRun, metric: Metric, resamples: int, seed: int, alpha: float,
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
        groups=rows,
    )


def _delta(reference: float | None, other: float | None) -> float | None:
    return None if reference is None or other is None else other - reference


def _paired_rows(
    reference: RunStates, other: RunStates, metric: Metric, resamples: int, rng: np.random.Generator, alpha: float,
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
    axes = {axis: values[a_idx] for axis, values in reference.axes().items()}
    problems, problem_of = np.unique(np.array(reference.problem_ids, dtype=object)[a_idx].astype(str),
                                     return_inverse=True)
    index = GroupIndex({axis: sorted(set(values.tolist())) for axis, values in axes.items()})
    ids = index.ids(axes)
    metrics_a, metrics_b = reference.metrics[a_idx], other.metrics[b_idx]
    sums_a, counts = _sums(index.count, ids, problem_of, len(problems), metrics_a)
    sums_b, _ = _sums(index.count, ids, problem_of, len(problems), metrics_b)
    means_a, means_b = means(sums_a, counts), means(sums_b, counts)
    column = COLUMN[metric]

    weights = multinomial(rng, len(problems), resamples)
    deltas = resampled_means(weights, sums_b[:, :, [column]], counts) - resampled_means(
        weights, sums_a[:, :, [column]], counts)
    low, high = percentiles(deltas[:, :, 0], alpha / 2, 1 - alpha / 2)

    lost = gained = None
    flips = max(resamples, math.ceil(2 * index.largest() / alpha))
    if metric == "loss":
        differences = sums_b[:, :, 0] - sums_a[:, :, 0]  # (P, G)
        observed = np.abs(differences.sum(0))
        signs = rng.choice(np.array([-1.0, 1.0]), size=(flips, len(problems)))
        flipped = np.abs(signs @ differences)
        tolerance = 1e-9 * np.maximum(1.0, observed)
        p_values = (1 + (flipped >= observed - tolerance).sum(0)) / (1 + flips)
    else:
        hit_a, hit_b = metrics_a[:, column] > 0.5, metrics_b[:, column] > 0.5
        lost, gained = np.zeros(index.count, dtype=np.int64), np.zeros(index.count, dtype=np.int64)
        for gid in ids:
            lost += np.rint(np.bincount(gid, weights=(hit_a & ~hit_b).astype(np.float64), minlength=index.count)).astype(np.int64)
            gained += np.rint(np.bincount(gid, weights=(~hit_a & hit_b).astype(np.float64), minlength=index.count)).astype(np.int64)
        p_values = np.array([mcnemar_p(int(b), int(c)) for b, c in zip(lost, gained, strict=True)])

    present = counts.sum(0) > 0
    n_states = counts.sum(0).astype(np.int64)
    n_problems = (counts > 0).sum(0).astype(np.int64)
    tables: dict[str, list[DeltaRow]] = {grouping.name: [] for grouping in GROUPINGS}
    for group, (grouping, key) in enumerate(index.groups()):
        if not present[group]:
            continue
        tables[grouping.name].append(_row(
            key, (int(n_states[group]),) * 2, (int(n_problems[group]),) * 2, means_a[group],
            means_b[group], (low[group], high[group]),
            None if lost is None else (int(lost[group]), int(gained[group])), float(p_values[group]),
        ))
    for rows in tables.values():
        for row, adjusted in zip(rows, holm([row.p_value for row in rows]), strict=True):
            row.p_holm = adjusted
            row.significant = adjusted is not None and adjusted <= alpha and excludes_zero(row.delta_low, row.delta_high)
    return tables, len(ia), note, flips


def _unpaired_rows(
    reference: RunStates, other: RunStates, metric: Metric, resamples: int, rng: np.random.Generator, alpha: float,
) -> dict[str, list[DeltaRow]]:
    index = GroupIndex({
        axis: sorted(set(values.tolist()) | set(other.axes()[axis].tolist())) for axis, values in reference.axes().items()
    })
    column = COLUMN[metric]
    per_run = []
    for states in (reference, other):
        problems, problem_of = np.unique(np.array(states.problem_ids, dtype=str), return_inverse=True)
        sums, counts = _sums(index.count, index.ids(states.axes()), problem_of, len(problems), states.metrics)
        resampled = resampled_means(multinomial(rng, len(problems), resamples), sums[:, :, [column]], counts)
        per_run.append((sums, counts, means(sums, counts), resampled[:, :, 0]))
    (_, counts_a, means_a, boot_a), (_, counts_b, means_b, boot_b) = per_run
    deltas = boot_b - boot_a
    low, high = percentiles(deltas, alpha / 2, 1 - alpha / 2)
    both = (counts_a.sum(0) > 0) & (counts_b.sum(0) > 0)
    tables: dict[str, list[DeltaRow]] = {grouping.name: [] for grouping in GROUPINGS}
    members: dict[str, list[int]] = {grouping.name: [] for grouping in GROUPINGS}
    for group, (grouping, key) in enumerate(index.groups()):
        if not both[group]:
            continue
        members[grouping.name].append(group)
        tables[grouping.name].append(_row(
            key, (int(counts_a[:, group].sum()), int(counts_b[:, group].sum())),
            (int((counts_a[:, group] > 0).sum()), int((counts_b[:, group] > 0).sum())), means_a[group],
            means_b[group], (low[group], high[group]), None, None,
        ))
    for kind, rows in tables.items():
        if not rows:
            continue
        family = alpha / len(rows)  # Bonferroni: the decision interval is widened for the table's rows
        wide_low, wide_high = percentiles(deltas[:, members[kind]], family / 2, 1 - family / 2)
        for row, lo, hi in zip(rows, wide_low, wide_high, strict=True):
            row.significant = excludes_zero(_num(lo), _num(hi))
    return tables


def _sums(
    n_groups: int, ids: list[np.ndarray], problem_of: np.ndarray, n_problems: int, metrics: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-problem sums of the metrics (P, G, 4) and state counts (P, G) in every group."""
    sums = np.zeros((n_problems, n_groups, 4))
    counts = np.zeros((n_problems, n_groups))
    for gid in ids:  # one array of group ids per grouping
        np.add.at(sums, (problem_of, gid), metrics)
        np.add.at(counts, (problem_of, gid), 1.0)
    return sums, counts


def _num(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _row(
    key: dict[str, int], n: tuple[int, int], problems: tuple[int, int], means_a: np.ndarray,
    means_b: np.ndarray, interval: tuple[float, float], discordant: tuple[int, int] | None, p_value: float | None,
) -> DeltaRow:
    values: dict[str, Any] = {}
    for metric in METRICS:
        a, b = _num(means_a[COLUMN[metric]]), _num(means_b[COLUMN[metric]])
        values[f"reference_{metric}"], values[f"other_{metric}"] = a, b
        values[f"delta_{metric}"] = _delta(a, b)
    low, high = _num(interval[0]), _num(interval[1])
    return DeltaRow(
        **key, n_reference=n[0], n_other=n[1], problems_reference=problems[0],
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


def check_options(n_runs: int, metric: str, resamples: int, alpha: float) -> Metric:
    """Check a comparison's options before any run is loaded.

    Returns:
        ``metric``, typed.

    Raises:
        ConfigError: fewer than two runs, an unknown metric, too few resamples or alpha outside (0, 1).
    """
    if n_runs < 2:
        raise ConfigError(f"compare needs at least two runs (a reference and one to compare), got {n_runs}")
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    if resamples < MIN_RESAMPLES:
        raise ConfigError(f"--resamples must be at least {MIN_RESAMPLES}, not {resamples}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be between 0 and 1, not {alpha}")
    return metric  # type: ignore[return-value]  # checked above


def compare_runs(
    runs: Sequence[ComparedRun],
    *,
    metric: str = "top1",
    include_unchanged: bool = False,
    resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Comparison:
    """Compare every run in ``runs[1:]`` against ``runs[0]``, with paired statistics where the test sets match.

    Args:
        runs: two or more loaded runs (``registry.readback.load_compared_runs``); the first is the reference.
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
    """
    chosen = check_options(len(runs), metric, resamples, alpha)
    reference = runs[0]
    return Comparison(
        metric=chosen, alpha=alpha, interval_level=1 - alpha, resamples=resamples, seed=seed,
        reference=reference.info(),
        comparisons=[
            _compare_pair(reference, other, chosen, resamples, seed, alpha, include_unchanged) for other in runs[1:]
        ],
    )
