"""The ``extract`` and ``import`` commands: real activations into stores. Thin: parse, call, print.

``cli.py`` adds them with ``register(app)``; errors are the library's ``CtexpError``s, which the
app's one handler turns into ``Error: ...`` lines.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
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

from ctexp.config import DeviceChoice
from ctexp.sources.choices import NormKind, Precision

if TYPE_CHECKING:
    from ctexp.sources.extraction import ExtractProgress, ExtractResult


class RateColumn(ProgressColumn):
    """Problems per second: rich's recent-speed estimate, else the run's average (resumed problems excluded)."""

    def render(self, task: Task) -> Text:
        speed = task.speed or task.fields.get("average")
        return Text("-- problems/s" if not speed else f"{speed:.2f} problems/s")


def extract(
    model: Annotated[
        Path, typer.Option(help="CODI checkpoint directory (model.safetensors or pytorch_model.bin), or the file.")
    ],
    data: Annotated[str, typer.Option(help="Problems: gsm8k:PATH, aug:PATH or hf:DIR (a local datasets directory).")],
    out: Annotated[Path, typer.Option(help="Store directory to write (work goes to OUT.partial until done).")],
    base: Annotated[
        Path | None, typer.Option(help="Base model directory with config.json [the --model directory].")
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory [the --base directory].")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N problems.")] = None,
    batch_size: Annotated[int, typer.Option(help="Problems per forward pass (sorted by length).")] = 16,
    device: Annotated[DeviceChoice, typer.Option(help="auto, cpu or cuda.")] = DeviceChoice.AUTO,
    dtype: Annotated[Precision, typer.Option(help="bf16 (as CODI runs) or fp32.")] = Precision.BF16,
    lora_r: Annotated[int, typer.Option(help="LoRA rank r of the checkpoint.")] = 128,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha; merged scale alpha / r.")] = 32.0,
    max_answer_tokens: Annotated[int, typer.Option(help="Greedy answer decoding stops after this many tokens.")] = 256,
    positions: Annotated[int, typer.Option(help="Latent steps T (continuous thoughts).")] = 6,
    shard_size: Annotated[int, typer.Option(help="Problems per shard: the unit of resumption and of memory.")] = 256,
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
    from ctexp.experiment import resolve_device
    from ctexp.sources.extraction import make_config, prepare_extraction

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
    )
    extraction = prepare_extraction(
        config, out, resolve_device(device), force=force
    )  # bad input fails here, before output
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
        result = extraction.run(progress=_on_progress(progress, task))
    if as_json:
        typer.echo(json.dumps(_summary(result), indent=2))
        return
    meta = result.meta
    accuracy = 100 * result.correct / meta.n_problems
    resumed = f", {result.resumed} resumed" if result.resumed else ""
    typer.echo(
        f"wrote {result.path}: {meta.n_problems} problems ({result.correct} answered correctly, "
        f"{accuracy:.1f}%{resumed}), {meta.n_states} states x {meta.n_positions} positions x {meta.hidden} hidden, "
        f"{meta.dtype}, vocab {meta.vocab}, hash {meta.content_hash}, {result.seconds:.1f}s"
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
    problems: Annotated[str, typer.Option(help="Problems: JSONL of problem records, or gsm8k:PATH, aug:PATH, hf:DIR.")],
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
    from ctexp.sources.imports import ImportSpec, import_store

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


def register(app: typer.Typer) -> None:
    """Add ``extract`` and ``import`` to ``app`` (a second call adds nothing)."""
    present = {info.name or (info.callback.__name__ if info.callback else None) for info in app.registered_commands}
    if "extract" not in present:
        app.command("extract")(extract)
    if "import" not in present:
        app.command("import")(import_)
