"""Experiment configuration: typed, validated, hashable.

An experiment is read from flags and/or a TOML file (flags win). Unknown keys are rejected so a typo
never falls back to a default silently. ``config_hash`` identifies what the experiment computes: it
covers every field except the run's name and device.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

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
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)


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

    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-3, ge=0, description="AdamW weight decay (pulls translators to identity)")
    batch_size: int = Field(32, ge=1, description="training states per optimiser step")
    epochs: int = Field(50, ge=1, description="maximum epochs")
    patience: int = Field(5, ge=1, description="epochs without validation-loss improvement before stopping")
    clip: float = Field(1.0, gt=0, description="gradient-norm clip")


class WorldConfig(_Strict):
    """Size and seed of the embedded synthetic world (used when no store is given)."""

    seed: int = Field(0, description="world seed (problems, model, planted truth)")
    problems: int = Field(600, ge=10, le=1_000_000)
    layers: int = Field(8, ge=1, le=256, description="transformer blocks; hidden states 0..layers are stored")
    hidden: int = Field(64, ge=8, le=16384)
    positions: int = Field(6, ge=1, le=64)
    noise: float = Field(1.0, ge=0, description="scale of isotropic noise relative to the signal")


class ExperimentConfig(_Strict):
    """One experiment: data, lens, alignment rules, layers and positions, training settings."""

    name: str | None = Field(None, description="run name (not part of the hash)")
    experiment: str = Field("default", min_length=1, description="experiment name grouping runs (not part of the hash)")
    store: str | None = Field(None, description="activation store directory; None: the embedded world")
    world: WorldConfig = Field(default_factory=WorldConfig)
    tokenizer: str | None = Field(None, description="CoT tokenizer spec; None: the store's own")
    lens: LensKind = LensKind.LAYER
    adapter: AdapterKind = AdapterKind.NONE
    adapter_rank: int = Field(4, ge=1, le=1024)
    split: SplitRule = Field(default_factory=SplitRule)
    empty: EmptyPolicy = EmptyPolicy.SKIP
    target: TargetRule = TargetRule.FIRST
    layers: str = Field("all", description="hidden-state indices: all, 15, 0-7,15")
    positions: str = Field("all", description="CT positions: all, 2-3, 0,5")
    subset: Subset = Subset.ALL
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    device: DeviceChoice = Field(DeviceChoice.AUTO, description="not part of the hash")
    train: TrainConfig = Field(default_factory=TrainConfig)

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
    for dotted, value in overrides.items():
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
