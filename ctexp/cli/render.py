"""Rich tables for results, in the shape of the reference write-up. Pure functions: data in, tables out."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from rich.table import Table

from ctexp.analysis.groupings import GROUPINGS, Grouping

if TYPE_CHECKING:  # types only: ``ctexp show`` of a lens run loads no numpy
    from ctexp.analysis.intervention import InterventionComparison, InterventionResult, InterventionRow
    from ctexp.analysis.result import EpochMetrics, GroupMetrics, RunResult
    from ctexp.data.align import AlignedProblem
    from ctexp.data.tokenizers import Tokenizer


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def pct_ci(row: GroupMetrics, metric: str = "top1") -> str:
    interval = row.ci.get(metric)
    value = getattr(row, metric)
    if value is None:
        return "-"
    if interval is None:
        return pct(value)
    return f"{100 * value:.2f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def signed_points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}"


def epochs_table(epochs: list[EpochMetrics], best_epoch: int | None, stopped_early: bool) -> Table:
    table = Table(title="Training progress (validation)")
    for column in ("Epoch", "Train loss", "Val loss", "Top-1", "Top-5", "Top-10", "Seconds", "Notes"):
        table.add_column(column, justify="right" if column != "Notes" else "left")
    last = epochs[-1].epoch if epochs else None
    for epoch in epochs:
        notes = []
        if epoch.epoch == best_epoch:
            notes.append("best model")
        if epoch.epoch == last and stopped_early:
            notes.append("early stopping")
        table.add_row(
            str(epoch.epoch), f"{epoch.train_loss:.4f}", f"{epoch.val_loss:.4f}", pct(epoch.val_top1),
            pct(epoch.val_top5), pct(epoch.val_top10), f"{epoch.seconds:.2f}", ", ".join(notes),
        )
    return table


def breakdown_table(
    title: str, grouping: Grouping, rows: Iterable[GroupMetrics], empty: list[int] | None = None
) -> Table:
    """Test metrics of one grouping's rows (overall, by layer, by position, ...) with intervals, baselines and lifts.

    ``empty`` (empty slices per position) adds a column to rows keyed by position.
    """
    table = Table(title=title)
    columns = [grouping.heading, "States", "Loss", "Top-1 [95% CI]", "Top-5", "Top-10", "Prior top-1",
               "Identity top-1", "Lift vs prior", "Lift vs identity"]
    if empty is not None:
        columns.append("Empty slices")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        cells = [
            grouping.label(row), f"{row.n:,}", "-" if row.loss is None else f"{row.loss:.3f}", pct_ci(row),
            pct(row.top5), pct(row.top10), pct(row.prior_top1), pct(row.identity_top1),
            signed_points(row.lift_prior), signed_points(row.lift_identity),
        ]
        if empty is not None:
            cells.append(str(empty[row.position]) if row.position is not None else "-")
        table.add_row(*cells)
    return table


def grid_table(
    cells: list[GroupMetrics], metric: str = "top1", title: str | None = None, keys: tuple[str, str] = ("layer", "position")
) -> Table:
    """A grid of a metric over a two-key grouping's rows: first key down, second across (layer x position)."""
    down, across = keys
    rows = sorted({getattr(row, down) for row in cells if getattr(row, down) is not None})
    columns = sorted({getattr(row, across) for row in cells if getattr(row, across) is not None})
    table = Table(title=title or f"Test {metric} by {down} (rows) x {across} (columns)")
    table.add_column(down.capitalize(), justify="right")
    for column in columns:
        table.add_column(str(column), justify="right")
    values = {(getattr(row, down), getattr(row, across)): getattr(row, metric) for row in cells}
    for value in rows:
        table.add_row(str(value), *[pct(values.get((value, column))) for column in columns])
    return table


def samples_table(result: RunResult) -> Table:
    table = Table(title="Sample predictions (test)")
    for column in ("Layer", "Position", "CoT steps", "Slice", "Target", "Top-3 predicted", "Correct"):
        table.add_column(column)
    for sample in result.samples:
        predicted = ", ".join(f"{t.token!r} ({100 * (t.prob or 0):.1f}%)" for t in sample.predictions[:3])
        verdict = "yes" if sample.correct else ("top-5" if sample.in_top5 else "no")
        table.add_row(
            str(sample.layer), str(sample.position), " ".join(sample.steps), repr("".join(sample.slice_tokens)),
            ", ".join(f"{t.token!r} ({t.id})" for t in sample.targets), predicted, verdict,
        )
    return table


def grouping_tables(rows_of: Callable[[str], list[GroupMetrics]], empty: list[int] | None = None) -> list[Table]:
    """A table per grouping with rows: a grid for two keys (layer x position), else a breakdown table.

    Args:
        rows_of: a grouping's rows by its name (``RunResult.rows``, or rows read from the registry).
        empty: empty slices per position, shown beside the rows keyed by position alone.
    """
    tables = []
    for grouping in GROUPINGS:
        rows = rows_of(grouping.name)
        if not rows:
            continue
        if len(grouping.keys) == 2:
            tables.append(grid_table(rows, keys=(grouping.keys[0], grouping.keys[1])))
            continue
        title = f"Performance by {grouping.name} (test)" if grouping.keys else f"Test {grouping.name}"
        tables.append(breakdown_table(title, grouping, rows, empty if grouping.keys == ("position",) else None))
    return tables


def run_tables(result: RunResult) -> list[Table]:
    """All tables of a run, in reading order."""
    tables = [epochs_table(result.epochs, result.best_epoch, result.stopped_early)] if result.epochs else []
    return [*tables, *grouping_tables(result.rows, result.data.empty["empty"]), samples_table(result)]


def alignment_table(problems: list[AlignedProblem], tokenizer: Tokenizer) -> Table:
    """Each problem's CoT and, per position, its slice and targets."""
    table = Table(title="Aligned CoT tokens (slice -> targets)")
    table.add_column("Problem")
    table.add_column("CoT")
    n_positions = len(problems[0].positions) if problems else 0
    for position in range(n_positions):
        table.add_column(f"Pos {position}")
    for problem in problems:
        cells = []
        for alignment in problem.positions:
            tokens = "|".join(tokenizer.token_str(t) for t in alignment.token_ids)
            targets = ",".join(repr(tokenizer.token_str(t)) for t in alignment.target_ids) or "-"
            source = f" (from {alignment.filled_from})" if alignment.filled_from is not None else ""
            cells.append(f"{tokens!r} -> {targets}{source}")
        table.add_row(problem.id, " ".join(problem.steps), *cells)
    return table


# --- interventions ----------------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _change(delta: float | None, ci: tuple[float, float] | None) -> str:
    if delta is None:
        return "-"
    interval = f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci is not None else ""
    return f"{100 * delta:+.1f}{interval}"


def control_line(result: InterventionResult) -> str:
    """``control: 75.00% of 12 problems correct (lens run ..., site feedback)``."""
    control, config = result.control, result.config
    layer = f" layer {config['layer']}" if config.get("layer") is not None else ""
    return (f"control: {100 * control.accuracy:.2f}% of {control.n} problems correct "
            f"(lens run {result.lens_run[:12]}, site {config.get('site')}{layer})")


def rows_table(result: InterventionResult) -> Table:
    """One line per (mode, position): accuracy against the control on the same problems, and the tests."""
    table = Table(title="Answers with one thought replaced (paired with the control on the same problems)")
    for column in ("Mode", "Position", "Problems", "Accuracy", "Control", "Delta [95% CI]", "Changed",
                   "Lost/gained", "p", "p (Holm)", "Significant"):
        table.add_column(column, justify="left" if column == "Mode" else "right")
    for row in result.rows:
        table.add_row(
            row.mode, str(row.position), str(row.n), _rate(row.accuracy), _rate(row.control_accuracy),
            _change(row.delta, row.ci), _rate(row.changed), f"{row.lost}/{row.gained}", f"{row.p_value:.3g}",
            "-" if row.p_holm is None else f"{row.p_holm:.3g}", "yes" if row.significant else "",
        )
    return table


def flips_table(result: InterventionResult, rows: list[InterventionRow] | None = None) -> Table:
    """The problems whose correctness a replacement flipped, row by row: the control's answer and the row's."""
    table = Table(title="Answers a replacement flipped (right <-> wrong against the control)")
    for column in ("Mode", "Position", "Problem", "Control answer", "Replaced answer", "Flip"):
        table.add_column(column)
    for row in result.rows if rows is None else rows:
        for flip in result.flips(row):
            table.add_row(row.mode, str(row.position), flip.control.problem_id, repr(flip.control.text),
                          repr(flip.replaced.text), "lost" if flip.control.correct else "gained")
    return table


def intervention_comparison_table(comparison: InterventionComparison) -> Table:
    """Two interventions row by row: each one's accuracy on the problems both answered, and the difference."""
    title = (f"Intervention {comparison.other[:12]} vs reference {comparison.reference[:12]} "
             "(paired over the problems both answered; delta = run - reference, in points)")
    table = Table(title=title)
    for column in ("Mode", "Position", "Problems", "Reference", "Run", "Delta [95% CI]", "Lost/gained", "p",
                   "p (Holm)", "Significant"):
        table.add_column(column, justify="left" if column == "Mode" else "right")
    for row in comparison.rows:
        table.add_row(
            row.mode, "-" if row.position is None else str(row.position), str(row.n), _rate(row.reference_accuracy),
            _rate(row.other_accuracy), _change(row.delta, row.ci), f"{row.lost}/{row.gained}", f"{row.p_value:.3g}",
            "-" if row.p_holm is None else f"{row.p_holm:.3g}", "yes" if row.significant else "",
        )
    return table
