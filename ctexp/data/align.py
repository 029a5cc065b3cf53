"""Alignment: which CoT tokens each continuous-thought position must predict.

A problem's CoT (steps joined by one space, no BOS) is tokenized into N ids. The split rule cuts them
into T contiguous slices in order (see ``SplitRule``); the target rule picks the targets within a
slice; the empty policy decides what an empty slice becomes. Problems are split into
train/validation/test by problem, so a problem never sits in two splits.

Target rules on a slice ``s`` of length n:
    * ``first``: ``s[0]`` (the reference), ``last``: ``s[-1]``, ``middle``: ``s[n // 2]``;
    * ``informative``: the token with the highest IDF, where
      ``idf(t) = ln((1 + D) / (1 + df(t))) + 1`` over the D training problems' CoTs (``df`` counts
      problems containing t; a token never seen in training gets the highest value); ties go to the
      earliest token in the slice;
    * ``all``: every token of the slice, in order (duplicates kept once).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ctexp.config import EmptyPolicy, SplitRule, TargetRule
from ctexp.data.problems import Problem
from ctexp.data.tokenizers import Tokenizer
from ctexp.errors import DataError


@dataclass(frozen=True)
class PositionAlignment:
    """One position of one problem: its slice of CoT tokens and the targets it must predict."""

    position: int
    token_ids: list[int]
    target_ids: list[int]
    filled_from: int | None = None  # for the ``nearest`` policy: the position whose targets it took


@dataclass(frozen=True)
class AlignedProblem:
    id: str
    steps: list[str]
    token_ids: list[int]
    positions: list[PositionAlignment]


@dataclass(frozen=True)
class ProblemSplits:
    """Indices of problems (into the store's problem list) in each split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def items(self) -> list[tuple[str, np.ndarray]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]


def tokenize_cot(problems: Sequence[Problem], tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids of each problem's CoT: steps joined with one space, no BOS (the reference's form)."""
    return [tokenizer.encode(problem.cot_text) for problem in problems]


def slice_bounds(n_tokens: int, n_positions: int, rule: SplitRule) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` slices of ``n_tokens`` for each of ``n_positions`` positions."""
    if rule.weights is None:
        return [(i * n_tokens // n_positions, (i + 1) * n_tokens // n_positions) for i in range(n_positions)]
    sizes = largest_remainder(n_tokens, rule.weights)
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Apportion ``total`` to integer sizes proportional to ``weights`` (Hamilton's method).

    Each share gets ``floor(total * w / sum(w))``; the leftover units go one each to the largest
    fractional remainders, ties to the earlier index. Arithmetic is exact (fractions), so ties that
    are exact on paper are ties here, and huge weights cannot overflow.
    """
    exact = [Fraction(float(w)) for w in weights]
    weight_sum = sum(exact)
    quotas = [total * w / weight_sum for w in exact]
    sizes = [math.floor(q) for q in quotas]
    leftover = total - sum(sizes)
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in order[:leftover]:
        sizes[i] += 1
    return sizes


def idf_table(token_lists: Iterable[Sequence[int]]) -> tuple[dict[int, float], float]:
    """Smoothed IDF of each token over documents; also the value for an unseen token."""
    documents = 0
    frequency: Counter[int] = Counter()
    for tokens in token_lists:
        documents += 1
        frequency.update(set(tokens))
    idf = {token: math.log((1 + documents) / (1 + count)) + 1 for token, count in frequency.items()}
    return idf, math.log(1 + documents) + 1


def select_targets(
    tokens: Sequence[int], rule: TargetRule, idf: tuple[dict[int, float], float] | None = None
) -> list[int]:
    """The target ids of one non-empty slice under ``rule``."""
    if not tokens:
        return []
    if rule is TargetRule.FIRST:
        return [tokens[0]]
    if rule is TargetRule.LAST:
        return [tokens[-1]]
    if rule is TargetRule.MIDDLE:
        return [tokens[len(tokens) // 2]]
    if rule is TargetRule.ALL:
        return list(dict.fromkeys(tokens))
    if idf is None:
        raise ValueError("the informative target rule needs an IDF table")
    table, unseen = idf
    best = max(range(len(tokens)), key=lambda i: (table.get(tokens[i], unseen), -i))
    return [tokens[best]]


def align_problem(
    problem: Problem,
    token_ids: list[int],
    n_positions: int,
    split: SplitRule,
    target: TargetRule,
    empty: EmptyPolicy,
    idf: tuple[dict[int, float], float] | None = None,
) -> AlignedProblem:
    """Assign one problem's CoT tokens to positions and pick each position's targets."""
    if split.weights is not None and len(split.weights) != n_positions:
        raise DataError(
            f"split has {len(split.weights)} weights but the store has {n_positions} positions; "
            f"give one weight per position"
        )
    slices = [token_ids[start:end] for start, end in slice_bounds(len(token_ids), n_positions, split)]
    targets = [select_targets(tokens, target, idf) for tokens in slices]
    filled: list[int | None] = [None] * n_positions
    if empty is EmptyPolicy.NEAREST and any(targets):
        filled = [None if targets[i] else _nearest_filled(targets, i) for i in range(n_positions)]
        targets = [targets[i] if source is None else targets[source] for i, source in enumerate(filled)]
    positions = [
        PositionAlignment(i, slices[i], targets[i], filled[i]) for i in range(n_positions)
    ]
    return AlignedProblem(problem.id, list(problem.steps), token_ids, positions)


def _nearest_filled(targets: list[list[int]], position: int) -> int:
    candidates = [i for i, t in enumerate(targets) if t]
    return min(candidates, key=lambda i: (abs(i - position), i))


def split_problems(n_problems: int, val_fraction: float, test_fraction: float, seed: int) -> ProblemSplits:
    """A seeded split of problem indices into train/validation/test (each non-empty).

    Raises:
        DataError: too few problems for three non-empty splits.
    """
    if n_problems < 3:
        raise DataError(f"{n_problems} problems cannot be split into train, validation and test; use at least 3")
    order = np.random.default_rng(seed).permutation(n_problems)
    n_test = max(1, round(n_problems * test_fraction))
    n_val = max(1, round(n_problems * val_fraction))
    if n_test + n_val >= n_problems:
        raise DataError(f"{n_problems} problems leave none for training; lower --val-fraction/--test-fraction")
    return ProblemSplits(
        train=np.sort(order[n_test + n_val :]), val=np.sort(order[n_test : n_test + n_val]), test=np.sort(order[:n_test])
    )
