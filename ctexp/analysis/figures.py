"""Figures of a run: the layer x position grid, the per-position profile and the training curves; and
of an intervention: answer accuracy by replaced position.

Figures are built on ``matplotlib.figure.Figure`` directly, never through ``pyplot``: pyplot keeps
a global registry of open figures and a global backend, which a library called from sweeps and
tests must not touch. ``Figure.savefig`` renders PNGs with Agg without selecting a backend.

Margins are set in inches (``_margins``) rather than by ``tight_layout``: tight layout draws every
figure once more to measure its text, which made rendering the three figures ~1.5x slower, and the
figures' text is known in advance (short tick labels, one-line titles and axis labels).
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ctexp.analysis.intervention import InterventionResult, InterventionRow
from ctexp.analysis.result import GroupMetrics, RunResult
from ctexp.analysis.statistics import wilson

DPI = 100
HEATMAP_FILE = "layer_position_top1.png"
POSITIONS_FILE = "position_top1.png"
CURVES_FILE = "training_curves.png"
INTERVENTION_FILE = "intervention_accuracy.png"
MODE_SPREAD = 0.08  # horizontal offset between modes at one position, so that their bars do not overlap
# The heatmap's colorbar, in inches, in the figure's right margin: a gap, the bar, and ~0.8 in for its
# tick labels and label.
COLORBAR_GAP_IN, COLORBAR_WIDTH_IN, COLORBAR_MARGIN_IN = 0.12, 0.18, 1.1


def layer_position_heatmap(result: RunResult) -> Figure:
    """Test top-1 of every (layer, position) cell as an annotated heatmap with a colorbar.

    Args:
        result: a finished run.

    Returns:
        The figure; cells without test states are blank.
    """
    cells = result.rows("cell")
    layers = sorted({row.layer for row in cells if row.layer is not None})
    positions = sorted({row.position for row in cells if row.position is not None})
    grid = [[math.nan] * len(positions) for _ in layers]
    for row in cells:
        if row.top1 is not None and row.layer is not None and row.position is not None:
            grid[layers.index(row.layer)][positions.index(row.position)] = row.top1

    # Size follows the grid so that annotations stay legible from 1x1 to ~33x16 cells.
    width = min(max(5.5, 2.5 + 0.9 * len(positions)), 16)  # at least room for the title and colorbar
    figure = Figure(figsize=(width, min(max(3.0, 1.8 + 0.45 * len(layers)), 16)))
    axes = figure.add_subplot()
    finite = [value for line in grid for value in line if not math.isnan(value)]
    top = max(finite, default=1.0) or 1.0  # a run with top-1 = 0 everywhere still needs a scale
    image = axes.imshow(grid, cmap="viridis", vmin=0.0, vmax=top, aspect="auto", origin="lower")
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            if not math.isnan(value):
                # Dark text on the bright end of viridis, light text on the dark end.
                colour = "black" if value > 0.6 * top else "white"
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)
    axes.set_xticks(range(len(positions)), [str(p) for p in positions])
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("position")
    axes.set_ylabel("layer")
    axes.set_title(f"Test top-1 by layer and position, {_lens(result)} lens")
    _margins(figure, right=COLORBAR_MARGIN_IN)
    box = figure.subplotpars
    colorbar_axes = figure.add_axes(
        (box.right + COLORBAR_GAP_IN / width, box.bottom, COLORBAR_WIDTH_IN / width, box.top - box.bottom)
    )
    figure.colorbar(image, cax=colorbar_axes, label="top-1")
    return figure


def position_bars(result: RunResult) -> Figure:
    """Per-position test top-1 with 95% intervals, and the prior and identity baselines as markers.

    Args:
        result: a finished run.

    Returns:
        The figure.
    """
    rows = [row for row in result.rows("position") if row.position is not None]
    xs = list(range(len(rows)))
    tops = [_value(row.top1) for row in rows]
    figure = Figure(figsize=(max(4.5, 1.0 + 0.8 * len(rows)), 3.6))
    axes = figure.add_subplot()
    axes.bar(xs, tops, yerr=_error_bars(rows), capsize=4, color="tab:blue", alpha=0.8, label="lens (95% CI)")
    axes.scatter(xs, [_value(r.prior_top1) for r in rows], marker="_", s=500, color="tab:orange",
                 linewidths=2.5, zorder=3, label="prior baseline")
    axes.scatter(xs, [_value(r.identity_top1) for r in rows], marker="D", s=28, color="tab:red",
                 zorder=3, label="identity baseline")
    axes.set_xticks(xs, [str(row.position) for row in rows])
    axes.set_xlabel("position")
    axes.set_ylabel("test top-1")
    highs = [v for v in (*tops, *_highs(rows)) if not math.isnan(v)]
    axes.set_ylim(0.0, min(1.0, max(highs, default=0.0) * 1.15 + 0.05))
    axes.set_title(f"Test top-1 by position, {_lens(result)} lens")
    axes.legend(fontsize=8, loc="upper left")
    _margins(figure)
    return figure


def training_curves(result: RunResult) -> Figure:
    """Training and validation loss, and validation top-1, by epoch.

    A run without epochs (the identity lens trains nothing) gets a figure that says so, so that every
    run has the same set of figures.

    Args:
        result: a finished run.

    Returns:
        The figure.
    """
    figure = Figure(figsize=(8.0, 3.4))
    if not result.epochs:
        figure.text(0.5, 0.5, f"No training epochs: the {_lens(result)} lens has nothing to train",
                    ha="center", va="center", fontsize=11)
        return figure
    epochs = [e.epoch for e in result.epochs]
    loss_axes, top1_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [e.train_loss for e in result.epochs], marker="o", label="train loss")
    loss_axes.plot(epochs, [e.val_loss for e in result.epochs], marker="o", label="validation loss")
    top1_axes.plot(epochs, [e.val_top1 for e in result.epochs], marker="o", color="tab:green",
                   label="validation top-1")
    for axes in (loss_axes, top1_axes):
        if result.best_epoch is not None:
            axes.axvline(result.best_epoch, color="grey", linestyle="--", linewidth=1, label="best epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axes.set_xlabel("epoch")
        axes.legend(fontsize=8)
    loss_axes.set_ylabel("cross-entropy")
    top1_axes.set_ylabel("top-1")
    figure.suptitle(f"Training, {_lens(result)} lens")
    _margins(figure, top=0.55, wspace_in=0.9)
    return figure


def save_figures(result: RunResult, directory: Path) -> list[Path]:
    """Write the three figures of a run as PNGs into ``directory`` (created if missing).

    Args:
        result: a finished run.
        directory: where to write ``layer_position_top1.png``, ``position_top1.png`` and
            ``training_curves.png``.

    Returns:
        The written paths, in that order.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in ((HEATMAP_FILE, layer_position_heatmap), (POSITIONS_FILE, position_bars),
                        (CURVES_FILE, training_curves)):
        path = directory / name
        # zlib level 1: files ~13% larger than the default level 6, and ~15 ms less per run's figures.
        build(result).savefig(path, dpi=DPI, format="png", pil_kwargs={"compress_level": 1})
        written.append(path)
    return written


def intervention_accuracy(result: InterventionResult) -> Figure:
    """Answer accuracy by replaced position, one line per mode, with the control as a horizontal band.

    Each point's bar is the row's 95% paired bootstrap interval of the change, drawn around its
    accuracy (``accuracy - delta + ci``): a bar that misses the control's accuracy on the row's problems
    marks a change the data support. The band is the control's accuracy over all the command's
    problems with its 95% Wilson interval. Position ``all`` replaces every position at once.

    Args:
        result: a finished intervention.

    Returns:
        The figure; rows without problems are left out.
    """
    positions = sorted({row.position for row in result.rows if row.position != "all"})  # type: ignore[type-var]
    slots: list[int | str] = [*positions, *(["all"] if any(row.position == "all" for row in result.rows) else [])]
    modes = list(dict.fromkeys(row.mode for row in result.rows))
    figure = Figure(figsize=(max(6.5, 3.5 + 0.8 * len(slots)), 3.8))  # 1.7 in of it for the legend
    axes = figure.add_subplot()
    control = result.control
    band = wilson(round(control.accuracy * control.n), control.n)
    if band is not None:
        axes.axhspan(*band, color="grey", alpha=0.25, linewidth=0,
                     label=f"control {100 * control.accuracy:.1f}% (95% CI)")
        axes.axhline(control.accuracy, color="grey", linewidth=1)
    for number, mode in enumerate(modes):
        rows = [row for row in result.rows if row.mode == mode and row.accuracy is not None]
        offset = (number - (len(modes) - 1) / 2) * MODE_SPREAD
        xs = [slots.index(row.position) + offset for row in rows]
        axes.errorbar(xs, [row.accuracy for row in rows], yerr=_interval_bars(rows), marker="o", capsize=3,
                      linewidth=1.2, markersize=4, label=mode)
    axes.set_xticks(range(len(slots)), [str(slot) for slot in slots])
    axes.set_xlim(-0.5, len(slots) - 0.5)
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel("replaced position")
    axes.set_ylabel("answer accuracy")
    config = result.config
    where = f"{config.get('site', '?')}" + (f" layer {config['layer']}" if config.get("layer") is not None else "")
    axes.set_title(f"Answer accuracy with a thought replaced ({where})", fontsize=10)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    _margins(figure, right=1.7)
    return figure


def save_intervention_figure(result: InterventionResult, directory: Path) -> Path:
    """Write ``intervention_accuracy.png`` of an intervention into ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / INTERVENTION_FILE
    intervention_accuracy(result).savefig(path, dpi=DPI, format="png", pil_kwargs={"compress_level": 1})
    return path


def _interval_bars(rows: list[InterventionRow]) -> list[list[float]]:
    """[below, above] distances from each row's accuracy to its paired interval, moved onto the accuracy."""
    below, above = [], []
    for row in rows:
        if row.ci is None or row.delta is None:
            below.append(0.0)
            above.append(0.0)
        else:
            below.append(max(row.delta - row.ci[0], 0.0))
            above.append(max(row.ci[1] - row.delta, 0.0))
    return [below, above]


def _margins(
    figure: Figure, left: float = 0.75, right: float = 0.25, bottom: float = 0.6, top: float = 0.45,
    wspace_in: float = 0.0,
) -> None:
    """Fixed margins in inches (room for tick labels, axis labels and a title), whatever the figure size."""
    width, height = figure.get_size_inches()
    axes_count = max(len(figure.axes), 1)
    axes_width = (width - left - right - wspace_in * (axes_count - 1)) / axes_count
    figure.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
        wspace=wspace_in / axes_width if axes_count > 1 else None,
    )


def _lens(result: RunResult) -> str:
    return str(result.config.get("lens", "?"))


def _value(value: float | None) -> float:
    # NaN leaves a gap where a group has no test states, instead of drawing a misleading zero.
    return math.nan if value is None else value


def _error_bars(rows: list[GroupMetrics]) -> list[list[float]]:
    """Asymmetric [below, above] distances from top-1 to its interval ends (0 where unknown)."""
    below, above = [], []
    for row in rows:
        interval = row.ci.get("top1")
        if row.top1 is None or interval is None:
            below.append(0.0)
            above.append(0.0)
        else:
            below.append(max(row.top1 - interval[0], 0.0))
            above.append(max(interval[1] - row.top1, 0.0))
    return [below, above]


def _highs(rows: list[GroupMetrics]) -> list[float]:
    values = []
    for row in rows:
        interval = row.ci.get("top1")
        values.extend(v for v in (interval[1] if interval else None, row.prior_top1, row.identity_top1)
                      if v is not None)
    return values
