"""``ctexp attention``: what bot and each thought attend to, and (with ``--run``) how it relates to a lens.

Thin: parse, plan (:class:`ctexp.experiment.attention.AttentionPlan` checks every input), record
(:func:`ctexp.experiment.attention_record.record_attention`), print tables or JSON, and write the figure
last, so that a bad input writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ctexp.cli.app import stdout_console
from ctexp.cli.options import DbOption, HomeOption, JsonOption, TrackingOption
from ctexp.errors import ConfigError

if TYPE_CHECKING:
    from ctexp.analysis.attention import AttentionReport


def attention(
    store: Annotated[
        Path, typer.Option(help="Activation store with attention.safetensors (ctexp extract --attention).")
    ],
    run: Annotated[
        str | None, typer.Option(help="A finished lens run on this store: contrast its correct and incorrect states.")
    ] = None,
    layers: Annotated[
        str, typer.Option(help="Attention layers 1..L (named by the state each block writes): all, 16, 1-4,16.")
    ] = "all",
    positions: Annotated[str, typer.Option(help="Thought positions and bot: all, 2-3, 0,5,bot.")] = "all",
    top: Annotated[int, typer.Option(help="Question tokens listed per position.")] = 5,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples (problems) for the contrast's interval.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    figure: Annotated[
        Path | None, typer.Option(help="Write the heatmap (position x context kind, a panel per layer) to this file.")
    ] = None,
    home: HomeOption = None,
    db_url: DbOption = None,
    tracking_uri: TrackingOption = None,
    as_json: JsonOption = False,
) -> None:
    """Attention of bot and each continuous thought over the question, bot and earlier thoughts; recorded as a run.

    Example: ctexp attention --store stores/codi --layers 8-16 --run latest --figure attention.png
    """
    from ctexp.experiment.attention import AttentionPlan, AttentionRequest
    from ctexp.experiment.attention_record import record_attention
    from ctexp.experiment.recorder import Recorder
    from ctexp.registry.locations import Locations

    if figure is not None and not figure.expanduser().resolve().parent.is_dir():
        raise ConfigError(f"--figure: directory {figure.expanduser().resolve().parent} does not exist")
    request = AttentionRequest(store=store, run=run, layers=layers, positions=positions, top=top,
                               resamples=resamples, seed=seed)
    locations = Locations.resolve(home, db_url, tracking_uri)
    with Recorder(locations) as recorder:  # both stores checked before the attention file is read
        plan = AttentionPlan(request, locations)  # bad input fails here, before a run is recorded
        report = record_attention(plan, recorder)
    if figure is not None:
        from ctexp.analysis.attention import kind_heatmap

        try:
            kind_heatmap(report).savefig(figure, dpi=100)
        except (OSError, ValueError) as error:  # an unwritable path, or a suffix matplotlib has no writer for
            raise ConfigError(f"--figure: cannot write {figure}: {error}") from None
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    console = stdout_console()
    for table in attention_tables(report):
        console.print(table)
    if figure is not None:
        console.print(f"wrote {figure}")
    console.print(f"run {report.run_id} recorded in {locations.home} (ctexp show {(report.run_id or '')[:8]}, "
                  f"ctexp report {(report.run_id or '')[:8]})")


def attention_tables(report: AttentionReport) -> list[Table]:
    """The report's tables: mass by kind, top question tokens, and the target contrast with a run."""
    from ctexp.analysis.attention import KIND_COLUMNS

    heads = f"mean of {report.heads} heads" if report.heads else "mean over heads"
    kinds = Table(title=f"Attention mass by context kind ({heads}, {report.problems} problems)")
    for column in ("Layer", "Position", *KIND_COLUMNS):
        kinds.add_column(column, justify="right")
    for row in report.kinds:
        kinds.add_row(str(row.layer), str(row.position), *(f"{row.mass[kind]:.3f}" for kind in KIND_COLUMNS))
    over = f"layer{'s' if len(report.layers) > 1 else ''} {_span(report.layers)}"
    tokens = Table(title=f"Question tokens attended most ({over}; mass per problem)")
    tokens.add_column("Position", justify="right")
    tokens.add_column("Tokens")
    for entry in report.top_tokens:
        tokens.add_row(str(entry.position), ", ".join(f"{t.token!r} {t.mass:.3f}" for t in entry.tokens))
    tables = [kinds, tokens]
    if report.run is not None and report.target is not None:
        contrast = Table(
            title=f"Attention on the target's occurrences in the question, run {report.run.id[:12]} "
            f"({report.run.name}): correct vs incorrect top-1 (test)"
        )
        for column in ("Position", "Correct states", "Incorrect states", "Target absent", "Problems",
                       "Mass correct", "Mass incorrect", "Difference [95% CI]"):
            contrast.add_column(column, justify="right")
        for row in report.target:
            contrast.add_row(str(row.position), str(row.correct_states), str(row.incorrect_states),
                             str(row.absent_states), str(row.problems), _number(row.correct), _number(row.incorrect),
                             _difference(row.difference, row.low, row.high))
        tables.append(contrast)
    return tables


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _difference(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "-"
    interval = "" if low is None or high is None else f" [{low:+.3f}, {high:+.3f}]"
    return f"{value:+.3f}{interval}"


def _span(layers: list[int]) -> str:
    """``1-4,16`` for [1, 2, 3, 4, 16]."""
    spans: list[list[int]] = []
    for layer in layers:
        if spans and layer == spans[-1][-1] + 1:
            spans[-1].append(layer)
        else:
            spans.append([layer])
    return ",".join(f"{span[0]}-{span[-1]}" if len(span) > 1 else str(span[0]) for span in spans)


def register(app: typer.Typer) -> None:
    """Add ``attention`` to ``app``."""
    app.command("attention")(attention)
