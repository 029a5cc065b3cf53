"""Sweep commands: ``sweep`` (run, resume or join a sweep; ``--show`` one) and ``sweeps`` (list them).

Thin: parse, call ``ctexp.sweep``, print tables or JSON. Progress goes to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from ctexp.cli.app import stderr_console, stdout_console
from ctexp.cli.options import DbOption, HomeOption, JsonOption, TrackingOption, experiment_options
from ctexp.errors import ConfigError
from ctexp.registry.locations import Locations

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="Experiment TOML file, with an optional [search] table; flags override it.")
]


def register(app: typer.Typer) -> None:
    """Add the sweep commands to the ``ctexp`` app."""
    app.command("sweep")(sweep)
    app.command("sweeps")(sweeps)


@experiment_options(exclude=("seed", "name"))
def sweep(
    config_file: ConfigOption = None,
    overrides: dict[str, Any] | None = None,
    search: Annotated[list[str] | None, typer.Option(
        "--search", help="KEY=SPEC, repeatable: train.lr=log:1e-4:1e-2, train.batch_size=int:16:128:16, "
                         "lens=choice:layer,layer-position, split=choice:uniform|peak=weighted:0.5,1,2,2,1,0.5.")] = None,
    objective: Annotated[str, typer.Option(help="val_top1 (maximise), val_loss (minimise) or positions:2-3 "
                                                "(mean validation top-1 there, maximise).")] = "val_top1",
    sampler: Annotated[str, typer.Option(help="tpe, random or grid.")] = "tpe",
    pruner: Annotated[str, typer.Option(help="median, hyperband or none (fed the objective every epoch).")] = "median",
    seed: Annotated[int, typer.Option(help="Sampler seed (the experiment's own seed comes from --config).")] = 0,
    n_trials: Annotated[int | None, typer.Option(help="Complete or pruned trials the study ends with [20; grid: its size].")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds after which no new trial starts.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes on this machine, each loading the store once.")] = 1,
    study: Annotated[str | None, typer.Option(help="Sweep (and Optuna study) name; the same name resumes or joins it "
                                                   "[sweep-HASH of the experiment, space and objective].")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage: a journal file [HOME/optuna.journal], "
                                                     "sqlite:///PATH or postgresql+psycopg://USER@HOST/DB.")] = None,
    best_out: Annotated[Path | None, typer.Option(help="Where to write the best configuration as TOML "
                                                       "[HOME/sweeps/NAME/best.toml].")] = None,
    show: Annotated[str | None, typer.Option(help="Summarise the sweep NAME (trials, best, importances) and stop.")] = None,
    home: HomeOption = None,
    db_url: DbOption = None,
    tracking_uri: TrackingOption = None,
    as_json: JsonOption = False,
) -> None:
    """Search an experiment's hyperparameters with Optuna; every trial is a recorded run.

    Example: ctexp sweep --n-trials 12 --workers 2 --search lens=choice:layer,layer-position
    """
    from ctexp.sweep.request import build_request
    from ctexp.sweep.study import run_sweep
    from ctexp.sweep.summary import show_sweep

    locations = Locations.resolve(home, db_url, tracking_uri)
    if show is not None:
        summary = show_sweep(show, locations, storage)
        if as_json:
            typer.echo(json.dumps(summary.model_dump(mode="json"), indent=2))
            return
        _print_show(summary)
        return
    request = build_request(
        config_file, overrides or {}, search or [], objective=objective, sampler=sampler, pruner=pruner, seed=seed,
        n_trials=n_trials, timeout=timeout, workers=workers, study=study, storage=storage, best_out=best_out,
    )
    # Shown once everything is checked (bad input stays one line), on stderr.
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=stderr_console(), transient=as_json,
    )
    task = progress.add_task("sweep", total=None, status="")
    started: list[bool] = []

    def on_start(plan: Any) -> None:
        progress.update(task, description=f"sweep {plan.name}", total=plan.n_trials,
                        status=f"{plan.objective} ({plan.objective.direction}), {plan.sampler.value}/"
                               f"{plan.pruner.value}, {request.workers} worker(s)")
        progress.start()
        started.append(True)

    def on_progress(state: Any) -> None:
        counts = state.counts
        best = "-" if state.best_value is None else f"{state.best_value:.4g} (trial {state.best_trial})"
        progress.update(task, total=state.n_trials, completed=min(counts.done, state.n_trials), status=(
            f"complete {counts.complete}  pruned {counts.pruned}  failed {counts.failed}  "
            f"running {counts.running}  best {best}"
        ))

    try:
        summary = run_sweep(request, locations, on_start=on_start, on_progress=on_progress)
    finally:
        if started:
            progress.stop()
    for warning in summary.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        typer.echo(json.dumps(summary.model_dump(mode="json"), indent=2))
        return
    console = stdout_console()
    console.print(_best_table(summary))
    counts = summary.counts
    console.print(
        f"sweep {summary.sweep['name']}: {counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed "
        f"({counts.done} of {summary.n_trials}) in {summary.seconds:.1f}s; status {summary.sweep['status']}"
    )
    if summary.best_toml:
        console.print(f"best configuration (trial {summary.best.number if summary.best else '-'}) saved to "
                      f"{summary.best_toml}; re-run it with: ctexp run --config {summary.best_toml}")
        console.print(Path(summary.best_toml).read_text(), markup=False, highlight=False)


def sweeps(
    experiment: Annotated[str | None, typer.Option(help="Only sweeps of this experiment.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many sweeps.")] = 50,
    home: HomeOption = None,
    db_url: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """List sweeps, newest first, with their trials' runs and best values.

    Example: ctexp sweeps
    """
    from ctexp.sweep.summary import list_sweeps

    if limit < 1:
        raise ConfigError("--limit must be at least 1")
    records = list_sweeps(Locations.resolve(home, db_url), experiment, limit)
    if as_json:
        typer.echo(json.dumps([record.to_json() for record in records], indent=2))
        return
    table = Table(title=f"Sweeps ({len(records)})")
    for column in ("Id", "Name", "Status", "Experiment", "Objective", "Runs done/asked", "Pruned", "Failed", "Best",
                   "Best trial", "Sampler/pruner", "Storage", "Created (UTC)"):
        table.add_column(column)
    for r in records:
        done = r.runs.get("FINISHED", 0) + r.runs.get("PRUNED", 0)
        table.add_row(
            str(r.id), r.name, r.status.value, r.experiment, f"{r.objective} ({r.direction[:3]})",
            f"{done}/{r.n_trials}", str(r.runs.get("PRUNED", 0)), str(r.runs.get("FAILED", 0)),
            "-" if r.best_value is None else f"{r.best_value:.4g}",
            "-" if r.best_trial_number is None else str(r.best_trial_number), f"{r.sampler}/{r.pruner}", r.storage,
            f"{r.created_at:%Y-%m-%d %H:%M:%S}",
        )
    stdout_console().print(table)


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _param(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _best_table(summary: Any) -> Table:
    sweep = summary.sweep
    table = Table(title=f"Best trials of sweep {sweep['name']} ({sweep['objective']}, {sweep['direction']}, validation)")
    keys = list(sweep["search_space"]["params"])
    for column in ("Trial", "Value", *keys, "Epochs", "Seconds", "Run"):
        table.add_column(column)
    for row in summary.top:
        table.add_row(str(row.number), _value(row.value), *(_param(row.params.get(k, "-")) for k in keys),
                      str(row.epochs), _value(row.seconds), (row.run_id or "-")[:12])
    return table


def _print_show(summary: Any) -> None:
    console = stdout_console()
    sweep = summary.sweep
    console.print(
        f"sweep {sweep['name']} (id {sweep['id']}) in experiment {sweep['experiment']}: {sweep['status']}; "
        f"{sweep['objective']} ({sweep['direction']}), sampler {sweep['sampler']}, pruner {sweep['pruner']}, "
        f"storage {sweep['storage']}, MLflow parent run {sweep['mlflow_parent_run_id'] or '-'}"
    )
    console.print("search space: " + ", ".join(f"{key}" for key in sweep["search_space"]["params"]))
    states = Table(title=f"Trials by state ({summary.counts.done} of {summary.n_trials} done)")
    for column in ("Complete", "Pruned", "Failed", "Running", "Waiting"):
        states.add_column(column)
    c = summary.counts
    states.add_row(str(c.complete), str(c.pruned), str(c.failed), str(c.running), str(c.waiting))
    console.print(states)
    console.print(_best_table(summary))
    if summary.importances:
        table = Table(title=f"Parameter importances ({summary.importance_evaluator}, complete trials)")
        table.add_column("Parameter")
        table.add_column("Importance")
        for key, value in summary.importances.items():
            table.add_row(key, f"{value:.3f}")
        console.print(table)
    elif summary.importance_note:
        console.print(summary.importance_note)
    failed = [row for row in summary.trials if row.state == "FAIL"]
    for row in failed:
        reason = row.error or "worker died"
        console.print(f"trial {row.number} failed: {reason}")
    if summary.best_config is not None and summary.best is not None:
        console.print(f"best configuration (trial {summary.best.number}):")
        console.print_json(json.dumps(summary.best_config))
