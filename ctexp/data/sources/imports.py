"""``ctexp import``: hidden states recorded by other tools, as an activation store.

Input files
-----------

**Tensor file** (``.safetensors``, or a torch file, loaded with ``torch.load(weights_only=True)``):
a flat dict of four tensors with one row per recorded state::

    "hidden"    float32 / bfloat16 / float16 (float64 is cast to float32)   [N, d]
    "layer"     integer   [N]   hidden-state index 0..L, as transformers' hidden_states
                                (0 = embedding output, L = last block after the final norm)
    "position"  integer   [N]   continuous-thought position 0..T-1, or -1 for the bot state
    "problem"   integer   [N]   0-based index of the problem in the problems file

Every (problem, layer, position) cell with position 0..T-1 must be present exactly once, for every
problem and every layer 0..L (L = the largest layer given). Bot states (-1) are optional; missing
ones are stored as zeros (the lens never reads them). T is ``--positions`` or the largest
position + 1. Rows may come in any order.

**Head file** (same two formats): ``"norm.weight"`` [d], optional ``"norm.bias"`` [d] (a LayerNorm),
``"unembed.weight"`` [V, d]: the model's final norm and unembedding, as in a store's
``head.safetensors``. V must cover every id the tokenizer gives the CoTs.

**Problems**: a JSONL file of ctexp problem records (``id``, ``question``, ``steps``, ``answer``,
optional ``predicted`` and ``correct``; a store's ``problems.jsonl`` is one), or a problem file's
source spec ``gsm8k:PATH``, ``aug:PATH`` or ``hf:DIR`` (see ``ctexp.data.sources.spec``). Line i (blank lines skipped) is problem index i.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from ctexp.config import parse_index_spec
from ctexp.data.problems import Problem
from ctexp.data.sources.choices import NormKind
from ctexp.data.sources.spec import PROBLEM_FILES, RECORDS_FORM, SourceSpec, read_problems, source_forms
from ctexp.data.store import NormSpec, Store, StoreMeta, write_store
from ctexp.data.tokenizers import load_tokenizer
from ctexp.errors import ConfigError, SourceError, StoreError

TENSOR_KEYS = ("hidden", "layer", "position", "problem")
BOT = -1
_STORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ImportSpec:
    """What ``import_store`` reads and how the store is described.

    Attributes:
        tensors: The tensor file.
        head: The head file.
        problems: A problems JSONL path, or a ``gsm8k:``/``aug:``/``hf:`` source spec.
        tokenizer: Spec of the tokenizer the unembedding scores.
        model: What produced the states (meta.json's ``model``); default ``import:<tensor file>``.
        positions: T; default the largest position + 1.
        norm: Norm kind; default layernorm where the head has ``norm.bias``, else rmsnorm.
        norm_eps: The norm's epsilon.
        normed_states: ``last`` (default: the transformers convention), ``none``, or indices (``0-3,7``).
    """

    tensors: Path
    head: Path
    problems: str
    tokenizer: str
    model: str | None = None
    positions: int | None = None
    norm: NormKind | None = None
    norm_eps: float = 1e-5
    normed_states: str = "last"


def import_store(spec: ImportSpec, out: Path, force: bool = False) -> Path:
    """Build a store from a tensor file, a head file and problems, and write it atomically.

    Args:
        spec: The inputs and the store's description.
        out: The store directory.
        force: Replace an existing store.

    Returns:
        The store's path.

    Raises:
        StoreError: The tensor or head file is unreadable, misshapen, or leaves cells empty or doubled.
        SourceError: The problems cannot be read.
        TokenizerError: The tokenizer spec cannot be loaded.
        ConfigError: An option value is invalid.
    """
    tokenizer = load_tokenizer(spec.tokenizer)  # fail early on a bad spec
    problems = _read_problem_input(spec.problems)
    rows = read_tensor_file(spec.tensors, "tensor")
    head = read_tensor_file(spec.head, "head")
    hidden = dense_hidden(rows, len(problems), spec.positions, spec.tensors)  # (P, S, T+1, d)
    norm_weight, norm_bias, unembed = _head(head, hidden.shape[-1], spec.head)
    kind = spec.norm or (NormKind.LAYERNORM if norm_bias is not None else NormKind.RMSNORM)
    if kind is NormKind.LAYERNORM and norm_bias is None:
        norm_bias = torch.zeros_like(norm_weight)  # a LayerNorm without bias
    n_states = hidden.shape[1]
    meta = StoreMeta(
        model=spec.model or f"import:{spec.tensors.resolve()}",
        n_problems=len(problems),
        n_states=n_states,
        n_positions=hidden.shape[2] - 1,
        hidden=hidden.shape[3],
        vocab=unembed.shape[0],
        dtype=str(hidden.dtype).removeprefix("torch."),
        tokenizer=tokenizer.spec,
        norm=NormSpec(kind=kind.value, eps=spec.norm_eps),
        normed_states=_normed_states(spec.normed_states, n_states),
    )
    store = Store(meta, hidden, norm_weight, norm_bias if kind is NormKind.LAYERNORM else None, unembed, problems)
    return write_store(store, out, force=force)


def read_tensor_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Read a flat dict of tensors from a safetensors or torch file (``weights_only=True``).

    Raises:
        StoreError: Missing, unreadable, or not a dict of named tensors.
    """
    if not path.is_file():
        raise StoreError(f"{what} file {path} not found; pass a .safetensors or torch file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors: Any = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - safetensors and torch raise many types for bad files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StoreError(f"{what} file {path} cannot be read as plain tensors ({first})") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in tensors.items()):
        raise StoreError(f"{what} file {path} is not a flat dict of named tensors; see 'ctexp import --help'")
    return tensors


def dense_hidden(rows: dict[str, torch.Tensor], n_problems: int, positions: int | None, path: Path) -> torch.Tensor:
    """Place the rows of a tensor file into ``[problems, states, T + 1, d]`` (bot at index T).

    Raises:
        StoreError: Keys, shapes or dtypes are wrong, an index is out of range, or a cell is
            missing or given twice.
    """
    missing = [key for key in TENSOR_KEYS if key not in rows]
    if missing:
        raise StoreError(
            f"{path} lacks {', '.join(missing)}; it needs {', '.join(TENSOR_KEYS)} (see 'ctexp import --help')"
        )
    hidden = rows["hidden"]
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise StoreError(f"{path}: hidden must be a float [N, d] tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    if hidden.dtype not in _STORE_DTYPES:
        hidden = hidden.float()
    n = hidden.shape[0]
    index = {}
    for key in ("layer", "position", "problem"):
        column = rows[key]
        if column.dim() != 1 or column.shape[0] != n or column.is_floating_point() or column.dtype == torch.bool:
            raise StoreError(f"{path}: {key} must be an integer [{n}] tensor, got {column.dtype} {tuple(column.shape)}")
        index[key] = column.long()
    if n == 0:
        raise StoreError(f"{path} holds no states")
    layer, position, problem = index["layer"], index["position"], index["problem"]
    n_states = int(layer.max()) + 1
    n_positions = positions if positions is not None else int(position.max()) + 1
    _check_range(path, "layer", layer, 0, n_states)
    _check_range(path, "position", position, BOT, n_positions)
    _check_range(path, "problem", problem, 0, n_problems)
    slot = torch.where(position == BOT, n_positions, position)  # bot goes to index T
    flat = (problem * n_states + layer) * (n_positions + 1) + slot  # (N,)
    counts = torch.bincount(flat, minlength=n_problems * n_states * (n_positions + 1))
    _check_cells(path, counts.view(n_problems, n_states, n_positions + 1))
    dense = torch.zeros(n_problems * n_states * (n_positions + 1), hidden.shape[1], dtype=hidden.dtype)
    dense[flat] = hidden
    return dense.view(n_problems, n_states, n_positions + 1, hidden.shape[1])  # (P, S, T+1, d)


def _check_range(path: Path, key: str, values: torch.Tensor, low: int, high: int) -> None:
    bad = (values < low) | (values >= high)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise StoreError(f"{path}: row {row} has {key} {int(values[row])}, outside {low}..{high - 1}")


def _check_cells(path: Path, counts: torch.Tensor) -> None:
    """Every CT cell once; the bot column at most once."""
    doubled = (counts > 1).nonzero()
    if len(doubled):
        p, s, t = (int(v) for v in doubled[0])
        raise StoreError(
            f"{path} gives problem {p}, layer {s}, position {_position_name(t, counts)} "
            f"{int(counts[p, s, t])} times; give each cell once"
        )
    empty = (counts[:, :, :-1] == 0).nonzero()
    if len(empty):
        p, s, t = (int(v) for v in empty[0])
        raise StoreError(
            f"{path} has no state for problem {p}, layer {s}, position {t} ({len(empty)} cells empty); "
            "every problem needs every layer at every position"
        )


def _position_name(t: int, counts: torch.Tensor) -> str:
    return "bot" if t == counts.shape[2] - 1 else str(t)


def _head(
    head: dict[str, torch.Tensor], hidden: int, path: Path
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    for key in ("norm.weight", "unembed.weight"):
        if key not in head:
            raise StoreError(
                f"head file {path} lacks {key}; it needs norm.weight, unembed.weight and optionally norm.bias"
            )
    weight, bias, unembed = head["norm.weight"], head.get("norm.bias"), head["unembed.weight"]
    if unembed.dim() != 2 or unembed.shape[1] != hidden:
        raise StoreError(
            f"head file {path}: unembed.weight has shape {tuple(unembed.shape)}, expected [vocab, {hidden}]"
        )
    for name, vector in (("norm.weight", weight), ("norm.bias", bias)):
        if vector is not None and tuple(vector.shape) != (hidden,):
            raise StoreError(f"head file {path}: {name} has shape {tuple(vector.shape)}, expected ({hidden},)")
    return weight, bias, unembed


def _normed_states(text: str, n_states: int) -> list[int]:
    if text == "last":
        return [n_states - 1]
    if text == "none":
        return []
    try:
        indices = parse_index_spec(text, n_states)
    except ValueError as error:
        raise ConfigError(f"--normed-states: {error}; use last, none or indices like 0-3,7") from None
    return indices or []


def _read_problem_input(problems: str) -> list[Problem]:
    """A source spec, or a JSONL file of problem records."""
    if SourceSpec.names_a_kind(problems):
        return read_problems(SourceSpec.parse(problems, PROBLEM_FILES, RECORDS_FORM))
    path = Path(problems).expanduser()
    if not path.is_file():
        raise SourceError(f"problems file {path} not found; pass {source_forms(PROBLEM_FILES, RECORDS_FORM)}")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SourceError(f"{path} cannot be read ({error}); pass a UTF-8 JSONL file") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(Problem.model_validate_json(line))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "line"
            raise SourceError(f"{path}:{number}: not a problem record ({where}: {first['msg']})") from None
    if not records:
        raise SourceError(f"{path} holds no problems")
    return records
