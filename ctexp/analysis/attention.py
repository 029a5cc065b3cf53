"""What bot and each continuous thought attend to, and how that relates to what a lens decodes from them.

Three statistics over a store's attention file (weights averaged over heads; see
:mod:`ctexp.data.attention` for the layout), for the chosen layers (1..L, named by the hidden state
their block writes) and rows (thought positions 0..T-1 and ``bot``):

* **mass by kind**: per (layer, row), the mean over problems of the attention on each kind of context
  slot: the tokenizer's BOS (``start``), question numbers, operators, other question tokens
  (``question``), bot, earlier thoughts (``thoughts``) and the row's own input (``self``; bot's own slot
  counts as ``bot``). The kinds of a row sum to 1.
* **top tokens**: per row, the question tokens that receive the most attention, averaged over the chosen
  layers: the mass a token id receives, summed over its occurrences, averaged over all problems.
* **target contrast** (with a lens run on the same store): per thought position, the attention a test
  state's layer and position put on the occurrences of the state's target token(s) in its question, for
  states the lens decoded correctly (top-1) and incorrectly, and the difference with a 95% bootstrap
  interval over problems. A state is paired with the attention of the block that wrote it (layer s with
  attention layer s; states of layer 0, the embeddings, have none). A question token is an occurrence
  when its text, stripped of surrounding spaces, equals a target's (so " 48" in a question matches the
  CoT's "48"); states whose target does not occur in their question are counted apart, not as zero.

``kind_heatmap`` draws the mass by kind (position x kind, a panel per layer) on a ``matplotlib.figure.Figure``
without pyplot, as :mod:`ctexp.analysis.figures` explains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from ctexp.analysis.comparison import RunStates
from ctexp.analysis.statistics import multinomial, percentiles
from ctexp.config import parse_index_spec
from ctexp.data.sources.choices import ContextKind  # torch-free: the registry reads these records
from ctexp.errors import ConfigError
from ctexp.records import Record

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

KIND_COLUMNS = ("start", "number", "operator", "question", "bot", "thoughts", "self")
BOT = "bot"
Row = int | Literal["bot"]
INTERVAL = (0.025, 0.975)
_QUESTION_COLUMNS = {ContextKind.START: 0, ContextKind.NUMBER: 1, ContextKind.OPERATOR: 2, ContextKind.WORD: 3}


class KindMass(Record):
    """The mean attention mass of one (layer, row) on each kind of context slot (``KIND_COLUMNS``)."""

    layer: int
    position: Row
    problems: int
    mass: dict[str, float]


class TokenMass(Record):
    """A question token and the attention it receives (summed over its occurrences, mean over problems)."""

    id: int
    token: str
    mass: float
    problems: int = Field(description="problems whose question holds the token")


class TopTokens(Record):
    """The question tokens a row attends to most, averaged over the chosen layers."""

    position: Row
    tokens: list[TokenMass]


class TargetContrast(Record):
    """Attention on a state's target occurrences, correct vs incorrect states, at one thought position."""

    position: int
    correct_states: int
    incorrect_states: int
    absent_states: int = Field(description="states whose target does not occur in their question (left out)")
    problems: int
    correct: float | None
    incorrect: float | None
    difference: float | None = Field(description="correct - incorrect")
    low: float | None
    high: float | None


class RunInfo(Record):
    """The lens run whose test states are contrasted."""

    id: str
    name: str
    lens: str
    target: str
    tokenizer: str


class AttentionReport(Record):
    """``ctexp attention``'s result, as ``--json`` prints it; ``run_id`` is the recorded run's (None until
    it is recorded)."""

    run_id: str | None = None
    store: str
    store_hash: str
    mode: str
    heads: int | None
    problems: int
    layers: list[int]
    positions: list[Row]
    kinds: list[KindMass]
    top_tokens: list[TopTokens]
    run: RunInfo | None = None
    target: list[TargetContrast] | None = None
    statistics: str


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``all``, ``3`` or ``1-4,16`` as attention layers 1..L (layer 0, the embeddings, has no attention).

    Raises:
        ConfigError: The spec is malformed or names a layer outside 1..L.
    """
    try:
        layers = parse_index_spec(spec, n_layers + 1)
    except ValueError as error:
        raise ConfigError(f"--layers: {error}; attention layers are 1-{n_layers}") from None
    assert layers is not None
    if spec.strip() == "all":
        return layers[1:]
    if 0 in layers:
        raise ConfigError(f"--layers: layer 0 (the embeddings) has no attention; choose from 1-{n_layers}")
    return layers


def parse_positions(spec: str, n_positions: int) -> list[Row]:
    """``all``, ``2-3``, ``0,5,bot``: thought positions 0..T-1 and ``bot``, in that order.

    Raises:
        ConfigError: The spec is malformed or names a position outside 0..T-1.
    """
    parts = [part.strip() for part in spec.split(",")]
    if spec.strip() == "all":
        return [*range(n_positions), BOT]
    indices = ",".join(part for part in parts if part != BOT)
    try:
        chosen = parse_index_spec(indices, n_positions) if indices else []
    except ValueError as error:
        raise ConfigError(f"--positions: {error}; positions are 0-{n_positions - 1} and bot") from None
    return [*(chosen or []), *([BOT] if BOT in parts else [])]


def row_index(position: Row, n_positions: int) -> int:
    """A row's index on the attention file's row axis (bot is T)."""
    return n_positions if position == BOT else int(position)


def slot_columns(kinds: torch.Tensor, n_positions: int) -> torch.Tensor:
    """``(P, T+1, C)``: each (row, slot)'s column in ``KIND_COLUMNS``, or -1 outside the row's context.

    Args:
        kinds: ``(P, C)`` the attention file's ``ContextKind`` values.
        n_positions: T.
    """
    import torch  # here: the registry imports these records without paying for torch

    kinds = kinds.to(torch.int64)
    lengths = (kinds == ContextKind.BOT).to(torch.int64).argmax(dim=1).view(-1, 1, 1)  # (P, 1, 1)
    slots = torch.arange(kinds.shape[1]).view(1, 1, -1)  # (1, 1, C)
    rows = torch.arange(n_positions + 1).view(1, -1, 1)  # (1, T+1, 1)
    columns = torch.full((kinds.shape[0], n_positions + 1, kinds.shape[1]), -1, dtype=torch.int64)
    question = torch.full_like(kinds, -1)
    for kind, column in _QUESTION_COLUMNS.items():
        question = torch.where(kinds == kind, column, question)
    columns = torch.where(slots < lengths, question[:, None, :], columns)
    columns = torch.where(slots == lengths, KIND_COLUMNS.index("bot"), columns)
    thought = slots - lengths - 1  # which thought a slot holds
    is_thought = (thought >= 0) & (rows < n_positions)  # bot's row sees no thought
    columns = torch.where(is_thought & (thought < rows), KIND_COLUMNS.index("thoughts"), columns)
    return torch.where(is_thought & (thought == rows), KIND_COLUMNS.index("self"), columns)  # (P, T+1, C)


def kind_masses(
    weights: torch.Tensor, kinds: torch.Tensor, layers: Sequence[int], positions: Sequence[Row]
) -> list[KindMass]:
    """Mean attention mass on each kind of slot, per chosen (layer, row).

    Args:
        weights: ``(P, L, T+1, C)`` float32 weights, averaged over heads.
        kinds: ``(P, C)`` slot kinds.
        layers: Attention layers, 1..L.
        positions: Rows: thought positions and ``bot``.
    """
    import torch  # here: the registry imports these records without paying for torch

    n_positions = weights.shape[2] - 1
    columns = slot_columns(kinds, n_positions)  # (P, T+1, C)
    one_hot = torch.nn.functional.one_hot(columns.clamp(min=0), len(KIND_COLUMNS)).float()  # (P, T+1, C, K)
    one_hot *= (columns >= 0).unsqueeze(-1)
    # Per problem first, then the mean in float64: one float32 sum over every problem's slots loses ~1e-5.
    masses = torch.einsum("plrc,prck->plrk", weights, one_hot).double().mean(dim=0)  # (L, T+1, K)
    rows = []
    for layer in layers:
        for position in positions:
            values = masses[layer - 1, row_index(position, n_positions)].tolist()
            rows.append(KindMass(layer=layer, position=position, problems=weights.shape[0],
                                 mass=dict(zip(KIND_COLUMNS, values, strict=True))))
    return rows


def top_tokens(
    weights: torch.Tensor,
    tokens: torch.Tensor,
    kinds: torch.Tensor,
    layers: Sequence[int],
    positions: Sequence[Row],
    label: Callable[[int], str],
    k: int,
) -> list[TopTokens]:
    """The ``k`` question tokens each row attends to most, averaged over ``layers``.

    Args:
        weights: ``(P, L, T+1, C)`` float32 weights, averaged over heads.
        tokens: ``(P, C)`` token ids.
        kinds: ``(P, C)`` slot kinds.
        layers: Attention layers, 1..L.
        positions: Rows: thought positions and ``bot``.
        label: A token id's text, for reading.
        k: How many tokens per row.
    """
    import torch  # here: the registry imports these records without paying for torch

    n_problems, n_positions = weights.shape[0], weights.shape[2] - 1
    question = (kinds >= ContextKind.START) & (kinds <= ContextKind.WORD)  # (P, C)
    ids, inverse = torch.unique(tokens[question], return_inverse=True)  # (U,), (Q,)
    problem_of = torch.arange(n_problems).view(-1, 1).expand_as(tokens)[question]  # (Q,)
    pairs = torch.unique(inverse * n_problems + problem_of)  # distinct (id, problem) pairs
    holders = torch.bincount(pairs // n_problems, minlength=len(ids))  # (U,) problems holding each id
    chosen = torch.tensor([layer - 1 for layer in layers])
    result = []
    for position in positions:
        mass = weights[:, chosen, row_index(position, n_positions)].mean(dim=1)  # (P, C)
        totals = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, mass[question].double())
        totals /= n_problems  # (U,)
        best = torch.argsort(totals, descending=True, stable=True)[:k]
        result.append(TopTokens(position=position, tokens=[
            TokenMass(id=int(ids[i]), token=label(int(ids[i])), mass=float(totals[i]), problems=int(holders[i]))
            for i in best.tolist()
        ]))
    return result


def target_contrast(
    weights: torch.Tensor,
    tokens: torch.Tensor,
    kinds: torch.Tensor,
    states: RunStates,
    problem_index: dict[str, int],
    layers: Sequence[int],
    positions: Sequence[int],
    question_text: Callable[[int], str],
    target_text: Callable[[int], str],
    resamples: int,
    seed: int,
) -> list[TargetContrast]:
    """Attention on target occurrences for correctly vs incorrectly decoded test states, per thought position.

    Args:
        weights: ``(P, L, T+1, C)`` float32 weights, averaged over heads.
        tokens: ``(P, C)`` token ids of the store's tokenizer.
        kinds: ``(P, C)`` slot kinds.
        states: The run's test states (problem, position, layer, top-1 hit, targets).
        problem_index: Problem id -> index in the store.
        layers: Attention layers 1..L whose states count.
        positions: Thought positions to report.
        question_text: A question token id's text (the store's tokenizer).
        target_text: A target id's text (the run's tokenizer).
        resamples: Bootstrap resamples over problems.
        seed: The bootstrap's seed.
    """
    question = (kinds >= ContextKind.START) & (kinds <= ContextKind.WORD)  # (P, C)
    keys: dict[int, str] = {}
    chosen = set(layers)
    # (problem, position) -> per-layer mass on the target's occurrences, or None when it does not occur
    on_target: dict[tuple[int, int], torch.Tensor | None] = {}
    # per position: problem -> [correct sum, correct count, incorrect sum, incorrect count]
    totals: dict[int, dict[int, list[float]]] = {position: {} for position in positions}
    absent = dict.fromkeys(positions, 0)
    for pid, position, layer, hit in zip(states.problem_ids, states.positions.tolist(), states.layers.tolist(),
                                         states.metrics[:, 1].tolist(), strict=True):
        if position not in totals or layer not in chosen or pid not in problem_index:
            continue
        p = problem_index[pid]
        if (p, position) not in on_target:
            wanted = {match_key(target_text(t)) for t in states.targets.get((pid, position), ())}
            slots = [c for c in question[p].nonzero().view(-1).tolist()
                     if _key(keys, int(tokens[p, c]), question_text) in wanted]
            on_target[(p, position)] = weights[p, :, position][:, slots].sum(dim=-1) if slots else None
        mass = on_target[(p, position)]
        if mass is None:
            absent[position] += 1
            continue
        sums = totals[position].setdefault(p, [0.0, 0.0, 0.0, 0.0])
        offset = 0 if hit > 0.5 else 2
        sums[offset] += float(mass[layer - 1])
        sums[offset + 1] += 1
    rng = np.random.default_rng(seed)
    return [_contrast(position, totals[position], absent[position], rng, resamples) for position in positions]


def _key(cache: dict[int, str], token: int, text: Callable[[int], str]) -> str:
    if token not in cache:
        cache[token] = match_key(text(token))
    return cache[token]


def match_key(text: str) -> str:
    """The text a token is matched on: stripped of surrounding spaces, unless it is only spaces."""
    return text.strip() or text


def _contrast(
    position: int, per_problem: dict[int, list[float]], absent: int, rng: np.random.Generator, resamples: int
) -> TargetContrast:
    table = np.array(list(per_problem.values()), dtype=np.float64).reshape(-1, 4)  # (P', 4)
    correct_n, incorrect_n = int(table[:, 1].sum()), int(table[:, 3].sum())
    correct = float(table[:, 0].sum() / correct_n) if correct_n else None
    incorrect = float(table[:, 2].sum() / incorrect_n) if incorrect_n else None
    difference = low = high = None
    if correct is not None and incorrect is not None:
        difference = correct - incorrect
        draws = multinomial(rng, len(table), resamples) @ table  # (R, 4)
        with np.errstate(invalid="ignore", divide="ignore"):
            deltas = draws[:, 0] / draws[:, 1] - draws[:, 2] / draws[:, 3]  # NaN where a draw lacks one side
        lows, highs = percentiles(deltas[:, None], *INTERVAL)
        low, high = (None if np.isnan(v[0]) else float(v[0]) for v in (lows, highs))
    return TargetContrast(
        position=position, correct_states=correct_n, incorrect_states=incorrect_n, absent_states=absent,
        problems=len(table), correct=correct, incorrect=incorrect, difference=difference, low=low, high=high,
    )


STATISTICS = (
    "Attention weights averaged over heads. Mass by kind: per layer and position, the weights summed over each "
    "kind of context slot, averaged over problems (a row's kinds sum to 1). Top tokens: the mass a question "
    "token receives, summed over its occurrences and averaged over the chosen layers and all problems. Target "
    "contrast: a test state of layer s is paired with attention layer s (the block that wrote it); its mass on "
    "the question tokens whose text (stripped) equals a target's, averaged over correctly and incorrectly "
    "decoded (top-1) states; the difference has a 95% percentile bootstrap interval over problems."
)


# ---------------------------------------------------------------------------------------------------------
# The figure

PANELS_PER_ROW = 4
FIGURE_FILE = "attention_kinds.png"
PANEL_WIDTH_IN, PANEL_HEIGHT_PER_ROW_IN = 3.6, 0.32


def kind_heatmap(report: AttentionReport) -> Figure:
    """Mean attention mass of each position (rows) on each kind of context slot (columns), per layer.

    Args:
        report: ``ctexp attention``'s result.

    Returns:
        The figure: one annotated panel per chosen layer, on one colour scale from 0 to the largest mass.
    """
    from matplotlib.figure import Figure  # here: matplotlib loads only when a figure is asked for

    layers, positions = report.layers, report.positions
    mass = {(row.layer, row.position): row.mass for row in report.kinds}
    top = max((value for row in report.kinds for value in row.mass.values()), default=1.0) or 1.0
    columns = min(len(layers), PANELS_PER_ROW)
    lines = math.ceil(len(layers) / columns)
    panel_height = 1.4 + PANEL_HEIGHT_PER_ROW_IN * len(positions)
    figure = Figure(figsize=(PANEL_WIDTH_IN * columns + 1.2, panel_height * lines + 0.6))
    axes = figure.subplots(lines, columns, squeeze=False)
    image = None
    for index, layer in enumerate(layers):
        panel = axes[index // columns][index % columns]
        grid = [[mass[(layer, position)][kind] for kind in KIND_COLUMNS] for position in positions]
        image = panel.imshow(grid, cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                # Dark text on the bright end of viridis, light text on the dark end.
                panel.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                           color="black" if value > 0.6 * top else "white")
        panel.set_xticks(range(len(KIND_COLUMNS)), list(KIND_COLUMNS), rotation=45, ha="right", fontsize=8)
        panel.set_yticks(range(len(positions)), [str(position) for position in positions], fontsize=8)
        panel.set_title(f"layer {layer}", fontsize=10)
        if index % columns == 0:
            panel.set_ylabel("position")
    for index in range(len(layers), lines * columns):
        axes[index // columns][index % columns].set_visible(False)
    figure.suptitle(f"Attention mass by context kind ({report.mode}, {report.problems} problems)")
    figure.subplots_adjust(left=0.8 / figure.get_figwidth(), right=1 - 1.0 / figure.get_figwidth(),
                           bottom=0.9 / figure.get_figheight(), top=1 - 0.55 / figure.get_figheight(),
                           wspace=0.25, hspace=0.9)
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), label="attention mass", fraction=0.03, pad=0.02)
    return figure


def save_attention_figure(report: AttentionReport, directory: Path) -> Path:
    """Write the heatmap ``attention_kinds.png`` of a report into ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FIGURE_FILE
    kind_heatmap(report).savefig(path, dpi=100, format="png")
    return path
