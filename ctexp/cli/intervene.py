"""``ctexp intervene``: replace one continuous thought of a CODI model and print how its answers change.

Thin: parse, call ``ctexp.experiment.intervene``, print (a progress bar on stderr, tables or JSON on
stdout). The intervention is not recorded in the registry yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ctexp.cli.app import print_json, stderr_console, stdout_console
from ctexp.cli.options import DbOption, HomeOption
from ctexp.config import DeviceChoice
from ctexp.data.sources.choices import Precision
from ctexp.errors import ConfigError

if TYPE_CHECKING:
    from ctexp.analysis.intervention import InterventionResult, InterventionRow

MODES_HELP = "Comma list of none, decoded, target, mean, zero, swap, noise (none: the control, replayed)."


def intervene(
    run: Annotated[str, typer.Option(help="The lens run (id, id prefix, name, MLflow id or latest) on a CODI store.")],
    model: Annotated[Path, typer.Option(help="CODI checkpoint directory (or file) the run's store was extracted from.")],
    base: Annotated[Path | None, typer.Option(help="Base model directory with config.json [the --model directory].")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory [the --base directory].")] = None,
    positions: Annotated[
        str | None, typer.Option(help="Store positions to replace: 0-4, 1,3 [every position the site takes].")
    ] = None,
    mode: Annotated[str, typer.Option(help=MODES_HELP)] = "decoded,target,mean,zero,swap,noise",
    site: Annotated[str, typer.Option(help="feedback (prj(h_p), the input of step p+1) or residual (--layer L).")] = "feedback",
    layer: Annotated[int | None, typer.Option(help="Hidden-state index of the residual site (0 = embeddings).")] = None,
    lens_layer: Annotated[
        int | None, typer.Option(help="Layer the lens decodes for decoded [the run's best at each position].")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N problems.")] = None,
    problems: Annotated[str, typer.Option(help="test (the run's test problems) or all (the store's).")] = "test",
    batch_size: Annotated[int, typer.Option(help="Problems per forward pass (sorted by length).")] = 16,
    device: Annotated[DeviceChoice, typer.Option(help="auto, cpu or cuda.")] = DeviceChoice.AUTO,
    dtype: Annotated[Precision, typer.Option(help="bf16 (as CODI runs) or fp32.")] = Precision.BF16,
    lora_r: Annotated[int, typer.Option(help="LoRA rank r of the checkpoint.")] = 128,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha; merged scale alpha / r.")] = 32.0,
    max_answer_tokens: Annotated[int, typer.Option(help="Greedy answer decoding stops after this many tokens.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of swap's derangement, noise and the bootstrap.")] = 0,
    name: Annotated[str | None, typer.Option(help="A name for the intervention.")] = None,
    home: HomeOption = None,
    db_url: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    answers: Annotated[bool, typer.Option("--answers", help="With --json: every row's per-problem answers.")] = False,
) -> None:
    """Rerun a CODI model's thoughts and answer with one thought replaced, and compare the answers.

    Example: ctexp intervene --run latest --model ckpt/codi --base models/Llama-3.2-1B --positions 0-4
    """
    from ctexp.experiment.intervene import make_intervene_config, parse_modes, plan_intervention
    from ctexp.experiment.pipeline import resolve_device
    from ctexp.registry.locations import Locations

    if answers and not as_json:
        raise ConfigError("--answers adds the per-problem answers to --json; pass --json too")
    config = make_intervene_config(
        run=run, model=model, base=base, tokenizer=tokenizer, positions=positions, modes=parse_modes(mode),
        site=site, layer=layer, lens_layer=lens_layer, problems=problems, limit=limit, batch_size=batch_size,
        dtype=dtype, lora_r=lora_r, lora_alpha=lora_alpha, max_answer_tokens=max_answer_tokens, seed=seed,
        name=name,
    )
    plan = plan_intervention(config, Locations.resolve(home, db_url), resolve_device(device))  # bad input fails here
    with Progress(
        TextColumn("[bold]intervening"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[label]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=stderr_console(), transient=as_json,
    ) as progress:
        task = progress.add_task("intervening", total=None, label="")

        def on_progress(event: Any) -> None:
            progress.update(task, total=event.total, completed=event.done, label=event.label)

        result = plan.run(on_progress)
    if as_json:
        print_json(result.to_json(answers=answers))
        return
    console = stdout_console()
    control = result.control
    console.print(
        f"control: {100 * control.accuracy:.2f}% of {control.n} problems correct "
        f"(lens run {result.lens_run[:12]}, site {config.site.value}"
        f"{f' layer {config.layer}' if config.layer is not None else ''})"
    )
    console.print(rows_table(result))


def rows_table(result: InterventionResult) -> Table:
    """One line per (mode, position): accuracy against the control on the same problems, and the tests."""
    table = Table(title="Answers with one thought replaced (paired with the control on the same problems)")
    for column in ("Mode", "Position", "Problems", "Accuracy", "Control", "Delta [95% CI]", "Changed",
                   "Lost/gained", "p", "p (Holm)", "Significant"):
        table.add_column(column, justify="left" if column == "Mode" else "right")
    for row in result.rows:
        table.add_row(
            row.mode, str(row.position), str(row.n), _pct(row.accuracy), _pct(row.control_accuracy), _delta(row),
            _pct(row.changed), f"{row.lost}/{row.gained}", f"{row.p_value:.3g}",
            "-" if row.p_holm is None else f"{row.p_holm:.3g}", "yes" if row.significant else "",
        )
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _delta(row: InterventionRow) -> str:
    if row.delta is None:
        return "-"
    interval = f" [{100 * row.ci[0]:+.1f}, {100 * row.ci[1]:+.1f}]" if row.ci is not None else ""
    return f"{100 * row.delta:+.1f}{interval}"


def register(app: typer.Typer) -> None:
    """Add ``intervene`` to ``app``."""
    app.command("intervene")(intervene)
