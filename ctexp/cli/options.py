"""The experiment flags (``--lens``, ``--lr``, ``--world-problems``, ...), derived from the config models.

``ctexp run`` and ``ctexp sweep`` take a flag for each experiment field that ``config.config_fields``
marks as one: its name, type, help and shown default come from the field's declaration in
``ctexp.config``. ``experiment_options`` adds them to a Typer command, which receives them as one
``overrides`` dict (config key -> value, None when not given) for ``config.build_config``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ctexp.config import ConfigField, DeviceChoice, config_fields
from ctexp.data.sources.choices import Precision

F = TypeVar("F", bound=Callable[..., Any])


def experiment_flags() -> tuple[ConfigField, ...]:
    """The experiment fields that are flags, in the config's order."""
    return tuple(field for field in config_fields() if field.flag is not None)


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


# Options of the commands that run a CODI checkpoint again (extract, intervene): declared once.
BaseOption = Annotated[
    Path | None, typer.Option("--base", help="Base model directory with config.json [the --model directory].")
]
TokenizerDirOption = Annotated[Path | None, typer.Option("--tokenizer", help="Tokenizer directory [the --base directory].")]
LimitOption = Annotated[int | None, typer.Option("--limit", help="Only the first N problems.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", help="Problems per forward pass (sorted by length).")]
DeviceOption = Annotated[DeviceChoice, typer.Option("--device", help="auto, cpu or cuda.")]
DtypeOption = Annotated[Precision, typer.Option("--dtype", help="bf16 (as CODI runs) or fp32.")]
LoraROption = Annotated[int, typer.Option("--lora-r", help="LoRA rank r of the checkpoint.")]
LoraAlphaOption = Annotated[float, typer.Option("--lora-alpha", help="LoRA alpha; merged scale alpha / r.")]
MaxAnswerTokensOption = Annotated[
    int, typer.Option("--max-answer-tokens", help="Greedy answer decoding stops after this many tokens.")
]


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
    every = experiment_flags()
    unknown = excluded - {field.flag for field in every}
    if unknown:
        raise ValueError(f"unknown experiment flags {sorted(unknown)}")
    flags = {field.flag: field for field in every if field.flag not in excluded}

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        if OVERRIDES_PARAMETER not in signature.parameters:
            raise TypeError(f"{func.__name__} needs a parameter named {OVERRIDES_PARAMETER!r}")
        own = {name for name in signature.parameters if name != OVERRIDES_PARAMETER}
        clash = own & set(flags)
        if clash:
            raise TypeError(f"{func.__name__} declares {sorted(clash)} itself; exclude them from the experiment flags")
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Annotated[field.type | None, typer.Option(help=field.help)])
            for name, field in flags.items()
        ]
        parameters: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():
            if parameter.name == OVERRIDES_PARAMETER:
                parameters.extend(added)
            else:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            overrides = {field.key: _plain(kwargs.pop(name, None)) for name, field in flags.items()}
            return func(**kwargs, **{OVERRIDES_PARAMETER: overrides})

        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        if signature.return_annotation is not inspect.Signature.empty:
            wrapper.__annotations__["return"] = signature.return_annotation
        return wrapper  # type: ignore[return-value]

    return decorate


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value
