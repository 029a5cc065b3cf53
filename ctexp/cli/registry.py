"""Registry commands: ``runs``, ``show``, ``best``, ``report``, ``ui``, ``delete`` and ``db``.

Thin: each command resolves the locations, calls the registry library and prints a table or JSON.
``show`` and ``report`` of an intervention read its result (``Registry.intervention``), and of an attention
analysis its report (``Registry.attention``), instead of a lens run's tables.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ctexp.analysis.groupings import BREAKDOWNS, grouping, names
from ctexp.cli.app import stdout_console
from ctexp.cli.options import (
    DbOption,
    ExperimentFilter,
    HomeOption,
    JsonOption,
    LensFilter,
    RunArgument,
    SplitFilter,
    TargetFilter,
    TrackingOption,
)
from ctexp.errors import ConfigError, RegistryError
from ctexp.registry.locations import Locations
from ctexp.registry.records import RunKind

if TYPE_CHECKING:
    from ctexp.analysis.attention import AttentionReport
    from ctexp.analysis.intervention import InterventionResult
    from ctexp.registry.records import RunRecord

# `ctexp best --by` choices, from the one definition of groupings (typer validates a StrEnum's values).
ByChoice = StrEnum("ByChoice", [(name, name) for name in names(BREAKDOWNS)])
DEFAULT_BY = ByChoice("position")
# MLflow 3.17's UI picks its view from a "GenAI / Model training" switch that starts on GenAI (traces,
# token usage); this query sets it to model training, where experiments open on their runs table.
UI_LANDING = "#/experiments?workflowType=machine_learning"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def register(app: typer.Typer) -> None:
    """Add the registry commands to the ``ctexp`` app."""
    app.command("runs")(runs)
    app.command("show")(show)
    app.command("best")(best)
    app.command("report")(report)
    app.command("ui")(ui)
    app.command("delete")(delete)
    db_app = typer.Typer(help="The results database's schema (Alembic migrations).", no_args_is_help=True)
    db_app.command("upgrade")(db_upgrade)
    db_app.command("current")(db_current)
    app.add_typer(db_app, name="db")


def runs(
    experiment: ExperimentFilter = None,
    lens: LensFilter = None,
    split: SplitFilter = None,
    target: TargetFilter = None,
    status: Annotated[str | None, typer.Option(help="RUNNING, FINISHED, FAILED, KILLED or PRUNED.")] = None,
    since: Annotated[str | None, typer.Option(help="Started since: 2026-11-30, 12h, 7d.")] = None,
    sweep: Annotated[int | None, typer.Option(help="Only trials of this sweep id.")] = None,
    kind: Annotated[RunKind | None, typer.Option(help="Only runs of this kind: lens, intervention or attention.")] = None,
    sort: Annotated[str, typer.Option(help="started_at or a headline metric (test_top1, test_loss, ...).")] = "started_at",
    ascending: Annotated[bool, typer.Option("--ascending", help="Sort ascending.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many runs.")] = 50,
    home: HomeOption = None,
    db_url: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """List runs, filtered and sorted.

    Example: ctexp runs --lens layer-position --sort test_top1 --limit 10
    """
    from ctexp.registry.queries import parse_since  # SQLAlchemy: only the commands that read the database pay

    if limit < 1:
        raise ConfigError("--limit must be at least 1")
    with Locations.resolve(home, db_url).registry() as registry:
        records = registry.list_runs(
            experiment=experiment, lens=lens, split=split, target=target,
            status=status.upper() if status else None, since=parse_since(since) if since else None,
            sweep_id=sweep, kind=kind, sort=sort, descending=not ascending, limit=limit,
        )
    if as_json:
        typer.echo(json.dumps([record.to_json() for record in records], indent=2))
        return
    table = Table(title=f"Runs ({len(records)})")
    for column in ("Id", "Name", "Experiment", "Kind", "Status", "Lens", "Split", "Target", "Test top-1 [95% CI]",
                   "Prior", "Identity", "Sweep/trial", "Started (UTC)"):
        table.add_column(column)
    for r in records:
        interval = f" [{100 * r.test_top1_low:.1f}, {100 * r.test_top1_high:.1f}]" if r.test_top1_low is not None else ""
        trial = f"{r.sweep_id}/{r.trial_number}" if r.sweep_id is not None else "-"
        table.add_row(
            r.id[:12], r.name, r.experiment, r.kind.value, r.status.value, r.lens, r.split, r.target,
            _pct(r.test_top1) + interval, _pct(r.prior_top1), _pct(r.identity_top1), trial,
            f"{r.started_at:%Y-%m-%d %H:%M:%S}",
        )
    stdout_console().print(table)


def show(
    run: RunArgument,
    home: HomeOption = None,
    db_url: DbOption = None,
    as_json: JsonOption = False,
    answers: Annotated[bool, typer.Option(
        "--answers", help="An intervention's answers: with --json every row's, else the problems a replacement flipped.",
    )] = False,
) -> None:
    """Print a run's configuration and its tables (an intervention's control and rows), from the results database.

    Example: ctexp show latest
    """
    from ctexp.cli.render import epochs_table, grouping_tables

    with Locations.resolve(home, db_url).registry() as registry:
        record = registry.resolve(run)
        if record.kind is RunKind.INTERVENTION:
            result = registry.intervention(record.id) if record.status.value == "FINISHED" else None
            _show_intervention(record, result, as_json=as_json, answers=answers)
            return
        if record.kind is RunKind.ATTENTION and not answers:
            _show_attention(record, registry.attention(record.id) if record.status.value == "FINISHED" else None,
                            as_json=as_json)
            return
        if answers:
            raise ConfigError(f"--answers is for intervention runs; run {record.id[:12]} is a {record.kind.value} run")
        epochs = registry.epochs(record.id)
        tables = registry.breakdowns(record.id)
    if as_json:
        payload = {
            "run": record.to_json(),
            "epochs": [epoch.model_dump() for epoch in epochs],
            **{grouping.field: [row.model_dump(mode="json") for row in tables[grouping.name]]
               for grouping in BREAKDOWNS},
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    console = stdout_console()
    console.print(f"run {record.id} ({record.name}) in experiment {record.experiment}: {record.status.value}")
    if record.error:
        console.print(f"error: {record.error}")
    console.print_json(json.dumps(record.config))
    if epochs:
        stopped = len(epochs) < record.config.get("train", {}).get("epochs", len(epochs) + 1)
        console.print(epochs_table(epochs, record.best_epoch, stopped))
    for table in grouping_tables(lambda name: [row.as_group_metrics() for row in tables.get(name, [])]):
        console.print(table)


def _show_intervention(record: RunRecord, result: InterventionResult | None, *, as_json: bool, answers: bool) -> None:
    """An intervention's record, then (finished) its control line and rows, or its JSON with ``run`` added."""
    from ctexp.cli.render import control_line, flips_table, rows_table

    if as_json:
        typer.echo(json.dumps({"run": record.to_json(), **(result.to_json(answers=answers) if result else {})}, indent=2))
        return
    console = stdout_console()
    console.print(f"intervention {record.id} ({record.name}) of lens run {(record.source_run_id or '(deleted)')[:12]} "
                  f"in experiment {record.experiment}: {record.status.value}")
    if record.error:
        console.print(f"error: {record.error}")
    if result is None:
        return
    console.print(control_line(result))
    console.print(rows_table(result))
    if answers:
        console.print(flips_table(result))


def _show_attention(record: RunRecord, report: AttentionReport | None, *, as_json: bool) -> None:
    """An attention analysis's record, then (finished) its tables, or its report's JSON with ``record`` added
    (``run`` already names the lens run in the report)."""
    from ctexp.cli.attention import attention_tables

    if as_json:
        typer.echo(json.dumps({**(report.model_dump(mode="json") if report else {}), "record": record.to_json()},
                              indent=2))
        return
    console = stdout_console()
    lens = f" of lens run {(record.source_run_id or '(deleted)')[:12]}" if record.config.get("run") else ""
    console.print(f"attention analysis {record.id} ({record.name}){lens} of store {record.store_path} "
                  f"in experiment {record.experiment}: {record.status.value}")
    if record.error:
        console.print(f"error: {record.error}")
    for table in attention_tables(report) if report else []:
        console.print(table)


def best(
    by: Annotated[ByChoice, typer.Option(help=f"{', '.join(names(BREAKDOWNS))}.")] = DEFAULT_BY,
    metric: Annotated[str, typer.Option(help="top1, top5, top10 or loss.")] = "top1",
    experiment: ExperimentFilter = None,
    lens: LensFilter = None,
    split: SplitFilter = None,
    target: TargetFilter = None,
    home: HomeOption = None,
    db_url: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Which run is best at each position, layer or cell, across the registry.

    Example: ctexp best --by position --metric top1 --target first
    """
    with Locations.resolve(home, db_url).registry() as registry:
        rows = registry.best(by.value, metric, experiment=experiment, lens=lens, split=split, target=target)
    if as_json:
        typer.echo(json.dumps([row.model_dump(mode="json") for row in rows], indent=2))
        return
    keys = grouping(by.value).keys
    table = Table(title=f"Best run by {by.value} ({metric}, test)")
    for column in [k.capitalize() for k in keys] + [metric, "95% CI", "States", "Run", "Name", "Lens", "Split",
                                                      "Target"]:
        table.add_column(column)
    for row in rows:
        value = f"{row.value:.3f}" if metric == "loss" else _pct(row.value)
        interval = "-" if row.low is None else (
            f"[{row.low:.3f}, {row.high:.3f}]" if metric == "loss" else f"[{100 * row.low:.1f}, {100 * row.high:.1f}]"
        )
        table.add_row(*[str(getattr(row, k)) for k in keys], value, interval, f"{row.n:,}", row.run_id[:12],
                      row.run_name, row.lens, row.split, row.target)
    stdout_console().print(table)


def report(
    run: RunArgument,
    out: Annotated[Path | None, typer.Option(help="Markdown file to write [HOME/runs/RUN_ID/report.md].")] = None,
    no_figures: Annotated[bool, typer.Option(
        "--no-figures", help="The Markdown alone: draw no figures and log nothing to MLflow (quick, at the terminal).",
    )] = False,
    home: HomeOption = None,
    db_url: DbOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Write a Markdown report in the shape of the reference write-up (of an intervention: its rows, figure and
    what they mean), and log it to MLflow.

    Example: ctexp report latest --out report.md
    """
    from ctexp.analysis.report import render_report
    from ctexp.analysis.result import RunResult

    locations = Locations.resolve(home, db_url, tracking_uri)
    with locations.registry() as registry:
        record = registry.resolve(run)
        if record.kind is RunKind.INTERVENTION:
            _report_intervention(locations, record, registry.intervention(record.id), out, not no_figures)
            return
        if record.kind is RunKind.ATTENTION:
            _report_attention(locations, record, registry.attention(record.id), out, not no_figures)
            return
        if record.kind is RunKind.TINYCODI:
            raise ConfigError(f"run {record.id[:12]} is a tiny-CODI training: `ctexp show {record.id[:8]}` prints it, "
                              f"`ctexp codi eval --model {record.store_path}` measures its answers")
        epochs = registry.epochs(record.id)
        groups = {name: [row.as_group_metrics() for row in rows] for name, rows in registry.breakdowns(record.id).items()}
    if record.status.value != "FINISHED":
        raise RegistryError(f"run {record.id[:12]} is {record.status.value}; only a finished run has results to report")
    run_dir = locations.home / "runs" / record.id
    saved = RunResult.model_validate_json((run_dir / "result.json").read_text()) if (run_dir / "result.json").is_file() else None
    target = _report_path(locations, record, out)
    figures: list[Path] = []
    if saved is not None and not no_figures:
        from ctexp.analysis.figures import save_figures  # matplotlib: only a report with figures pays

        figures = save_figures(saved, target.parent)
    text = render_report(record, epochs, groups, saved.samples if saved else [], [figure.name for figure in figures])
    _write_report(locations, record, target, text, figures, logged=not no_figures)


def _report_path(locations: Locations, record: RunRecord, out: Path | None) -> Path:
    """Where the report goes (its directory made): ``out``, or the run directory's ``report.md``."""
    target = (out or locations.home / "runs" / record.id / "report.md").resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _report_intervention(
    locations: Locations, record: RunRecord, result: InterventionResult, out: Path | None, with_figures: bool,
) -> None:
    from ctexp.analysis.report import render_intervention_report

    target = _report_path(locations, record, out)
    figures = []
    if with_figures:
        from ctexp.analysis.figures import save_intervention_figure

        figures = [save_intervention_figure(result, target.parent)]
    text = render_intervention_report(record, result, [figure.name for figure in figures])
    _write_report(locations, record, target, text, figures, logged=with_figures)


def _report_attention(
    locations: Locations, record: RunRecord, report: AttentionReport, out: Path | None, with_figures: bool,
) -> None:
    from ctexp.analysis.attention import save_attention_figure
    from ctexp.analysis.report import render_attention_report

    target = _report_path(locations, record, out)
    figures = [save_attention_figure(report, target.parent)] if with_figures else []
    text = render_attention_report(record, report, [figure.name for figure in figures])
    _write_report(locations, record, target, text, figures, logged=with_figures)


def _write_report(
    locations: Locations, record: RunRecord, target: Path, text: str, figures: list[Path], *, logged: bool,
) -> None:
    """Write the report under a temporary name and rename it into place; log it and its figures to MLflow
    (when ``logged``)."""
    with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp", encoding="utf-8") as handle:
        handle.write(text)
    Path(handle.name).replace(target)
    if logged and record.mlflow_run_id:
        tracker = locations.tracker()
        for path in [target, *figures]:
            tracker.log_artifact(record.mlflow_run_id, path, "report")
    typer.echo(f"wrote {target}")


def ui(
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    home: HomeOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Start the MLflow UI on the run store (loopback only unless --host says otherwise).

    Example: ctexp ui --port 5000
    """
    locations = Locations.resolve(home, None, tracking_uri)
    tracker = locations.tracker()
    tracker.check()
    artifacts = tracker.artifact_location or (locations.home / "artifacts").as_uri()
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", locations.tracking_uri,
        "--default-artifact-root", artifacts, "--host", host, "--port", str(port), "--workers", "1",
    ]
    url = f"http://{host}:{port}/{UI_LANDING}"
    typer.echo(f"MLflow UI at {url} (store {tracker.display_uri}); Ctrl-C stops it", err=True)
    from ctexp.processes import Stopped, run_child

    try:
        code = run_child(command)
    except Stopped as stopped:
        if stopped.signum == signal.SIGINT:
            return  # Ctrl-C is how the UI is meant to stop
        raise typer.Exit(128 + stopped.signum) from None
    except OSError as error:
        raise RegistryError(f"cannot start the MLflow server: {error.strerror or error}") from None
    if code != 0:
        raise RegistryError(f"the MLflow server exited with code {code}; is port {port} free?")


def delete(
    run: RunArgument,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    home: HomeOption = None,
    db_url: DbOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Remove a run from the results database, MLflow and the run directory.

    Example: ctexp delete 3f2a9c --yes
    """
    locations = Locations.resolve(home, db_url, tracking_uri)
    with locations.registry() as registry:
        record = registry.resolve(run)
        if not yes and not typer.confirm(f"delete run {record.id[:12]} ({record.name})?"):
            raise typer.Exit(1)
        if record.mlflow_run_id:
            locations.tracker().delete_run(record.mlflow_run_id)
        shutil.rmtree(locations.home / "runs" / record.id, ignore_errors=True)
        registry.delete_run(record.id)  # last: the SQL row is the commit point
    typer.echo(f"deleted run {record.id} ({record.name})")


def db_upgrade(home: HomeOption = None, db_url: DbOption = None) -> None:
    """Upgrade the results database to this ctexp's schema.

    Example: ctexp db upgrade --db-url postgresql+psycopg://postgres@127.0.0.1/ctexp
    """
    from ctexp.registry.db import Registry

    locations = Locations.resolve(home, db_url)
    with Registry(locations.db_url, upgrade=True) as registry:
        typer.echo(f"schema at revision {registry.current_revision()} (head {registry.head_revision()})")


def db_current(home: HomeOption = None, db_url: DbOption = None, as_json: JsonOption = False) -> None:
    """Show the results database's schema revision and this ctexp's head revision.

    Example: ctexp db current
    """
    from ctexp.registry.db import Registry
    from ctexp.registry.engine import mask_url

    locations = Locations.resolve(home, db_url)
    with Registry(locations.db_url, upgrade=False, check_schema=False) as registry:
        current, head = registry.current_revision(), registry.head_revision()
    if as_json:
        typer.echo(json.dumps({"url": mask_url(locations.db_url), "current": current, "head": head}))
        return
    state = "up to date" if current == head else ("empty" if current is None else "behind: run ctexp db upgrade")
    typer.echo(f"{mask_url(locations.db_url)}: revision {current or '-'} (head {head}), {state}")

