"""The aligned dataset: training samples as tensors, ready to move to a device.

A sample is one (problem, position) pair with its targets; it is scored at every selected layer, so
a sample holds ``len(layers)`` training states. Targets are padded with -1 to the longest target list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ctexp.config import ExperimentConfig, Subset, TargetRule, parse_index_spec
from ctexp.data.align import AlignedProblem, ProblemSplits, align_problem, idf_table, split_problems, tokenize_cot
from ctexp.data.store import Store
from ctexp.data.tokenizers import Tokenizer
from ctexp.errors import ConfigError, DataError, TokenizerError

PAD = -1
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSamples:
    """The samples of one split."""

    problem_index: torch.Tensor  # (S,) index into the store's problems
    position: torch.Tensor  # (S,) CT position
    targets: torch.Tensor  # (S, K) token ids, PAD-padded

    def __len__(self) -> int:
        return int(self.problem_index.shape[0])


@dataclass(frozen=True)
class AlignedDataset:
    """Everything training and evaluation need to know about the data."""

    layers: list[int]
    positions: list[int]
    problem_splits: ProblemSplits
    aligned: list[AlignedProblem]  # one per store problem (problems outside the subset: empty)
    samples: dict[str, SplitSamples]
    empty_positions: dict[str, list[int]] = field(default_factory=dict)  # per position: empty, skipped, filled

    def states(self, store: Store, split: str, device: torch.device) -> torch.Tensor:
        """The hidden states of a split's samples at the selected layers, as float32 on ``device``."""
        samples = self.samples[split]
        layer_index = torch.tensor(self.layers)
        hidden = store.hidden[samples.problem_index[:, None], layer_index[None, :], samples.position[:, None]]
        return hidden.to(device=device, dtype=torch.float32)  # (S, L, d)


def resolve_indices(spec: str, upper: int, what: str) -> list[int]:
    """Resolve a layers/positions spec against the store's sizes, as a ConfigError on failure."""
    try:
        indices = parse_index_spec(spec, upper)
    except ValueError as error:
        raise ConfigError(f"--{what}: {error}") from None
    assert indices is not None
    return indices


def subset_indices(store: Store, subset: Subset) -> np.ndarray:
    """Indices of the problems in the requested correctness subset."""
    if subset is Subset.ALL:
        return np.arange(len(store.problems))
    labels = [problem.correct for problem in store.problems]
    if any(label is None for label in labels):
        raise ConfigError(
            f"--subset {subset.value} needs answer correctness, which this store does not record; use --subset all"
        )
    want = subset is Subset.CORRECT
    chosen = np.array([i for i, label in enumerate(labels) if label == want], dtype=np.int64)
    if len(chosen) < 3:
        raise DataError(f"only {len(chosen)} problems are {subset.value}; too few to train and test")
    return chosen


def build_dataset(store: Store, config: ExperimentConfig, tokenizer: Tokenizer) -> AlignedDataset:
    """Tokenize, split by problem, align and pack the samples of every split.

    Raises:
        ConfigError, DataError, TokenizerError: one line saying what does not fit.
    """
    meta = store.meta
    layers = resolve_indices(config.layers, meta.n_states, "layers")
    positions = resolve_indices(config.positions, meta.n_positions, "positions")
    if config.split.weights is not None and len(config.split.weights) != meta.n_positions:
        raise ConfigError(
            f"--split has {len(config.split.weights)} weights but the store has {meta.n_positions} positions; "
            f"give one weight per position"
        )
    chosen = subset_indices(store, config.subset)
    token_lists = tokenize_cot(store.problems, tokenizer)
    _check_vocab(token_lists, meta.vocab, tokenizer.spec)
    local = split_problems(len(chosen), config.val_fraction, config.test_fraction, config.seed)
    splits = ProblemSplits(train=chosen[local.train], val=chosen[local.val], test=chosen[local.test])
    idf = idf_table(token_lists[i] for i in splits.train) if config.target is TargetRule.INFORMATIVE else None
    aligned = [
        align_problem(problem, tokens, meta.n_positions, config.split, config.target, config.empty, idf)
        for problem, tokens in zip(store.problems, token_lists, strict=True)
    ]
    samples = {name: _pack(aligned, indices, positions) for name, indices in splits.items()}
    for name in SPLITS:
        if len(samples[name]) == 0:
            raise DataError(f"the {name} split has no targets; the problems' CoTs are empty for these positions")
    return AlignedDataset(layers, positions, splits, aligned, samples, _empty_counts(aligned, chosen, meta.n_positions))


def _check_vocab(token_lists: list[list[int]], vocab: int, spec: str) -> None:
    highest = max((max(tokens) for tokens in token_lists if tokens), default=-1)
    if highest >= vocab:
        raise TokenizerError(
            f"tokenizer {spec} produces id {highest} but the store's unembedding has {vocab} rows; "
            f"use the tokenizer the store was made with"
        )


def _pack(aligned: list[AlignedProblem], problem_indices: np.ndarray, positions: list[int]) -> SplitSamples:
    rows = [
        (int(p), position, aligned[p].positions[position].target_ids)
        for p in problem_indices
        for position in positions
        if aligned[p].positions[position].target_ids
    ]
    width = max((len(targets) for _, _, targets in rows), default=1)
    targets = torch.full((len(rows), width), PAD, dtype=torch.long)
    for row, (_, _, ids) in enumerate(rows):
        targets[row, : len(ids)] = torch.tensor(ids)
    return SplitSamples(
        problem_index=torch.tensor([p for p, _, _ in rows], dtype=torch.long),
        position=torch.tensor([q for _, q, _ in rows], dtype=torch.long),
        targets=targets,
    )


def _empty_counts(aligned: list[AlignedProblem], chosen: np.ndarray, n_positions: int) -> dict[str, list[int]]:
    """Per position: how many problems had an empty slice, and of those how many were skipped or filled."""
    empty = [0] * n_positions
    filled = [0] * n_positions
    for p in chosen:
        for alignment in aligned[int(p)].positions:
            if not alignment.token_ids:
                empty[alignment.position] += 1
                filled[alignment.position] += alignment.filled_from is not None
    return {"empty": empty, "skipped": [e - f for e, f in zip(empty, filled)], "filled": filled}
