"""``ctexp codi train`` and ``ctexp codi eval``: a tiny CODI trained here, and its answers measured.

A package of its own (one command group) so that ``ctexp/cli`` keeps to ten modules.

Thin: parse, call :mod:`ctexp.tinycodi` (and :mod:`ctexp.experiment.tinycodi`, which records a training
run), print. Bad input fails before training starts, and the checkpoint appears only when complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ctexp.cli.app import print_json, stderr_console, stdout_console
from ctexp.cli.options import DbOption, HomeOption, JsonOption, TrackingOption

if TYPE_CHECKING:
    from ctexp.tinycodi.evaluate import EvalReport

_NOT_SETTINGS = ("out", "threads", "force", "home", "db_url", "tracking_uri", "as_json")
codi_app = typer.Typer(help="Tiny CODI: train a small continuous-thought model on CPU, and measure its answers.",
                       no_args_is_help=True)


@codi_app.command("train")
def train(
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write (CODI's layout; ctexp extract reads it).")],
    seed: Annotated[int, typer.Option(help="Seed of the model's init, the problems and the held-out split.")] = 0,
    min_steps: Annotated[int, typer.Option(help="Fewest CoT steps of a problem.")] = 2,
    max_steps: Annotated[int, typer.Option(help="Most CoT steps of a problem.")] = 4,
    latents: Annotated[int, typer.Option(help="T: latent steps of the student.")] = 4,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 128,
    layers: Annotated[int, typer.Option(help="Transformer blocks.")] = 4,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    intermediate: Annotated[int, typer.Option(help="MLP inner size.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Problems per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 1e-3,
    warmup: Annotated[int, typer.Option(help="Linear warmup steps.")] = 50,
    teacher_steps: Annotated[int, typer.Option(help="Teacher-only steps before the first stage.")] = 100,
    stage_steps: Annotated[int, typer.Option(help="Steps per curriculum stage.")] = 250,
    stages: Annotated[int, typer.Option(help="Stages; stage s replaces the first s CoT steps by latents.")] = 4,
    teacher_weight: Annotated[float, typer.Option(help="Weight of the teacher's CE (explicit CoT).")] = 1.0,
    distill_weight: Annotated[float, typer.Option(help="Weight of CODI's L1 distillation at the answer token.")] = 0.0,
    validation: Annotated[int, typer.Option(help="Held-out validation problems per length.")] = 100,
    test: Annotated[int, typer.Option(help="Held-out test problems per length.")] = 500,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch [torch's default].")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    home: HomeOption = None,
    db_url: DbOption = None,
    tracking_uri: TrackingOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train the T-latent student and the 0-latent direct model on generated mod-10 chains; write the checkpoint.

    Example: ctexp codi train --out models/tinycodi && ctexp codi eval --model models/tinycodi
    """
    values: dict[str, Any] = {k: v for k, v in locals().items() if k not in _NOT_SETTINGS}
    import torch

    from ctexp.errors import ConfigError
    from ctexp.experiment.recorder import Recorder
    from ctexp.experiment.tinycodi import record_training
    from ctexp.registry.locations import Locations
    from ctexp.tinycodi.checkpoint import check_out
    from ctexp.tinycodi.settings import settings_from

    settings = settings_from(values)
    if threads is not None:
        if threads < 1:
            raise ConfigError("--threads must be at least 1")
        torch.set_num_threads(threads)
    check_out(out, force)  # before the progress bar draws anything
    locations = Locations.resolve(home, db_url, tracking_uri)
    with Recorder(locations) as recorder:  # both stores checked before training starts
        progress, update = _progress_bar(settings.total_steps, transient=as_json)
        with progress:
            result = record_training(settings, out, recorder, force=force, progress=update)
    if as_json:
        print_json({"out": str(result.out), "latent_seconds": round(result.latent.seconds, 1),
                    "direct_seconds": round(result.direct.seconds, 1), "settings": settings.model_dump(mode="json")})
        return
    typer.echo(f"wrote {result.out}: latent model ({settings.latents} latents) {result.latent.seconds:.0f}s, "
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
