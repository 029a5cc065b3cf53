"""Evaluation: metrics by every grouping (``groupings.GROUPINGS``) with bootstrap intervals, baselines and samples.

Intervals are 95% percentile bootstrap intervals that resample *problems* (all states of a problem
move together, since they are not independent), 1,000 resamples, seeded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ctexp.analysis.groupings import GROUPINGS, GroupIndex
from ctexp.analysis.result import GroupMetrics, Sample, SampleToken
from ctexp.data.align import AlignedProblem
from ctexp.data.dataset import SplitSamples
from ctexp.data.tokenizers import Tokenizer

METRICS = ("loss", "top1", "top5", "top10")
BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class StateScores:
    """Per-state results of one scorer (lens or baseline) on one split, as numpy arrays."""

    problem_index: np.ndarray  # (S,)
    position: np.ndarray  # (S,)
    metrics: np.ndarray  # (S, L, 4): loss, hit1, hit5, hit10
    top_ids: np.ndarray | None = None  # (S, L, k)
    top_probs: np.ndarray | None = None  # (S, L, k)

    @classmethod
    def from_scores(cls, samples: SplitSamples, result: dict[str, torch.Tensor]) -> StateScores:
        metrics = torch.stack(
            [result["loss"], result["hit1"].float(), result["hit5"].float(), result["hit10"].float()], dim=-1
        )
        return cls(
            problem_index=samples.problem_index.numpy(),
            position=samples.position.numpy(),
            metrics=metrics.cpu().double().numpy(),
            top_ids=result["top_ids"][..., :5].cpu().numpy() if "top_ids" in result else None,
            top_probs=result["top_probs"][..., :5].cpu().float().numpy() if "top_probs" in result else None,
        )


def breakdown(table: StateScores, layers: list[int], positions: list[int], seed: int) -> dict[str, list[GroupMetrics]]:
    """Aggregate per-state metrics by every grouping (overall, per layer, per position, per cell), with intervals.

    Every group is listed, also one without states (``n == 0``, metrics None). One bootstrap serves all
    groups: the same problem weights resample every group.

    Returns:
        Per grouping name, its rows in ``GroupIndex`` order (layers, then positions, as given).
    """
    n_states, n_layers, _ = table.metrics.shape
    problems, problem_of = np.unique(table.problem_index, return_inverse=True)
    index = GroupIndex({"layer": layers, "position": positions})
    axes = {  # each (state, layer) pair's value on every axis
        "layer": np.asarray(layers, dtype=np.int64).reshape(1, -1),  # (1, L)
        "position": table.position.reshape(-1, 1),  # (S, 1)
    }
    sums = np.zeros((len(problems), index.count, len(METRICS)))
    counts = np.zeros((len(problems), index.count))
    rows = np.broadcast_to(problem_of.reshape(-1, 1), (n_states, n_layers))
    for gid in index.ids(axes):
        gid = np.broadcast_to(gid, (n_states, n_layers))
        np.add.at(sums, (rows, gid), table.metrics)
        np.add.at(counts, (rows, gid), 1.0)
    present = (counts > 0).astype(np.float64)
    estimate, low, high = _bootstrap(sums, counts, seed)
    grouped: dict[str, list[GroupMetrics]] = {g.name: [] for g in GROUPINGS}
    for g, (grouping, key) in enumerate(index.groups()):
        grouped[grouping.name].append(GroupMetrics(
            **key,
            n=int(counts[:, g].sum()),
            problems=int(present[:, g].sum()),
            **{m: _num(estimate[g, i]) for i, m in enumerate(METRICS)},
            ci={m: _interval(low[g, i], high[g, i]) for i, m in enumerate(METRICS)},
        ))
    return grouped


def _bootstrap(sums: np.ndarray, counts: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point estimates and 95% percentile intervals of ratio means, resampling problems."""
    n_problems, n_groups, n_metrics = sums.shape
    total = counts.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = sums.sum(0) / total[:, None]  # (G, M)
        weights = np.random.default_rng(seed).multinomial(
            n_problems, np.full(n_problems, 1.0 / n_problems), size=BOOTSTRAP_RESAMPLES
        ).astype(np.float64)  # (B, P)
        numerator = (weights @ sums.reshape(n_problems, -1)).reshape(-1, n_groups, n_metrics)
        denominator = (weights @ counts)[:, :, None]
        ratios = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)
    valid = ~np.isnan(ratios).all(0)
    low = np.full((n_groups, n_metrics), np.nan)
    high = np.full((n_groups, n_metrics), np.nan)
    if valid.any():
        low[valid] = np.nanpercentile(ratios[:, valid], 2.5, axis=0)
        high[valid] = np.nanpercentile(ratios[:, valid], 97.5, axis=0)
    return estimate, low, high


def _num(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def _interval(low: float, high: float) -> tuple[float, float] | None:
    return None if not (np.isfinite(low) and np.isfinite(high)) else (float(low), float(high))


def prior_scores(train: SplitSamples, test: SplitSamples, vocab: int, n_layers: int) -> StateScores:
    """The ``prior`` baseline: rank tokens by how often they are targets at this position in training.

    Its loss uses add-one smoothed frequencies over the vocabulary; it is the same at every layer.
    """
    frequency: dict[int, Counter[int]] = {}
    for position, targets in zip(train.position.tolist(), train.targets.tolist()):
        frequency.setdefault(position, Counter()).update(t for t in targets if t >= 0)
    rows = []
    for position, targets in zip(test.position.tolist(), test.targets.tolist()):
        counts = frequency.get(position, Counter())
        ranking = [token for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:10]]
        total = sum(counts.values())
        wanted = [t for t in targets if t >= 0]
        loss = -float(np.mean([np.log((counts.get(t, 0) + 1) / (total + vocab)) for t in wanted]))
        rank = min((ranking.index(t) for t in wanted if t in ranking), default=10)
        rows.append([loss, rank < 1, rank < 5, rank < 10])
    metrics = np.repeat(np.array(rows, dtype=np.float64)[:, None, :], n_layers, axis=1)
    return StateScores(test.problem_index.numpy(), test.position.numpy(), metrics)


def pick_samples(
    table: StateScores,
    layers: list[int],
    aligned: list[AlignedProblem],
    tokenizer: Tokenizer,
    seed: int,
    per_position: int = 1,
) -> list[Sample]:
    """A few test predictions (one per position by default), chosen by seed, decoded for reading."""
    assert table.top_ids is not None and table.top_probs is not None
    rng = np.random.default_rng(seed)
    samples = []
    for position in sorted(set(table.position.tolist())):
        rows = np.flatnonzero(table.position == position)
        for row in rng.choice(rows, size=min(per_position, len(rows)), replace=False):
            layer_rank = int(rng.integers(len(layers)))
            problem = aligned[int(table.problem_index[row])]
            alignment = problem.positions[position]
            samples.append(
                Sample(
                    problem_id=problem.id,
                    layer=layers[layer_rank],
                    position=int(position),
                    steps=problem.steps,
                    slice_tokens=[tokenizer.token_str(t) for t in alignment.token_ids],
                    targets=[SampleToken(id=t, token=tokenizer.token_str(t)) for t in alignment.target_ids],
                    predictions=[
                        SampleToken(id=int(i), token=tokenizer.token_str(int(i)), prob=float(p))
                        for i, p in zip(table.top_ids[row, layer_rank], table.top_probs[row, layer_rank])
                    ],
                    correct=bool(table.metrics[row, layer_rank, 1]),
                    in_top5=bool(table.metrics[row, layer_rank, 2]),
                )
            )
    return samples


def prediction_rows(table: StateScores, layers: list[int], aligned: list[AlignedProblem]) -> list[dict]:
    """One record per test state: what was predicted, for later paired comparisons."""
    assert table.top_ids is not None and table.top_probs is not None
    rows = []
    for s in range(len(table.problem_index)):
        problem = aligned[int(table.problem_index[s])]
        position = int(table.position[s])
        for j, layer in enumerate(layers):
            rows.append(
                {
                    "problem_id": problem.id,
                    "position": position,
                    "layer": layer,
                    "targets": problem.positions[position].target_ids,
                    "top5_ids": table.top_ids[s, j].tolist(),
                    "top5_probs": [round(float(p), 6) for p in table.top_probs[s, j]],
                    "loss": round(float(table.metrics[s, j, 0]), 6),
                    "hit1": bool(table.metrics[s, j, 1]),
                    "hit5": bool(table.metrics[s, j, 2]),
                    "hit10": bool(table.metrics[s, j, 3]),
                }
            )
    return rows
