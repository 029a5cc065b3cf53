"""``ctexp compare``: what changed between runs, and whether each per-layer and per-position delta is real;
for interventions, whether each row's answer accuracy differs (``compare_interventions``).

Thin: checks the options, loads the runs (``registry.readback.load_compared_runs``), calls
``analysis.compare.compare_runs`` and prints the result as rich tables,
JSON, Markdown or CSV; ``--plot`` draws a delta heatmap and per-position bars (matplotlib ``Figure``,
no pyplot state).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ctexp.analysis.groupings import AXES, GROUPINGS, Grouping
from ctexp.errors import ConfigError
from ctexp.registry.locations import Locations
from ctexp.registry.records import RunKind

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ctexp.analysis.comparison import Comparison, DeltaRow, PairComparison

FORMATS = ("table", "json", "markdown", "csv")
MARK = "*"
ALPHA = 0.05


def register(app: typer.Typer) -> None:
    """Add ``compare`` to the ``ctexp`` app."""
    app.command("compare")(compare)


def compare(
    runs: Annotated[list[str], typer.Argument(
        help="Two or more runs (id, unique id prefix, name, MLflow run id, or latest); the first is the reference.",
        show_default=False, metavar="RUN",
    )],
    metric: Annotated[str, typer.Option(help="Metric tested and plotted: top1, top5, top10 or loss.")] = "top1",
    output_format: Annotated[str, typer.Option("--format", help="table, json, markdown or csv.")] = "table",
    plot: Annotated[Path | None, typer.Option(help="Write a PNG: delta heatmap and per-position delta bars.")] = None,
    include_unchanged: Annotated[bool, typer.Option("--all", help="Include unchanged config keys.")] = False,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples (and sign flips for loss).")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the resampling.")] = 0,
    home: Annotated[Path | None, typer.Option("--home", help="ctexp home [$CTEXP_HOME or ./mlruns].")] = None,
    db_url: Annotated[str | None, typer.Option("--db-url", help="Results database URL [$CTEXP_DB_URL or HOME/ctexp.db].")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow tracking URI [$MLFLOW_TRACKING_URI or HOME/mlflow.db]; predictions "
        "missing locally are downloaded from it.",
    )] = None,
) -> None:
    """Compare runs against the first: config changes, metric deltas, and which deltas are significant.

    Example: ctexp compare identity-first-3f2a9c latest --metric top1 --plot compare.png
    """
    # numpy and the registry's SQL load here, when the command runs, not when `ctexp --help` lists it
    from ctexp.analysis.compare import METRICS, check_options, compare_runs
    from ctexp.registry.readback import load_compared_runs, resolve_runs

    if output_format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {output_format!r}")
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}")
    if plot is not None and plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot writes a PNG; give a FILE.png, not {str(plot)!r}")
    if plot is not None and not plot.resolve().parent.is_dir():
        raise ConfigError(f"--plot: the directory {plot.resolve().parent} does not exist")
    check_options(len(runs), metric, resamples, ALPHA)  # before any run is read
    locations = Locations.resolve(home, db_url, tracking_uri)
    records = resolve_runs(locations, runs)
    attention = next((record for record in records if record.kind is RunKind.ATTENTION), None)
    if attention is not None:
        raise ConfigError(f"compare takes lens runs or interventions; {attention.id[:12]} ({attention.name}) is an "
                          "attention analysis")
    if any(record.kind is not RunKind.LENS for record in records):
        _check_one_kind(records)
        _compare_interventions(locations, runs, output_format, plot, resamples, seed)
        return
    loaded = load_compared_runs(locations, runs)
    result = compare_runs(
        loaded, metric=metric, include_unchanged=include_unchanged, resamples=resamples, seed=seed, alpha=ALPHA,
    )
    if plot is not None:
        comparison_figure(result).savefig(plot, dpi=100, format="png")
    if output_format == "json":
        typer.echo(result.model_dump_json(indent=2))
    elif output_format == "csv":
        typer.echo(to_csv(result), nl=False)
    elif output_format == "markdown":
        typer.echo(to_markdown(result))
    else:
        console = Console(soft_wrap=False, width=200)
        for pair in result.comparisons:
            for item in pair_tables(pair, result.alpha):
                console.print(item)
    if plot is not None and output_format == "table":
        typer.echo(f"wrote {plot}")


# ---------------------------------------------------------------------------------------------------------
# Interventions


def _check_one_kind(records: list[Any]) -> None:
    kinds = {record.kind for record in records}
    if len(kinds) > 1:
        lens = next(record for record in records if record.kind is RunKind.LENS)
        other = next(record for record in records if record.kind is not RunKind.LENS)
        raise ConfigError(
            f"cannot compare a lens run with an intervention: {lens.id[:12]} ({lens.name}) is a lens run and "
            f"{other.id[:12]} ({other.name}) an {other.kind.value}; compare runs of one kind"
        )


def _compare_interventions(
    locations: Locations, runs: list[str], output_format: str, plot: Path | None, resamples: int, seed: int
) -> None:
    """Each intervention after the first against it, row by row; as tables or JSON."""
    from ctexp.analysis.intervention import compare_interventions
    from ctexp.cli.render import intervention_comparison_table
    from ctexp.registry.readback import load_interventions

    if output_format not in ("table", "json"):
        raise ConfigError(f"interventions compare as --format table or json, not {output_format}")
    if plot is not None:
        raise ConfigError("--plot draws lens runs' deltas; interventions have no plot (see ctexp report RUN)")
    reference, *others = load_interventions(locations, runs)
    comparisons = [compare_interventions(reference, other, resamples=resamples, seed=seed, alpha=ALPHA)
                   for other in others]
    if output_format == "json":
        typer.echo(json.dumps({"comparisons": [c.model_dump(mode="json") for c in comparisons]}, indent=2))
        return
    console = Console(soft_wrap=False, width=200)
    for comparison in comparisons:
        for change in comparison.config:
            console.print(f"config {change.key}: {_show(change.reference)} -> {_show(change.other)}")
        if comparison.note:
            console.print(f"note: {comparison.note}")
        console.print(intervention_comparison_table(comparison))


# ---------------------------------------------------------------------------------------------------------
# Text


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _value(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if "loss" in metric else _pct(value)


def _delta(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if "loss" in metric else f"{100 * value:+.2f}"


def _interval(metric: str, row: DeltaRow) -> str:
    if row.delta_low is None or row.delta_high is None:
        return "-"
    if metric == "loss":
        return f"[{row.delta_low:+.3f}, {row.delta_high:+.3f}]"
    return f"[{100 * row.delta_low:+.1f}, {100 * row.delta_high:+.1f}]"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1e-300:
        return "<1e-300"
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def _title(pair: PairComparison) -> str:
    return (f"{pair.other.name} ({pair.other.id[:12]}, {pair.other.lens}) vs reference "
            f"{pair.reference.name} ({pair.reference.id[:12]}, {pair.reference.lens})")


def _title_of(grouping: Grouping) -> str:
    return f"By {grouping.name}" if grouping.keys else grouping.name.capitalize()


def _headers(pair: PairComparison, grouping: Grouping, alpha: float) -> list[str]:
    m = pair.metric
    return ["Rows" if not grouping.keys else grouping.heading, "States", f"Ref {m}", f"Run {m}", "Δ top-1", "Δ top-5", "Δ top-10", "Δ loss",
            f"Δ {m} {100 * (1 - alpha):g}% CI", "p", "p (Holm)", "Sig."]


def _cells(pair: PairComparison, grouping: Grouping, row: DeltaRow) -> list[str]:
    m = pair.metric
    states = f"{row.n_reference:,}" if row.n_reference == row.n_other else f"{row.n_reference:,} / {row.n_other:,}"
    return [
        grouping.label(row), states, _value(m, getattr(row, f"reference_{m}")), _value(m, getattr(row, f"other_{m}")),
        _delta("top1", row.delta_top1), _delta("top5", row.delta_top5), _delta("top10", row.delta_top10),
        _delta("loss", row.delta_loss), _interval(m, row), _p(row.p_value), _p(row.p_holm),
        MARK if row.significant else "",
    ]


def _summary(pair: PairComparison) -> str:
    head = f"{_title(pair)}: " + ("paired" if pair.paired else "unpaired")
    lines = [head, f"statistics: {pair.statistics}"]
    if pair.note:
        lines.append(f"note: {pair.note}")
    lines.append(f"deltas are run - reference (top-k in points, loss in nats; {MARK} = significant)")
    return "\n".join(lines)


def pair_tables(pair: PairComparison, alpha: float) -> list[Any]:
    """The rich renderables of one comparison, in reading order."""
    items: list[Any] = [_summary(pair)]
    config = Table(title="Config differences")
    for column in ("Key", "Reference", "Run", "Changed"):
        config.add_column(column)
    for change in pair.config:
        config.add_row(change.key, _show(change.reference), _show(change.other), "yes" if change.changed else "")
    if not pair.config:
        config.add_row("(none)", "", "", "")
    items.append(config)
    headline = Table(title="Headline (test, each run's own states)")
    for column in ("Metric", "Reference", "Run", "Delta"):
        headline.add_column(column, justify="right")
    for row in pair.headline:
        headline.add_row(row.metric, _value(row.metric, row.reference), _value(row.metric, row.other),
                         _delta(row.metric, row.delta))
    items.append(headline)
    for grouping in GROUPINGS:
        if len(grouping.keys) == 2:
            items.append(grid(pair, grouping))
            continue
        table = Table(title=f"{_title_of(grouping)} (test, {pair.metric} tested)")
        for column in _headers(pair, grouping, alpha):
            table.add_column(column, justify="right")
        for row in pair.rows(grouping.name):
            table.add_row(*_cells(pair, grouping, row))
        items.append(table)
    return items


def _grid_lines(pair: PairComparison, grouping: Grouping) -> tuple[str, list[str], list[list[str]]]:
    """Title, column headers and one line per value of the first key (it, then the cells) of a delta grid.

    For a two-key grouping (cells: layer down, position across).
    """
    down, across = grouping.keys
    rows = pair.rows(grouping.name)
    lines_of = sorted({getattr(row, down) for row in rows if getattr(row, down) is not None})
    columns = sorted({getattr(row, across) for row in rows if getattr(row, across) is not None})
    unit = "nats" if pair.metric == "loss" else "points"
    title = f"Δ {pair.metric} by {down} (rows) x {across} (columns), {unit}; {MARK} significant"
    cells = {grouping.key(row): row for row in rows}
    lines = []
    for value in lines_of:
        line = [str(value)]
        for column in columns:
            row = cells.get((value, column))
            line.append("" if row is None else _delta(pair.metric, getattr(row, f"delta_{pair.metric}"))
                        + (MARK if row.significant else ""))
        lines.append(line)
    return title, [str(column) for column in columns], lines


def grid(pair: PairComparison, grouping: Grouping) -> Table:
    """Grid of the delta of the comparison's metric over a two-key grouping, significant cells marked."""
    title, columns, lines = _grid_lines(pair, grouping)
    table = Table(title=title)
    for column in (grouping.keys[0].capitalize(), *columns):
        table.add_column(column, justify="right")
    for line in lines:
        table.add_row(*line)
    return table


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def to_markdown(result: Comparison) -> str:
    """The comparison as Markdown: a section per compared run with pipe tables."""
    lines = [f"# Comparison against {result.reference.name} ({result.reference.id[:12]})", ""]
    for pair in result.comparisons:
        lines += [f"## {_title(pair)}", "", f"- paired: {'yes' if pair.paired else 'no'}",
                  f"- statistics: {pair.statistics}"]
        if pair.note:
            lines.append(f"- note: {pair.note}")
        lines += ["- deltas are run - reference (top-k in points, loss in nats); `*` marks significant rows", ""]
        lines += ["### Config differences", "", *_md_table(
            ["Key", "Reference", "Run", "Changed"],
            [[c.key, _show(c.reference), _show(c.other), "yes" if c.changed else ""] for c in pair.config]
            or [["(none)", "", "", ""]],
        ), ""]
        lines += ["### Headline", "", *_md_table(
            ["Metric", "Reference", "Run", "Delta"],
            [[r.metric, _value(r.metric, r.reference), _value(r.metric, r.other), _delta(r.metric, r.delta)]
             for r in pair.headline],
        ), ""]
        for grouping in GROUPINGS:
            lines += [f"### {_title_of(grouping)}", "", *_md_table(
                _headers(pair, grouping, result.alpha), [_cells(pair, grouping, row) for row in pair.rows(grouping.name)]
            ), ""]
        for grouping in GROUPINGS:
            if len(grouping.keys) == 2:
                title, columns, grid_lines = _grid_lines(pair, grouping)
                lines += [f"### {title}", "", *_md_table([grouping.keys[0].capitalize(), *columns], grid_lines), ""]
    return "\n".join(lines).rstrip() + "\n"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(row) for row in rows)]


def to_csv(result: Comparison) -> str:
    """The delta rows of every comparison, of every grouping (overall, by layer, ...), as CSV with a header."""
    from ctexp.analysis.comparison import DeltaRow

    columns = ("reference_run", "run", "paired", "metric", "table", *AXES, *DeltaRow.model_fields)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(columns)), lineterminator="\n")
    writer.writeheader()
    for pair in result.comparisons:
        for grouping in GROUPINGS:
            for row in pair.rows(grouping.name):
                values = row.model_dump()
                writer.writerow({
                    "reference_run": pair.reference.id, "run": pair.other.id, "paired": pair.paired,
                    "metric": pair.metric, "table": grouping.name,
                    **{key: "" if value is None else value for key, value in values.items()},
                })
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Figure


def comparison_figure(result: Comparison) -> Figure:
    """For each compared run: a layer x position heatmap of the delta and per-position bars with intervals.

    Significant cells and bars are marked with ``*``; the colour scale is symmetric around 0 (blue is better:
    higher top-k, lower loss).
    """
    import math

    from matplotlib.figure import Figure

    pairs = result.comparisons
    metric = result.metric
    scale = 1.0 if metric == "loss" else 100.0
    unit = "nats" if metric == "loss" else "points"
    figure = Figure(figsize=(12.0, 4.2 * len(pairs)))
    axes_grid = figure.subplots(len(pairs), 2, squeeze=False)
    for (heat, bars), pair in zip(axes_grid, pairs, strict=True):
        cells = pair.rows("cell")
        layers = sorted({row.layer for row in cells if row.layer is not None})
        positions = sorted({row.position for row in cells if row.position is not None})
        values = [[math.nan] * len(positions) for _ in layers]
        marks = [[False] * len(positions) for _ in layers]
        for row in cells:
            delta = getattr(row, f"delta_{metric}")
            if delta is not None and row.layer is not None and row.position is not None:
                i, j = layers.index(row.layer), positions.index(row.position)
                values[i][j], marks[i][j] = scale * delta, row.significant
        finite = [abs(v) for line in values for v in line if not math.isnan(v)]
        top = max(finite, default=0.0) or 1.0
        image = heat.imshow(values, cmap="RdBu_r" if metric == "loss" else "RdBu", vmin=-top, vmax=top,
                            aspect="auto", origin="lower")
        for i, line in enumerate(values):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    text = f"{value:+.1f}" if metric != "loss" else f"{value:+.2f}"
                    heat.text(j, i, text + ("*" if marks[i][j] else ""), ha="center", va="center", fontsize=7,
                              color="white" if abs(value) > 0.6 * top else "black")
        heat.set_xticks(range(len(positions)), [str(p) for p in positions])
        heat.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        heat.set_xlabel("position")
        heat.set_ylabel("layer")
        heat.set_title(f"Δ {metric} ({unit}): {pair.other.name} - {pair.reference.name}", fontsize=9)
        figure.colorbar(image, ax=heat, label=f"Δ {metric} ({unit})")

        rows = [row for row in pair.rows("position") if row.position is not None]
        xs = list(range(len(rows)))
        deltas = [scale * (getattr(row, f"delta_{metric}") or 0.0) for row in rows]
        below = [max(d - scale * row.delta_low, 0.0) if row.delta_low is not None else 0.0
                 for d, row in zip(deltas, rows, strict=True)]
        above = [max(scale * row.delta_high - d, 0.0) if row.delta_high is not None else 0.0
                 for d, row in zip(deltas, rows, strict=True)]
        sign = -1.0 if metric == "loss" else 1.0  # which direction is better
        colours = [("tab:blue" if sign * d > 0 else "tab:red") if row.significant else "tab:grey"
                   for d, row in zip(deltas, rows, strict=True)]
        bars.bar(xs, deltas, yerr=[below, above], capsize=4, color=colours, alpha=0.85)
        bars.axhline(0.0, color="black", linewidth=0.8)
        top_end = max([0.0] + [d + up for d, up in zip(deltas, above, strict=True)])
        bottom_end = min([0.0] + [d - down for d, down in zip(deltas, below, strict=True)])
        span = (top_end - bottom_end) or 1.0
        for x, d, row, up, down in zip(xs, deltas, rows, above, below, strict=True):
            if row.significant:
                y, va = (d + up + 0.02 * span, "bottom") if d >= 0 else (d - down - 0.02 * span, "top")
                bars.text(x, y, "*", ha="center", va=va, fontsize=12)
        bars.set_ylim(bottom_end - 0.12 * span, top_end + 0.12 * span)
        bars.set_xticks(xs, [str(row.position) for row in rows])
        bars.set_xlabel("position")
        bars.set_ylabel(f"Δ {metric} ({unit})")
        level = 100 * (1 - result.alpha)
        kind = "paired" if pair.paired else "unpaired"
        bars.set_title(f"Δ {metric} by position, {level:g}% {kind} interval; * significant", fontsize=9)
    figure.tight_layout()
    return figure
