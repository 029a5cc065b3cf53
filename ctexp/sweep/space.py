"""A sweep's search space: which experiment fields vary, and over which values.

A space maps keys to parameters. Keys are experiment fields (dotted for ``[train]``: ``train.lr``),
plus the split family ``split_peak`` / ``split_width``. A parameter is written as a spec, the same in
a ``--search KEY=SPEC`` flag and as a string in a TOML ``[search]`` table:

=========================  ==================================================================
``log:LOW:HIGH``           a float, log-uniform (LOW > 0)
``float:LOW:HIGH[:STEP]``  a float, uniform (on a grid of STEP when given)
``int:LOW:HIGH[:STEP]``    an integer, uniform
``logint:LOW:HIGH``        an integer, log-uniform
``choice:A,B,C``           one of the values; separate them with ``|`` when a value holds commas
                           (split weights, layer lists); ``NAME=VALUE`` items name a value, and
                           the study records the name
=========================  ==================================================================

In TOML a list is a choice too (``lens = ["layer", "layer-position"]``), and an inline table of
``NAME = VALUE`` a named choice (``split = {uniform = "uniform", peak = "weighted:0.5,1,2,2,1,0.5"}``).

The split family turns two numbers into split weights: ``split_peak`` P (a position, default the
middle, (T-1)/2) and ``split_width`` W (in positions, default 1.5) give ``weighted:w0,...,w{T-1}``
with ``w_i = max(0.01, exp(-(i - P)^2 / (2 W^2)))`` rounded to 3 significant digits: positions near
P get more of the CoT tokens. It replaces ``split``; searching both is an error.

The searchable fields are those ``ctexp.config`` declares ``searchable``: only fields that keep the
activation store fixed (a sweep worker loads the store once): ``store``, ``world.*``, ``tokenizer``
cannot be searched, and neither can the data split (``seed``, ``val_fraction``, ``test_fraction``: the
objective must compare trials on the same validation set) nor fields that do not change what is
computed (``name``, ``experiment``, ``device``).
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError, model_validator

from ctexp.config import ExperimentConfig, config_fields, parse_index_spec, set_dotted, validation_message
from ctexp.errors import ConfigError
from ctexp.records import FrozenRecord

if TYPE_CHECKING:
    import optuna

Scalar = bool | int | float | str

SPLIT_FAMILY = ("split_peak", "split_width")
DEFAULT_SPLIT_WIDTH = 1.5
MIN_SPLIT_WEIGHT = 0.01


def field_types() -> dict[str, type]:
    """Searchable keys and the Python type of their values (``int``, ``float``; ``str`` for the others).

    The experiment's searchable fields, in the config's order, then the split family.
    """
    types = {field.key: field.type if field.type in (int, float) else str
             for field in config_fields() if field.searchable}
    return types | dict.fromkeys(SPLIT_FAMILY, float)


def search_tables() -> set[str]:
    """The experiment's tables that hold searchable fields (``[search.train]`` in TOML)."""
    return {key.partition(".")[0] for key in field_types() if "." in key}


class ParamKind(StrEnum):
    FLOAT = "float"
    INT = "int"
    CHOICE = "choice"


class SearchParam(FrozenRecord):
    """One searched field: a float or integer range, or a choice among values (optionally named)."""

    kind: ParamKind
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list[Scalar] | None = None
    names: list[str] | None = None  # for a named choice: what the study records for each value

    @model_validator(mode="after")
    def _check(self) -> SearchParam:
        if self.kind is ParamKind.CHOICE:
            if not self.choices:
                raise ValueError("a choice needs at least one value")
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("a choice takes values, not a range")
            labels = self.labels
            if len(set(map(repr, labels))) != len(labels):
                raise ValueError(f"a choice lists a value twice: {', '.join(map(str, labels))}")
            if self.names is not None and len(self.names) != len(self.choices):
                raise ValueError("a named choice needs one name per value")
            return self
        if self.low is None or self.high is None or not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("a range needs finite LOW and HIGH")
        if self.low >= self.high:
            raise ValueError(f"LOW must be below HIGH, got {self.low:g} and {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs LOW > 0, got {self.low:g}")
        if self.step is not None and (not math.isfinite(self.step) or self.step <= 0):
            raise ValueError(f"STEP must be positive, got {self.step:g}")
        if self.log and self.step is not None:
            raise ValueError("a log range takes no STEP")
        if self.kind is ParamKind.INT:
            for bound in (self.low, self.high, self.step):
                if bound is not None and bound != int(bound):
                    raise ValueError(f"an int range needs whole numbers, got {bound:g}")
        return self

    @property
    def labels(self) -> list[Scalar]:
        """What the study records for a choice: the names of a named choice, else the values."""
        assert self.choices is not None
        return list(self.names) if self.names is not None else list(self.choices)

    @property
    def spec(self) -> str:
        """The spec as a flag would write it."""
        if self.kind is ParamKind.CHOICE:
            assert self.choices is not None
            items = [_text(value) if self.names is None else f"{name}={_text(value)}"
                     for name, value in zip(self.names or self.choices, self.choices, strict=True)]
            separator = "|" if any("," in item for item in items) else ","
            return "choice:" + separator.join(items)
        assert self.low is not None and self.high is not None
        if self.log:
            return f"{'log' if self.kind is ParamKind.FLOAT else 'logint'}:{self.low:g}:{self.high:g}"
        step = f":{self.step:g}" if self.step is not None else ""
        return f"{self.kind.value}:{self.low:g}:{self.high:g}{step}"

    def grid(self) -> list[Scalar] | None:
        """Every value of the parameter, or None for a continuous range (no grid)."""
        if self.kind is ParamKind.CHOICE:
            return self.labels
        assert self.low is not None and self.high is not None
        if self.kind is ParamKind.INT:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            return None
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        return [round(self.low + index * self.step, 12) for index in range(count)]

    def suggest(self, trial: optuna.trial.Trial, key: str) -> Scalar:
        """Ask the trial for this parameter's value (what the study records)."""
        if self.kind is ParamKind.CHOICE:
            return trial.suggest_categorical(key, self.labels)  # type: ignore[arg-type]
        assert self.low is not None and self.high is not None
        if self.kind is ParamKind.INT:
            return trial.suggest_int(key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(key, self.low, self.high, step=self.step, log=self.log)

    def value(self, recorded: Scalar) -> Scalar:
        """The field value of what the study recorded (a named choice's name -> its value)."""
        if self.names is not None and self.choices is not None and recorded in self.names:
            return self.choices[self.names.index(recorded)]  # type: ignore[arg-type]
        return recorded


class SearchSpace(FrozenRecord):
    """Searched keys (``field_types``) and their parameters, in the order they are suggested."""

    params: dict[str, SearchParam]

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        if not self.params:
            raise ValueError("a search space needs at least one parameter")
        for key, param in self.params.items():
            _check_key_kind(key, param)
        if "split" in self.params and any(key in self.params for key in SPLIT_FAMILY):
            raise ValueError("search either split or split_peak/split_width, not both: both set the split")
        return self

    def specs(self) -> dict[str, str]:
        """Key -> spec, for display."""
        return {key: param.spec for key, param in self.params.items()}

    def grid(self) -> dict[str, list[Scalar]]:
        """Every value of every parameter, for the grid sampler.

        Raises:
            ConfigError: a parameter is a continuous range.
        """
        grid: dict[str, list[Scalar]] = {}
        for key, param in self.params.items():
            values = param.grid()
            if values is None:
                raise ConfigError(
                    f"the grid sampler needs finite values, but {key}={param.spec} is a continuous range; "
                    f"give a choice (e.g. {key}=choice:{param.low:g},{param.high:g}) or a STEP (float:LOW:HIGH:STEP)"
                )
            grid[key] = values
        return grid

    def suggest(self, trial: optuna.trial.Trial) -> dict[str, Scalar]:
        """Ask the trial for every parameter; returns what the study recorded, by key."""
        return {key: param.suggest(trial, key) for key, param in self.params.items()}

    def overrides(self, recorded: dict[str, Any], n_positions: int) -> dict[str, Any]:
        """Config overrides (dotted key -> field value) for the values a trial recorded.

        Args:
            recorded: key -> value as the study recorded it (``trial.params``).
            n_positions: T, for the split family.
        """
        values = {key: self.params[key].value(value) for key, value in recorded.items() if key in self.params}
        overrides = {key: value for key, value in values.items() if key not in SPLIT_FAMILY}
        if any(key in values for key in SPLIT_FAMILY):
            peak = float(values.get("split_peak", (n_positions - 1) / 2))
            width = float(values.get("split_width", DEFAULT_SPLIT_WIDTH))
            overrides["split"] = family_split(peak, width, n_positions)
        return overrides

    def check(self, base: ExperimentConfig, n_positions: int, n_states: int) -> None:
        """Check every value of every parameter against the base experiment and the store's sizes.

        Each choice, and both ends of each range, is applied to the base experiment alone; combinations
        are checked when a trial is built (an invalid one fails that trial).

        Raises:
            ConfigError: naming the key and the offending value.
        """
        for key, param in self.params.items():
            if param.kind is ParamKind.CHOICE:
                samples = param.labels
            else:
                assert param.low is not None and param.high is not None
                samples = [param.low, param.high] if param.kind is ParamKind.FLOAT else [int(param.low), int(param.high)]
            for sample in samples:
                value = param.value(sample)
                where = f"--search {key}={param.spec}: value {value!r}"
                if key in ("layers", "positions"):
                    upper = n_states if key == "layers" else n_positions
                    try:
                        parse_index_spec(str(value), upper)
                    except ValueError as error:
                        raise ConfigError(f"{where}: {error}") from None
                if key == "split_width" and float(value) <= 0:
                    raise ConfigError(f"{where}: split_width must be positive")
                apply_overrides(base, self.overrides({key: sample}, n_positions), where)


def family_split(peak: float, width: float, n_positions: int) -> str:
    """The ``weighted:...`` split of the split family (see the module docstring)."""
    if width <= 0 or not math.isfinite(width) or not math.isfinite(peak):
        raise ConfigError(f"split_width must be positive and split_peak finite, got {width:g} and {peak:g}")
    weights = [max(MIN_SPLIT_WEIGHT, math.exp(-((i - peak) ** 2) / (2 * width**2))) for i in range(n_positions)]
    return "weighted:" + ",".join(f"{weight:.3g}" for weight in weights)


def apply_overrides(base: ExperimentConfig, overrides: dict[str, Any], where: str = "search") -> ExperimentConfig:
    """The base experiment with dotted-key overrides applied, validated.

    Raises:
        ConfigError: the result is not a valid experiment (prefixed with ``where``).
    """
    try:
        return ExperimentConfig.model_validate(set_dotted(base.model_dump(mode="json"), overrides))
    except ValidationError as error:
        raise ConfigError(f"{where}: {validation_message(error)}") from None


def default_space() -> SearchSpace:
    """What ``ctexp sweep`` searches when no space is given: learning rate, weight decay, batch size."""
    return SearchSpace(params={
        "train.lr": SearchParam(kind=ParamKind.FLOAT, low=1e-4, high=1e-2, log=True),
        "train.weight_decay": SearchParam(kind=ParamKind.FLOAT, low=1e-5, high=1e-1, log=True),
        "train.batch_size": SearchParam(kind=ParamKind.CHOICE, choices=[16, 32, 64, 128]),
    })


def build_space(table: dict[str, Any] | None, flags: list[str], source: str = "the config file") -> SearchSpace:
    """The search space of a ``[search]`` table and ``--search KEY=SPEC`` flags (a flag replaces the
    table's entry for its key); the default space when both are empty.

    Raises:
        ConfigError: an unknown key, a malformed spec, or a value of the wrong type.
    """
    params: dict[str, SearchParam] = {}
    for key, value in _flatten_table(table or {}, source).items():
        params[key] = _param(key, value, f"[search] {key} in {source}")
    for flag in flags:
        key, separator, spec = flag.partition("=")
        key = key.strip()
        if not separator or not key or not spec.strip():
            raise ConfigError(f"--search {flag!r} is not KEY=SPEC; e.g. --search train.lr=log:1e-4:1e-2")
        params[key] = _param(key, spec.strip(), f"--search {key}={spec.strip()}")
    if not params:
        return default_space()
    try:
        return SearchSpace(params=params)
    except ValidationError as error:
        raise ConfigError(f"search space: {validation_message(error).removeprefix('config: ')}") from None


def _flatten_table(table: dict[str, Any], source: str) -> dict[str, Any]:
    """``{"train": {"lr": ...}}`` -> ``{"train.lr": ...}``; other tables are named choices."""
    flat: dict[str, Any] = {}
    tables = search_tables()
    for key, value in table.items():
        if key in tables and isinstance(value, dict):
            for inner, spec in value.items():
                flat[f"{key}.{inner}"] = spec
        else:
            flat[key] = value
    return flat


def _param(key: str, value: Any, where: str) -> SearchParam:
    types = field_types()
    if key not in types:
        raise ConfigError(f"{where}: {key!r} cannot be searched; searchable keys: {', '.join(types)}")
    kind = types[key]
    try:
        if isinstance(value, str):
            param = _parse_spec(key, kind, value)
        elif isinstance(value, list):
            param = SearchParam(kind=ParamKind.CHOICE, choices=[_typed(kind, item) for item in value])
        elif isinstance(value, dict):
            param = SearchParam(kind=ParamKind.CHOICE, names=[str(name) for name in value],
                                choices=[_typed(kind, item) for item in value.values()])
        else:
            raise ValueError(  # noqa: TRY004 - every ValueError here becomes one ConfigError line below
                "give a spec string (log:1e-4:1e-2, choice:a,b), a list, or a table of NAME = VALUE"
            )
        _check_key_kind(key, param)
        return param
    except ValidationError as error:
        raise ConfigError(f"{where}: {validation_message(error).removeprefix('config: ')}") from None
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def _parse_spec(key: str, kind: type, spec: str) -> SearchParam:
    head, _, rest = spec.partition(":")
    head = head.strip().lower()
    if head == "choice":
        separator = "|" if "|" in rest else ","
        items = [item.strip() for item in rest.split(separator)]
        if not rest.strip() or any(not item for item in items):
            raise ValueError("choice needs values, e.g. choice:a,b or choice:a|b")
        named = [item.partition("=") for item in items]
        if any(sep for _, sep, _ in named):  # NAME=VALUE items; a bare item is named by itself
            return SearchParam(
                kind=ParamKind.CHOICE, names=[name.strip() if sep else name for name, sep, _ in named],
                choices=[_typed(kind, value.strip() if sep else name) for name, sep, value in named],
            )
        return SearchParam(kind=ParamKind.CHOICE, choices=[_typed(kind, item) for item in items])
    ranges = {"log": (ParamKind.FLOAT, True), "float": (ParamKind.FLOAT, False), "int": (ParamKind.INT, False),
              "logint": (ParamKind.INT, True)}
    if head not in ranges:
        raise ValueError(
            f"unknown spec {spec!r}; use log:LOW:HIGH, float:LOW:HIGH[:STEP], int:LOW:HIGH[:STEP], logint:LOW:HIGH "
            "or choice:A,B,C"
        )
    param_kind, log = ranges[head]
    parts = rest.split(":")
    if len(parts) not in (2, 3) or (log and len(parts) != 2):
        form = f"{head}:LOW:HIGH" if log else f"{head}:LOW:HIGH[:STEP]"
        raise ValueError(f"{spec!r} is not {form}")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        raise ValueError(f"{spec!r} holds something that is not a number") from None
    step = numbers[2] if len(numbers) == 3 else None
    return SearchParam(kind=param_kind, low=numbers[0], high=numbers[1], step=step, log=log)


def _typed(kind: type, value: Any) -> Scalar:
    """A choice value as the field's type: numbers for numeric fields, text otherwise."""
    if kind is str:
        if isinstance(value, (dict, list, bool)):
            raise ValueError(f"{value!r} is not a text value")
        return str(value)
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")  # noqa: TRY004 - the caller reports ValueErrors as config errors
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number") from None
    if kind is int:
        if number != int(number):
            raise ValueError(f"{value!r} is not a whole number")
        return int(number)
    return number


def _check_key_kind(key: str, param: SearchParam) -> None:
    types = field_types()
    kind = types.get(key)
    if kind is None:
        raise ValueError(f"{key!r} cannot be searched; searchable keys: {', '.join(types)}")
    if kind is str and param.kind is not ParamKind.CHOICE:
        raise ValueError(f"{key} takes a choice (choice:a,b), not a range")
    if kind is int and param.kind is ParamKind.FLOAT:
        raise ValueError(f"{key} is an integer; use int:LOW:HIGH, logint:LOW:HIGH or choice:a,b")


def _text(value: Scalar) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
