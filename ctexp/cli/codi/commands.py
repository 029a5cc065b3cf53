"""``ctexp codi train`` and ``ctexp codi eval``: a tiny CODI trained here, and its answers measured.

A package of its own (one command group) so that ``ctexp/cli`` keeps to ten modules.

Thin: parse, call :mod:`ctexp.tinycodi` (and :mod:`ctexp.experiment.tinycodi`, which records a training
run), print. Bad input fails before training starts, and the checkpoint appears only when complete.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ctexp.cli.app import bar_cleared_on_error, print_json, stderr_console, stdout_console
from ctexp.cli.options import DbOption, HomeOption, JsonOption, TrackingOption

if TYPE_CHECKING:
    from ctexp.tinycodi.evaluate import EvalReport

codi_app = typer.Typer(help="Tiny CODI: train a small continuous-thought model on CPU, and measure its answers.",
                       no_args_is_help=True)


def settings_options(func: Any) -> Any:
    """Give ``func`` a flag for each ``TinyCodiSettings`` field (name, type, default and help from the field),
    in place of its ``settings`` parameter, and call it with the flags' values as ``settings`` (a dict)."""
    from ctexp.tinycodi.settings import TinyCodiSettings

    fields = TinyCodiSettings.model_fields
    signature = inspect.signature(func, eval_str=True)
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                               annotation=Annotated[field.annotation, typer.Option(help=field.description)])
             for name, field in fields.items()]
    parameters: list[inspect.Parameter] = []
    for parameter in signature.parameters.values():
        if parameter.name == "settings":
            parameters.extend(added)
        else:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        return func(**{k: v for k, v in kwargs.items() if k not in fields},
                    settings={k: v for k, v in kwargs.items() if k in fields})

    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


@codi_app.command("train")
@settings_options
def train(
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write (CODI's layout; ctexp extract reads it).")],
    settings: dict[str, Any] | None = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for torch, per model [half the cores with --parallel, else torch's default].")] = None,
    parallel: Annotated[bool, typer.Option(
        help="Train the direct model in a second process at the same time as the latent one.")] = True,
    force: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    home: HomeOption = None,
    db_url: DbOption = None,
    tracking_uri: TrackingOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train the T-latent student and the 0-latent direct model on generated mod-10 chains; write the checkpoint.

    Example: ctexp codi train --out models/tinycodi && ctexp codi eval --model models/tinycodi
    """
    import torch

    from ctexp.errors import ConfigError
    from ctexp.experiment.recorder import Recorder
    from ctexp.experiment.tinycodi import record_training
    from ctexp.registry.locations import Locations
    from ctexp.tinycodi.checkpoint import check_out
    from ctexp.tinycodi.settings import settings_from

    checked = settings_from(settings or {})
    if threads is not None and threads < 1:
        raise ConfigError("--threads must be at least 1")
    if parallel and threads is None:
        threads = max(1, (os.cpu_count() or 2) // 2)  # one model per half of the machine
    if threads is not None:
        torch.set_num_threads(threads)
    check_out(out, force)  # before the progress bar draws anything
    locations = Locations.resolve(home, db_url, tracking_uri)
    with Recorder(locations) as recorder:  # both stores checked before training starts
        progress, update = _progress_bar(checked.total_steps, transient=as_json)
        with progress, bar_cleared_on_error(progress):
            result = record_training(checked, out, recorder, force=force, progress=update,
                                     parallel_threads=threads if parallel else None)
    if as_json:
        print_json({"out": str(result.out), "latent_seconds": round(result.latent.seconds, 1),
                    "direct_seconds": round(result.direct.seconds, 1), "settings": checked.model_dump(mode="json")})
        return
    typer.echo(f"wrote {result.out}: latent model ({checked.latents} latents) {result.latent.seconds:.0f}s, "
               f"direct model {result.direct.seconds:.0f}s (ctexp codi eval --model {result.out}); "
               f"recorded in {locations.home}")


def _progress_bar(total: int, transient: bool) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ctexp.tinycodi.train import Progress as Step

    progress = Progress(TextColumn("[bold]{task.fields[model]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=stderr_console(),
                        transient=transient)
    tasks: dict[str, Any] = {}

    def update(step: Step) -> None:
        if step.model not in tasks:
            tasks[step.model] = progress.add_task(step.model, total=total, model=step.model, status="")
        status = f"stage {step.stage}  teacher {step.teacher:.3f}  student {step.student:.3f}"
        if step.distill:
            status += f"  distill {step.distill:.3f}"
        if step.reembed:
            status += f"  reembed {step.reembed:.3f}"
        progress.update(tasks[step.model], completed=step.step, status=status)

    return progress, update


@codi_app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Option(help="A directory written by ctexp codi train.")],
    split: Annotated[str, typer.Option(help="Held-out split: test or validation.")] = "test",
    limit: Annotated[int | None, typer.Option(help="At most this many problems per length.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch [torch's default].")] = None,
    as_json: JsonOption = False,
) -> None:
    """Answer accuracy by number of steps: the T-latent student, the 0-latent model and the teacher (explicit CoT).

    Example: ctexp codi eval --model models/tinycodi --json
    """
    import torch

    from ctexp.errors import ConfigError
    from ctexp.tinycodi.evaluate import evaluate as run_eval

    if split not in ("test", "validation"):
        raise ConfigError(f"--split must be test or validation, not {split!r}")
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1")
    if threads is not None:
        if threads < 1:
            raise ConfigError("--threads must be at least 1")
        torch.set_num_threads(threads)
    report = run_eval(model, split, limit)
    if as_json:
        print_json(report.model_dump(mode="json"))
        return
    stdout_console().print(eval_table(report))


def eval_table(report: EvalReport) -> Table:
    """Accuracy [95% Wilson interval] by number of steps, one column per reader."""
    table = Table(title=f"Answer accuracy on {report.split} problems of {report.model} (95% Wilson intervals)")
    for column in ("Steps", "n", f"Latent (T={report.latents})", "Direct (0 latents)", "Teacher (explicit CoT)"):
        table.add_column(column, justify="right")
    for row in report.by_steps:
        cells = [f"{100 * a.accuracy:.1f}% [{100 * a.ci[0]:.1f}, {100 * a.ci[1]:.1f}]"
                 for a in (row.latent, row.direct, row.teacher)]
        table.add_row(str(row.steps), str(row.n), *cells)
    return table
