"""``ctexp run``: train and evaluate one experiment, record it, print its tables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ctexp.cli.app import bar_cleared_on_error, print_json, stderr_console, stdout_console
from ctexp.cli.options import experiment_options
from ctexp.config import build_config

# Flags of `run` mapped to the config keys they override (None = not given).
ConfigOption = Annotated[Path | None, typer.Option("--config", help="Experiment TOML file; flags override it.")]


def run(
    config_file: ConfigOption = None,
    overrides: dict[str, Any] | None = None,
    home: Annotated[Path | None, typer.Option(help="ctexp home: runs, results database, MLflow store [$CTEXP_HOME or ./mlruns].")] = None,
    db_url: Annotated[str | None, typer.Option(help="Results database URL [$CTEXP_DB_URL or HOME/ctexp.db].")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI [$MLFLOW_TRACKING_URI or HOME/mlflow.db].")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and stop.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Train and evaluate one experiment, then print its tables.

    Example: ctexp run --lens layer-position --split weighted:0.5,1,2,2,1,0.5 --target first
    """
    config = build_config(config_file, overrides or {})
    if dry_run:
        print_json({"config": config.model_dump(mode="json"), "config_hash": config.config_hash()})
        return
    from ctexp.timings import phase

    with phase("imports"):
        from ctexp.cli.render import run_tables
        from ctexp.experiment.pipeline import plan_run
        from ctexp.experiment.recorder import Recorder
        from ctexp.registry.locations import Locations

    locations = Locations.resolve(home, db_url, tracking_uri)
    # Bad input fails here, before any output and before the stores are touched (a fresh home stays empty);
    # MLflow's setup overlaps training instead (the recorder's background writer).
    with phase("store load"):
        plan = plan_run(config)
    with Recorder(locations) as recorder, Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=stderr_console(), transient=as_json,
    ) as progress:
        task = progress.add_task("training", total=config.train.epochs, status="")

        def on_epoch(record: Any) -> None:
            status = f"val loss {record.val_loss:.3f}  top-1 {100 * record.val_top1:.1f}%"
            progress.update(task, advance=1, status=status)

        with bar_cleared_on_error(progress):  # the epochs are recorded: ctexp show has them
            result = recorder.run(config, plan=plan, on_epoch=on_epoch)
        progress.update(task, total=len(result.epochs) or 1, completed=len(result.epochs) or 1)
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    console = stdout_console()
    for table in run_tables(result):
        console.print(table)
    console.print(
        f"run {result.run_id} ({result.name}) finished in {result.seconds:.1f}s on {result.device}; "
        f"recorded in {locations.home} (ctexp show {result.run_id[:8]}, ctexp ui)"
    )




def register(app: typer.Typer) -> None:
    """Add ``run`` to ``app``."""
    app.command("run")(experiment_options()(run))
