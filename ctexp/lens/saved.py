"""A saved lens on disk: ``lens.safetensors`` (weights) and ``lens.json`` (what they mean).

``Lens.save`` and ``Lens.load`` (in ``ctexp.lens.kinds``) use this module; it knows the file format
and its checks, not the lens kinds. Every problem with a lens file is one ``StoreError`` line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ctexp.config import AdapterKind
from ctexp.errors import StoreError
from ctexp.records import Record

LENS_JSON, LENS_WEIGHTS = "lens.json", "lens.safetensors"


class LensSpec(Record):
    """What ``lens.json`` says: the lens's kind and shape, its layers, and what it was trained under.

    ``kind`` is a registered lens kind's name (a ``LensKind`` value for the built-in ones). ``layers``
    are the hidden-state indices of the lens's layer axis, in its order. ``config`` is the experiment
    config the lens was trained under (``ExperimentConfig`` as JSON); None in lens files written
    before it was recorded.
    """

    kind: str
    adapter: AdapterKind = AdapterKind.NONE
    rank: int = Field(4, ge=1)
    n_layers: int = Field(ge=1)
    n_positions: int = Field(ge=1)
    hidden: int = Field(ge=1)
    layers: list[int]
    config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _layers_fit(self) -> LensSpec:
        if len(self.layers) != self.n_layers:
            raise ValueError(f"{len(self.layers)} layers listed for n_layers={self.n_layers}")
        return self


def write_lens(directory: Path, spec: LensSpec, state: dict[str, torch.Tensor]) -> None:
    """Write the weights ``state`` and ``spec`` into the existing ``directory``.

    Raises:
        StoreError: the files cannot be written.
    """
    tensors = {name: value.detach().cpu().contiguous() for name, value in state.items()}
    try:
        save_file(tensors, str(directory / LENS_WEIGHTS))  # also for a lens without weights: one format
        (directory / LENS_JSON).write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise StoreError(f"cannot write the lens to {directory}: {error.strerror or error}") from None


def read_spec(directory: Path) -> LensSpec:
    """``directory/lens.json``, validated.

    Raises:
        StoreError: missing, unreadable, not JSON, or not a lens spec.
    """
    path = directory / LENS_JSON
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StoreError(f"no lens at {directory}: {LENS_JSON} not found") from None
    except OSError as error:
        raise StoreError(f"{path} is unreadable: {error.strerror or error}") from None
    try:
        return LensSpec.model_validate(json.loads(text))
    except json.JSONDecodeError as error:
        raise StoreError(f"{path} is not valid JSON: {error}") from None
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or LENS_JSON
        raise StoreError(f"{path}: {field}: {first['msg']}") from None


def read_weights(directory: Path, kind: str, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``directory/lens.safetensors``, checked to hold exactly the tensors of ``expected``, shapes included.

    Raises:
        StoreError: missing or corrupt file, other tensor names, or other shapes.
    """
    path = directory / LENS_WEIGHTS
    if not path.is_file():
        raise StoreError(f"{path} not found; the lens is incomplete")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise StoreError(f"{path} is corrupt or truncated ({str(error).splitlines()[0]})") from None
    if set(tensors) != set(expected):
        raise StoreError(f"{path}: tensors {sorted(tensors)} do not fit a {kind!r} lens, which has {sorted(expected)}")
    for name, want in expected.items():
        if tensors[name].shape != want.shape:
            raise StoreError(
                f"{path}: {name} has shape {tuple(tensors[name].shape)}, {LENS_JSON} implies {tuple(want.shape)}"
            )
    return tensors
