"""The experiment flags (``--lens``, ``--lr``, ``--world-problems``, ...), declared once for every command.

``ctexp run`` and ``ctexp sweep`` take the same flags for the experiment's fields. Each is listed here
once, with the config key it overrides and its help; ``experiment_options`` adds them to a Typer
command, which receives them as one ``overrides`` dict (config key -> value, None when not given) for
``config.build_config``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ctexp.config import (
    AdapterKind,
    DeviceChoice,
    EmptyPolicy,
    LensKind,
    Subset,
    TargetRule,
)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ExperimentFlag:
    """One flag: its parameter name (``world_problems`` -> ``--world-problems``), config key, type, help."""

    name: str
    key: str
    type: Any
    help: str


EXPERIMENT_FLAGS: tuple[ExperimentFlag, ...] = (
    ExperimentFlag("store", "store", str, "Activation store directory (default: the embedded world)."),
    ExperimentFlag("lens", "lens", LensKind, "Translators: identity, layer, layer-position, position, global."),
    ExperimentFlag("adapter", "adapter", AdapterKind, "Position context for shared lenses: none, bias, lowrank."),
    ExperimentFlag("adapter_rank", "adapter_rank", int, "Rank of the lowrank adapter."),
    ExperimentFlag("split", "split", str, "uniform, or weighted:w0,...,w5 (largest remainder)."),
    ExperimentFlag("empty", "empty", EmptyPolicy, "Positions with no token: skip or nearest."),
    ExperimentFlag("target", "target", TargetRule, "first, middle, last, informative or all."),
    ExperimentFlag("layers", "layers", str, "Hidden-state indices: all, 15, 0-7,15."),
    ExperimentFlag("positions", "positions", str, "CT positions: all, 2-3, 0,5."),
    ExperimentFlag("subset", "subset", Subset, "Problems by answer correctness: all, correct, incorrect."),
    ExperimentFlag("tokenizer", "tokenizer", str,
                   "CoT tokenizer: builtin, tiktoken:NAME, hf:PATH (default: the store's)."),
    ExperimentFlag("val_fraction", "val_fraction", float, "Share of problems for validation."),
    ExperimentFlag("test_fraction", "test_fraction", float, "Share of problems for test."),
    ExperimentFlag("seed", "seed", int, "Seed for splits, initialisation and batches."),
    ExperimentFlag("device", "device", DeviceChoice, "auto, cpu or cuda."),
    ExperimentFlag("name", "name", str, "Run name."),
    ExperimentFlag("experiment", "experiment", str, "Experiment name grouping runs [default]."),
    ExperimentFlag("lr", "train.lr", float, "AdamW learning rate [1e-3]."),
    ExperimentFlag("weight_decay", "train.weight_decay", float, "AdamW weight decay [1e-3]."),
    ExperimentFlag("batch_size", "train.batch_size", int, "Training states per step [32]."),
    ExperimentFlag("epochs", "train.epochs", int, "Maximum epochs [50]."),
    ExperimentFlag("patience", "train.patience", int, "Early-stopping patience on validation loss [5]."),
    ExperimentFlag("clip", "train.clip", float, "Gradient-norm clip [1.0]."),
    ExperimentFlag("world_seed", "world.seed", int, "Embedded world: seed."),
    ExperimentFlag("world_problems", "world.problems", int, "Embedded world: number of problems [600]."),
    ExperimentFlag("world_layers", "world.layers", int, "Embedded world: transformer layers [8]."),
    ExperimentFlag("world_hidden", "world.hidden", int, "Embedded world: hidden size [64]."),
    ExperimentFlag("world_noise", "world.noise", float, "Embedded world: noise scale [1.0]."),
)

# Options that many commands share: where the registry lives, filters, output form.
HomeOption = Annotated[Path | None, typer.Option("--home", help="ctexp home [$CTEXP_HOME or ./mlruns].")]
DbOption = Annotated[str | None, typer.Option("--db-url", help="Results database URL [$CTEXP_DB_URL or HOME/ctexp.db].")]
TrackingOption = Annotated[
    str | None, typer.Option("--tracking-uri", help="MLflow tracking URI [$MLFLOW_TRACKING_URI or HOME/mlflow.db].")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
ExperimentFilter = Annotated[str | None, typer.Option("--experiment", help="Only runs of this experiment.")]
LensFilter = Annotated[str | None, typer.Option("--lens", help="Only runs of this lens kind.")]
SplitFilter = Annotated[str | None, typer.Option("--split", help="Only runs with this split rule.")]
TargetFilter = Annotated[str | None, typer.Option("--target", help="Only runs with this target rule.")]
RunArgument = Annotated[str, typer.Argument(help="A run id, a unique id prefix, a run name, an MLflow run id, or latest.")]


OVERRIDES_PARAMETER = "overrides"


def experiment_options(exclude: Iterable[str] = ()) -> Callable[[F], F]:
    """Decorate a Typer command so that it takes every experiment flag but those in ``exclude``.

    The command declares a parameter named ``overrides``; the flags take its place in the signature
    (and in ``--help``), and the command receives ``overrides``: config key -> value (enums as their
    values, None for flags not given), ready for ``build_config``.

    Example::

        @app.command()
        @experiment_options(exclude=("name",))
        def sweep(config_file: ConfigOption = None, overrides: dict[str, Any] | None = None, ...) -> None:
            config = build_config(config_file, overrides)
    """
    excluded = set(exclude)
    unknown = excluded - {flag.name for flag in EXPERIMENT_FLAGS}
    if unknown:
        raise ValueError(f"unknown experiment flags {sorted(unknown)}")
    flags = [flag for flag in EXPERIMENT_FLAGS if flag.name not in excluded]

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        if OVERRIDES_PARAMETER not in signature.parameters:
            raise TypeError(f"{func.__name__} needs a parameter named {OVERRIDES_PARAMETER!r}")
        own = {name for name in signature.parameters if name != OVERRIDES_PARAMETER}
        clash = own & {flag.name for flag in flags}
        if clash:
            raise TypeError(f"{func.__name__} declares {sorted(clash)} itself; exclude them from the experiment flags")
        added = [
            inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Annotated[flag.type | None, typer.Option(help=flag.help)])
            for flag in flags
        ]
        parameters: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():
            if parameter.name == OVERRIDES_PARAMETER:
                parameters.extend(added)
            else:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            overrides = {flag.key: _plain(kwargs.pop(flag.name, None)) for flag in flags}
            return func(**kwargs, **{OVERRIDES_PARAMETER: overrides})

        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        if signature.return_annotation is not inspect.Signature.empty:
            wrapper.__annotations__["return"] = signature.return_annotation
        return wrapper  # type: ignore[return-value]

    return decorate


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value
