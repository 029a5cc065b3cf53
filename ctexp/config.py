"""Experiment configuration: typed, validated, hashable.

An experiment is read from flags and/or a TOML file (flags win). Unknown keys are rejected so a typo
never falls back to a default silently. ``config_hash`` identifies what the experiment computes: it
covers every field except the run's name and device.

Each field is declared once, here: ``setting`` and ``table`` attach what the command line and the
sweep need to the pydantic field (its help is the description, its default shown in ``--help`` is
the field's own, whether ``ctexp run``/``ctexp sweep`` take it as a flag, whether a sweep may search
it), and ``config_fields`` lists the experiment's leaf fields with that metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ctexp.errors import ConfigError


class LensKind(StrEnum):
    """Which axes the lens's translators are indexed by."""

    IDENTITY = "identity"  # logit lens: nothing trained
    LAYER = "layer"  # one translator per layer, shared across positions (the reference)
    LAYER_POSITION = "layer-position"  # one per (layer, position) cell
    POSITION = "position"  # one per position, shared across layers
    GLOBAL = "global"  # one translator for every cell


class AdapterKind(StrEnum):
    """Position context for lenses that share translators across positions."""

    NONE = "none"
    BIAS = "bias"  # a learned per-position bias
    LOWRANK = "lowrank"  # a learned per-position low-rank delta h -> h + (h U_p) V_p


class TargetRule(StrEnum):
    """Which of a position's assigned CoT tokens it must predict."""

    FIRST = "first"
    MIDDLE = "middle"
    LAST = "last"
    INFORMATIVE = "informative"  # highest IDF over the training problems' CoT tokens
    ALL = "all"  # every assigned token: mean cross-entropy, top-k hit if any is in the top k


class EmptyPolicy(StrEnum):
    """What happens to a position whose slice holds no token."""

    SKIP = "skip"  # the (problem, position) sample is dropped
    NEAREST = "nearest"  # it takes the tokens of the nearest non-empty position (ties: earlier)


class DeviceChoice(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Subset(StrEnum):
    """Which problems to use, by whether the model answered them correctly (real stores only)."""

    ALL = "all"
    CORRECT = "correct"
    INCORRECT = "incorrect"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False, defer_build=True)


# The metadata ``setting`` and ``table`` keep in a field's json_schema_extra (``config_fields`` reads it).
_FLAG, _SEARCHABLE, _UNSET = "flag", "searchable", "unset"
_FLAG_PREFIX, _HELP_PREFIX = "flag_prefix", "help_prefix"


def setting(
    default: Any = PydanticUndefined,
    *,
    description: str,
    flag: bool = True,
    searchable: bool = False,
    unset: str | None = None,
    **constraints: Any,
) -> Any:
    """A leaf field of the experiment: a pydantic ``Field`` that also says how the CLI and the sweep see it.

    Args:
        default: The default (or pass ``default_factory``).
        description: What the field is, written as its flag's help (the default is appended there).
        flag: Whether ``ctexp run`` and ``ctexp sweep`` take it as a flag (named from the field's key).
        searchable: Whether a sweep may search it: only fields that keep the activation store and the
            data split fixed.
        unset: What None means, shown as the default of a field whose default is None.
        constraints: Further ``Field`` arguments (``ge``, ``default_factory``, ...).
    """
    extra = {_FLAG: flag, _SEARCHABLE: searchable, _UNSET: unset}
    return Field(default, description=description, json_schema_extra=extra, **constraints)


def table(model: type[BaseModel], *, description: str, flag_prefix: str, help_prefix: str = "") -> Any:
    """A nested table of the experiment (``[train]``): its fields are flags named ``flag_prefix + field``."""
    extra = {_FLAG_PREFIX: flag_prefix, _HELP_PREFIX: help_prefix}
    return Field(default_factory=model, description=description, json_schema_extra=extra)


class SplitRule(_Strict):
    """How a problem's N CoT tokens are assigned to the T positions, as contiguous slices in order.

    ``uniform``: position i gets ``[i*N//T : (i+1)*N//T]``, exactly the reference's formula.
    ``weighted:w0,...,w{T-1}``: position i gets a slice of size ``n_i`` where ``n_i`` are the
    largest-remainder apportionment of N to quotas ``N*w_i/sum(w)``: each gets ``floor(quota)``, the
    leftover tokens go one each to the largest fractional remainders (ties to the earlier position).
    """

    kind: str = "uniform"
    weights: tuple[float, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_split(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> SplitRule:
        if self.kind == "uniform":
            if self.weights is not None:
                raise ValueError("split 'uniform' takes no weights")
        elif self.kind == "weighted":
            if not self.weights:
                raise ValueError("split 'weighted' needs weights, e.g. weighted:0.5,1,2,2,1,0.5")
            if any(not math.isfinite(w) or w < 0 for w in self.weights):
                raise ValueError(f"split weights must be finite and >= 0, got {format_weights(self.weights)}")
            if sum(self.weights) <= 0:
                raise ValueError("split weights must not all be zero")
        else:
            raise ValueError(f"unknown split {self.kind!r}; use 'uniform' or 'weighted:w0,...,w5'")
        return self

    @model_serializer
    def _to_string(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return "uniform" if self.weights is None else f"weighted:{format_weights(self.weights)}"


def format_weights(weights: tuple[float, ...]) -> str:
    return ",".join(f"{w:g}" for w in weights)


def parse_split(text: str) -> dict[str, Any]:
    """Parse ``uniform`` or ``weighted:w0,...`` into SplitRule fields (pydantic validates the rest)."""
    text = text.strip()
    if text == "uniform":
        return {"kind": "uniform"}
    if text.startswith("weighted:"):
        try:
            weights = tuple(float(part) for part in text.removeprefix("weighted:").split(","))
        except ValueError:
            raise ValueError(f"split weights must be numbers, got {text!r}; e.g. weighted:0.5,1,2,2,1,0.5") from None
        return {"kind": "weighted", "weights": weights}
    raise ValueError(f"unknown split {text!r}; use 'uniform' or 'weighted:w0,...,w5'")


class TrainConfig(_Strict):
    """The optimiser and stopping settings; defaults are the reference experiment's."""

    lr: float = setting(1e-3, gt=0, searchable=True, description="AdamW learning rate")
    weight_decay: float = setting(
        1e-3, ge=0, searchable=True, description="AdamW weight decay (pulls translators towards the identity)"
    )
    batch_size: int = setting(32, ge=1, searchable=True, description="Training states per optimiser step")
    epochs: int = setting(50, ge=1, searchable=True, description="Maximum epochs")
    patience: int = setting(
        5, ge=1, searchable=True, description="Epochs without validation-loss improvement before stopping"
    )
    clip: float = setting(1.0, gt=0, searchable=True, description="Gradient-norm clip")


class WorldConfig(_Strict):
    """Size and seed of the embedded synthetic world (used when no store is given)."""

    seed: int = setting(0, description="seed (problems, model, planted truth)")
    problems: int = setting(600, ge=10, le=1_000_000, description="number of problems")
    layers: int = setting(8, ge=1, le=256, description="transformer blocks (hidden states 0..layers are stored)")
    hidden: int = setting(64, ge=8, le=16384, description="hidden size")
    positions: int = setting(6, ge=1, le=64, description="continuous-thought positions")
    noise: float = setting(1.0, ge=0, description="scale of isotropic noise relative to the signal")


# Searchable fields keep the activation store fixed (a sweep worker loads it once) and the data split
# too (trials must be compared on the same validation set); name, experiment and device change nothing.
class ExperimentConfig(_Strict):
    """One experiment: data, lens, alignment rules, layers and positions, training settings."""

    name: str | None = setting(None, unset="LENS-TARGET-RUNID", description="Run name (not part of the hash)")
    experiment: str = setting(
        "default", min_length=1, description="Experiment name grouping runs (not part of the hash)"
    )
    store: str | None = setting(None, unset="the embedded world", description="Activation store directory")
    world: WorldConfig = table(
        WorldConfig, flag_prefix="world_", help_prefix="Embedded world: ",
        description="The embedded synthetic world, used when no store is given",
    )
    tokenizer: str | None = setting(
        None, unset="the store's", description="CoT tokenizer: builtin, tiktoken:NAME, hf:PATH"
    )
    lens: LensKind = setting(
        LensKind.LAYER, searchable=True, description="Translators: identity, layer, layer-position, position, global"
    )
    adapter: AdapterKind = setting(
        AdapterKind.NONE, searchable=True, description="Position context for shared lenses: none, bias, lowrank"
    )
    adapter_rank: int = setting(4, ge=1, le=1024, searchable=True, description="Rank of the lowrank adapter")
    split: SplitRule = setting(
        default_factory=SplitRule, searchable=True, description="uniform, or weighted:w0,...,w5 (largest remainder)"
    )
    empty: EmptyPolicy = setting(
        EmptyPolicy.SKIP, searchable=True, description="Positions with no token: skip or nearest"
    )
    target: TargetRule = setting(
        TargetRule.FIRST, searchable=True,
        description="Which assigned CoT tokens a position predicts: first, middle, last, informative or all",
    )
    layers: str = setting("all", searchable=True, description="Hidden-state indices: all, 15, 0-7,15")
    positions: str = setting("all", searchable=True, description="CT positions: all, 2-3, 0,5")
    subset: Subset = setting(
        Subset.ALL, searchable=True, description="Problems by answer correctness: all, correct, incorrect"
    )
    val_fraction: float = setting(0.1, gt=0, lt=1, description="Share of problems for validation")
    test_fraction: float = setting(0.2, gt=0, lt=1, description="Share of problems for test")
    seed: int = setting(0, description="Seed for splits, initialisation and batches")
    device: DeviceChoice = setting(DeviceChoice.AUTO, description="auto, cpu or cuda (not part of the hash)")
    train: TrainConfig = table(TrainConfig, flag_prefix="", description="Optimiser and stopping settings")

    @field_validator("layers", "positions")
    @classmethod
    def _check_index_spec(cls, value: str) -> str:
        parse_index_spec(value, upper=None)
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> ExperimentConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% of problems for training")
        if self.adapter is not AdapterKind.NONE and self.lens not in (LensKind.LAYER, LensKind.GLOBAL):
            raise ValueError(
                f"adapter {self.adapter.value!r} is for lenses shared across positions (layer, global), "
                f"not {self.lens.value!r}"
            )
        return self

    def config_hash(self) -> str:
        """A stable content hash of what this experiment computes (name, experiment and device excluded)."""
        payload = self.model_dump(mode="json", exclude={"name", "experiment", "device"})
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ConfigField:
    """One leaf field of the experiment, as the command line and the sweep see it.

    Attributes:
        key: The dotted config key (``train.lr``), as TOML tables and ``--search`` write it.
        flag: The flag's parameter name (``world_problems`` is ``--world-problems``); None: no flag.
        type: What a flag's value is: ``int``, ``float``, ``str`` or the field's ``StrEnum`` (fields
            typed by a model, such as the split rule, are read from text).
        description: What the field is.
        default: The model's default.
        unset: What a None default means, if the field has one.
        searchable: Whether a sweep may search it.
    """

    key: str
    flag: str | None
    type: type
    description: str
    default: Any
    unset: str | None
    searchable: bool

    @property
    def shown_default(self) -> str:
        """The default as ``--help`` shows it: ``0.001``, ``layer``, ``uniform``, ``the embedded world``."""
        if self.default is None:
            return self.unset or "none"
        return str(self.default.value if isinstance(self.default, Enum) else self.default)

    @property
    def help(self) -> str:
        """The flag's help: the description and the default, ``AdamW learning rate [0.001].``."""
        return f"{self.description} [{self.shown_default}]."


def config_fields(model: type[BaseModel] = ExperimentConfig) -> tuple[ConfigField, ...]:
    """Every leaf field of ``model`` (tables descended into), in declaration order.

    Raises:
        TypeError: a field is declared without ``setting`` or ``table``.
    """
    return tuple(_leaf_fields(model, key_prefix="", flag_prefix="", help_prefix=""))


def _leaf_fields(model: type[BaseModel], key_prefix: str, flag_prefix: str, help_prefix: str) -> Iterator[ConfigField]:
    for name, info in model.model_fields.items():
        key = key_prefix + name
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if _FLAG_PREFIX in extra:
            yield from _leaf_fields(
                _value_type(info), f"{key}.", flag_prefix + str(extra[_FLAG_PREFIX]),
                help_prefix + str(extra[_HELP_PREFIX]),
            )
            continue
        if _FLAG not in extra or info.description is None:
            raise TypeError(f"config field {key} is declared without setting() or table()")
        value_type = _value_type(info)
        yield ConfigField(
            key=key,
            flag=flag_prefix + name if extra[_FLAG] else None,
            type=str if issubclass(value_type, BaseModel) else value_type,
            description=help_prefix + info.description,
            default=info.get_default(call_default_factory=True),
            unset=extra[_UNSET],  # type: ignore[arg-type]
            searchable=bool(extra[_SEARCHABLE]),
        )


def _value_type(info: FieldInfo) -> type:
    """The field's type without its ``| None``."""
    annotation = info.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [arg for arg in get_args(annotation) if arg is not type(None)]
    assert isinstance(annotation, type), annotation
    return annotation


def set_dotted(data: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``train.lr``) in nested dicts, in place, creating tables as needed; returns ``data``.

    None values are skipped: they are flags that were not given.

    Raises:
        ConfigError: a key's parent holds a value, not a table (``train = 1`` and ``train.lr``).
    """
    for dotted, value in values.items():
        if value is None:
            continue
        target = data
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = target.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {parent!r} must be a table")
            target = node
        target[leaf] = value
    return data


def parse_index_spec(spec: str, upper: int | None) -> list[int] | None:
    """Parse ``all`` / ``15`` / ``0-7,15`` into sorted unique indices below ``upper``.

    Returns None for ``all`` when ``upper`` is None (resolved later against the store).

    Raises:
        ValueError: on malformed text, reversed ranges, or indices outside ``[0, upper)``.
    """
    text = spec.strip()
    if text == "all":
        return None if upper is None else list(range(upper))
    indices: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low_text, high_text = part.split("-", 1)
                low, high = int(low_text), int(high_text)
                if low > high:
                    raise ValueError(f"range {part!r} is reversed; write it low-high")
                indices.update(range(low, high + 1))
            else:
                indices.add(int(part))
        except ValueError as error:
            if "reversed" in str(error):
                raise
            raise ValueError(f"cannot read {spec!r}; use 'all', '15' or '0-7,15'") from None
    if not indices:
        raise ValueError(f"{spec!r} selects nothing")
    if min(indices) < 0:
        raise ValueError(f"{spec!r} has a negative index")
    if upper is not None and max(indices) >= upper:
        raise ValueError(f"{spec!r} goes beyond the available 0-{upper - 1}")
    return sorted(indices)


def validation_message(error: ValidationError) -> str:
    """One line from a pydantic error: the first problem, with its field path."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    extra = " (unknown key)" if first["type"] == "extra_forbidden" else ""
    return f"{where}: {message}{extra}"


def build_config(file: Path | None, overrides: dict[str, Any]) -> ExperimentConfig:
    """Merge a TOML file (if any) with flag overrides (flags win) and validate.

    Overrides use dotted keys for nested tables (``train.lr``); None values are ignored.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key or invalid value.
    """
    data: dict[str, Any] = read_toml(file) if file is not None else {}
    data.pop("search", None)  # a sweep's search space may share the file
    set_dotted(data, overrides)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        source = f" in {file}" if file is not None else ""
        raise ConfigError(f"invalid experiment{source}: {validation_message(error)}") from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file into a dict, turning every failure into one ConfigError line."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass an existing TOML file") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable; check its permissions") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; pass a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None


def to_toml(config: ExperimentConfig) -> str:
    """Write a config as TOML that ``build_config`` reads back to an equal config."""
    data = config.model_dump(mode="json", exclude_none=True)
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines = [f"{key} = {_toml_value(value)}" for key, value in scalars.items()]
    for table, values in tables.items():
        lines.append(f"\n[{table}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)
