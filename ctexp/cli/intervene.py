"""``ctexp intervene``: replace one continuous thought of a CODI model, record how its answers change, print it.

Thin: parse, plan (``ctexp.experiment.intervene``), run and record (``ctexp.experiment.intervene_record``),
print (a progress bar on stderr, tables or JSON on stdout).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ctexp.cli.app import bar_cleared_on_error, print_json, stderr_console, stdout_console
from ctexp.cli.options import (
    BaseOption,
    BatchSizeOption,
    DbOption,
    DeviceOption,
    DtypeOption,
    HomeOption,
    LimitOption,
    LoraAlphaOption,
    LoraROption,
    MaxAnswerTokensOption,
    TokenizerDirOption,
    TrackingOption,
)
from ctexp.config import DeviceChoice
from ctexp.data.sources.choices import Precision
from ctexp.errors import ConfigError

if TYPE_CHECKING:
    from ctexp.analysis.intervention import InterventionResult
    from ctexp.experiment.intervene import InterventionPlan
    from ctexp.experiment.recorder import Recorder

MODES_HELP = "Comma list of none, decoded, target, mean, zero, swap, noise (none: the control, replayed)."


def intervene(
    run: Annotated[str, typer.Option(help="The lens run (id, id prefix, name, MLflow id or latest) on a CODI store.")],
    model: Annotated[Path, typer.Option(help="CODI checkpoint directory (or file) the run's store was extracted from.")],
    base: BaseOption = None,
    tokenizer: TokenizerDirOption = None,
    positions: Annotated[
        str | None, typer.Option(help="Store positions to replace: 0-4, 1,3 [every position the site takes].")
    ] = None,
    mode: Annotated[str, typer.Option(help=MODES_HELP)] = "decoded,target,mean,zero,swap,noise",
    site: Annotated[str, typer.Option(help="feedback (prj(h_p), the input of step p+1) or residual (--layer L).")] = "feedback",
    layer: Annotated[int | None, typer.Option(help="Hidden-state index of the residual site (0 = embeddings).")] = None,
    lens_layer: Annotated[
        int | None, typer.Option(help="Layer the lens decodes for decoded [the run's best at each position].")
    ] = None,
    limit: LimitOption = None,
    problems: Annotated[str, typer.Option(help="test (the run's test problems) or all (the store's).")] = "test",
    batch_size: BatchSizeOption = 16,
    device: DeviceOption = DeviceChoice.AUTO,
    dtype: DtypeOption = Precision.BF16,
    lora_r: LoraROption = 128,
    lora_alpha: LoraAlphaOption = 32.0,
    max_answer_tokens: MaxAnswerTokensOption = 256,
    seed: Annotated[int, typer.Option(help="Seed of swap's derangement, noise and the bootstrap.")] = 0,
    name: Annotated[str | None, typer.Option(help="A name for the intervention.")] = None,
    home: HomeOption = None,
    db_url: DbOption = None,
    tracking_uri: TrackingOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    answers: Annotated[bool, typer.Option("--answers", help="With --json: every row's per-problem answers.")] = False,
) -> None:
    """Rerun a CODI model's thoughts and answer with one thought replaced, compare the answers, and record them.

    Example: ctexp intervene --run latest --model ckpt/codi --base models/Llama-3.2-1B --positions 0-4
    """
    from ctexp.cli.render import control_line, rows_table
    from ctexp.experiment.intervene import make_intervene_config, parse_modes, plan_intervention
    from ctexp.experiment.pipeline import resolve_device
    from ctexp.experiment.recorder import Recorder
    from ctexp.registry.locations import Locations

    if answers and not as_json:
        raise ConfigError("--answers adds the per-problem answers to --json; pass --json too")
    config = make_intervene_config(
        run=run, model=model, base=base, tokenizer=tokenizer, positions=positions, modes=parse_modes(mode),
        site=site, layer=layer, lens_layer=lens_layer, problems=problems, limit=limit, batch_size=batch_size,
        dtype=dtype, lora_r=lora_r, lora_alpha=lora_alpha, max_answer_tokens=max_answer_tokens, seed=seed,
        name=name,
    )
    locations = Locations.resolve(home, db_url, tracking_uri)
    with Recorder(locations) as recorder:  # both stores checked before the model loads
        plan = plan_intervention(config, locations, resolve_device(device))  # bad input fails here
        result = _run(plan, recorder, as_json)
    if as_json:
        print_json(result.to_json(answers=answers))
        return
    console = stdout_console()
    console.print(control_line(result))
    console.print(rows_table(result))
    console.print(
        f"run {result.run_id} recorded in {locations.home} (ctexp show {result.run_id[:8]}, "
        f"ctexp report {result.run_id[:8]})"
    )


def _run(plan: InterventionPlan, recorder: Recorder, as_json: bool) -> InterventionResult:
    """Run and record the intervention under a progress bar on stderr."""
    from ctexp.experiment.intervene_record import record_intervention

    with Progress(
        TextColumn("[bold]intervening"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[label]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=stderr_console(), transient=as_json,
    ) as progress:
        task = progress.add_task("intervening", total=None, label="")

        def on_progress(event: Any) -> None:
            progress.update(task, total=event.total, completed=event.done, label=event.label)

        with bar_cleared_on_error(progress):
            return record_intervention(plan, recorder, on_progress)


def register(app: typer.Typer) -> None:
    """Add ``intervene`` to ``app``."""
    app.command("intervene")(intervene)
