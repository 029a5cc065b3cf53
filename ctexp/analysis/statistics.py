"""The statistics of ``compare``: exact McNemar test, Holm's adjustment, and the problem bootstrap.

Pure functions on numbers and arrays; ``compare`` says when each is used and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

EXACT_BINOMIAL_MAX_N = 2000  # above this, the binomial tail is summed in log space


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


# ---------------------------------------------------------------------------------------------------------
# The problem bootstrap: sums per problem and group, resampled by problem weights


def means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(G, 4) means from per-problem sums (P, G, 4) and counts (P, G); NaN where a group has no state."""
    total = counts.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total[:, None] > 0, sums.sum(0) / np.where(total > 0, total, 1)[:, None], np.nan)


def resampled_means(weights: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(R, G, 4) means under problem weights (R, P); NaN where a resample holds no state of a group."""
    n_problems, n_groups, n_metrics = sums.shape
    numerator = (weights @ sums.reshape(n_problems, -1)).reshape(-1, n_groups, n_metrics)
    denominator = (weights @ counts)[:, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def multinomial(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """(R, n) bootstrap weights: how often each of ``n`` problems is drawn in each of ``R`` resamples."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def percentiles(samples: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bounds along axis 0, NaN where every sample is NaN."""
    valid = ~np.isnan(samples).all(0)
    lows = np.full(samples.shape[1:], np.nan)
    highs = np.full(samples.shape[1:], np.nan)
    if valid.any():
        lows[valid] = np.nanpercentile(samples[:, valid], 100 * low, axis=0)
        highs[valid] = np.nanpercentile(samples[:, valid], 100 * high, axis=0)
    return lows, highs


def excludes_zero(low: float | None, high: float | None) -> bool:
    """Whether an interval lies wholly on one side of 0."""
    return low is not None and high is not None and (low > 0 or high < 0)


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (95% by default); None when ``n`` is 0.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n successes.
    """
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
