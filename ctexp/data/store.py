"""The activation store: a directory holding a model's continuous-thought hidden states and its head.

Layout (format version 1)::

    STORE/
      meta.json            sizes, dtype, tokenizer spec, norm kind, normed states, content hash
      hidden.safetensors   "hidden": [problems, states, positions + 1, hidden]
      head.safetensors     "norm.weight" [hidden], optional "norm.bias" [hidden], "unembed.weight" [vocab, hidden]
      problems.jsonl       one Problem per line, in the order of the hidden tensor's first axis

Axis conventions:
    * state index i is transformers' ``hidden_states[i]``: 0 is the embedding output, ``states - 1``
      the last block's output, which transformers has already passed through the final norm
      (listed in ``normed_states``; the lens does not norm those again).
    * position index 0..T-1 is the continuous thought at that latent step; index T is the ``bot``
      token (the state before the first thought), kept for analysis but not one of the T positions.

Stores are written to a temporary sibling directory and renamed into place, so a reader never sees a
half-written store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ctexp.data.problems import Problem
from ctexp.errors import StoreError
from ctexp.records import Record

FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORE_FILES = ("meta.json", "hidden.safetensors", "head.safetensors", "problems.jsonl")

# meta.json is read in pydantic's strict mode (see ``_read_meta``): no "3" for 3, no true for 1, no 2.0 for
# 2; and no NaN or infinity anywhere, since ``json`` accepts those literals and they would reach the lens.
_STRICT_NUMBERS = ConfigDict(extra="forbid", allow_inf_nan=False)


class NormSpec(Record):
    """The model's final norm: RMSNorm (LLaMA) or LayerNorm (GPT-2)."""

    model_config = _STRICT_NUMBERS

    kind: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    eps: float = Field(1e-5, gt=0, le=1, description="the norm's epsilon: a small positive number")


class StoreMeta(Record):
    """The contents of meta.json: one schema with types, ranges and the one format version this code reads."""

    model_config = _STRICT_NUMBERS

    format: Literal["ctexp-store"] = "ctexp-store"
    version: Literal[1] = FORMAT_VERSION
    model: str = Field(description="what produced the states: a checkpoint path or world:<params>")
    n_problems: int = Field(ge=1)
    n_states: int = Field(ge=1, description="hidden states per position: transformer layers + 1")
    n_positions: int = Field(ge=1, description="continuous-thought positions T (the bot state is extra)")
    hidden: int = Field(ge=1)
    vocab: int = Field(ge=1)
    dtype: Literal["float32", "bfloat16", "float16"]
    tokenizer: str = Field(min_length=1, description="spec of the tokenizer whose ids the unembedding scores")
    norm: NormSpec = Field(default_factory=NormSpec)
    normed_states: list[int] = Field(description="state indices already passed through the final norm")
    content_hash: str = ""
    truth: dict | None = Field(None, description="planted truth, for synthetic worlds")


@dataclass(frozen=True)
class Store:
    """An activation store in memory (tensors may be memory-mapped views of the files)."""

    meta: StoreMeta
    hidden: torch.Tensor  # (P, S, T+1, d)
    norm_weight: torch.Tensor  # (d,)
    norm_bias: torch.Tensor | None  # (d,) for LayerNorm
    unembed: torch.Tensor  # (V, d)
    problems: list[Problem]
    path: Path | None = None

    @property
    def bot_index(self) -> int:
        return self.meta.n_positions


def content_hash(hidden: torch.Tensor, head: dict[str, torch.Tensor], problems: list[Problem]) -> str:
    """Hash of the tensors' bytes and the problems, independent of file layout."""
    digest = hashlib.sha256()
    for name, tensor in [("hidden", hidden), *sorted(head.items())]:
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    for problem in problems:
        digest.update(problem.model_dump_json().encode())
    return digest.hexdigest()[:16]


def head_tensors(store: Store) -> dict[str, torch.Tensor]:
    head = {"norm.weight": store.norm_weight, "unembed.weight": store.unembed}
    if store.norm_bias is not None:
        head["norm.bias"] = store.norm_bias
    return head


def seal(store: Store) -> Store:
    """Return the store with its content hash filled in."""
    digest = content_hash(store.hidden, head_tensors(store), store.problems)
    meta = store.meta.model_copy(update={"content_hash": digest})
    return Store(meta, store.hidden, store.norm_weight, store.norm_bias, store.unembed, store.problems, store.path)


def write_store(store: Store, out: Path, force: bool = False) -> Path:
    """Write a store atomically: everything goes to a temporary sibling, then one rename.

    Raises:
        StoreError: ``out`` exists (and ``force`` is off) or cannot be written.
    """
    out = Path(out).resolve()  # so that "." has a real name and parent
    check_out(out, force)
    sealed = seal(store)
    with atomic_directory(out, "store") as staging:
        save_file({"hidden": sealed.hidden.contiguous()}, str(staging / "hidden.safetensors"))
        save_file({k: v.contiguous() for k, v in head_tensors(sealed).items()}, str(staging / "head.safetensors"))
        with (staging / "problems.jsonl").open("w", encoding="utf-8") as handle:
            for problem in sealed.problems:
                handle.write(problem.model_dump_json() + "\n")
        (staging / "meta.json").write_text(sealed.meta.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return out


def check_out(out: Path, force: bool) -> None:
    """Refuse to overwrite anything but a store, and a store only with ``force``.

    Raises:
        StoreError: ``out`` exists and may not be replaced.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise StoreError(f"{out} already exists; choose another --out or pass --force to replace it")
        if not (out / "meta.json").is_file():
            raise StoreError(f"{out} is not an activation store; --force only replaces a store, choose another --out")


@contextlib.contextmanager
def atomic_directory(out: Path, what: str) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it replaces ``out`` in one rename.

    On any error (or interrupt) the temporary directory is removed and ``out`` is left as it was, so a
    reader never sees a half-written directory.

    Raises:
        StoreError: the directory cannot be created or written.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        apply_umask(staging)
    except OSError as error:
        raise StoreError(f"cannot write the {what} {out}: {error.strerror}") from None
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise StoreError(f"cannot write the {what} {out}: {error.strerror or error}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def apply_umask(directory: Path) -> None:
    """Give a ``mkdtemp`` directory (mode 0700) the permissions a plain ``mkdir`` would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)


def load_store(path: Path, check_finite: bool = True) -> Store:
    """Open a store, validating its shapes, dtypes and (by default) finiteness.

    Raises:
        StoreError: one line naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"store {path} not found; pass a directory written by 'ctexp world' or 'ctexp extract'")
    for name in STORE_FILES:  # before opening any: a FIFO or device would block a read forever
        check_regular_file(path / name, "the store is incomplete (re-create it)")
    meta = _read_meta(path / "meta.json")
    hidden = _read_tensors(path / "hidden.safetensors")
    head = _read_tensors(path / "head.safetensors")
    problems = _read_problems(path / "problems.jsonl")
    store = Store(
        meta=meta,
        hidden=_required(hidden, "hidden", path / "hidden.safetensors"),
        norm_weight=_required(head, "norm.weight", path / "head.safetensors"),
        norm_bias=head.get("norm.bias"),
        unembed=_required(head, "unembed.weight", path / "head.safetensors"),
        problems=problems,
        path=path,
    )
    validate_store(store, check_finite=check_finite)
    return store


def validate_store(store: Store, check_finite: bool = True) -> None:
    """Check that tensors, problems and meta agree.

    Raises:
        StoreError: the first inconsistency found.
    """
    meta = store.meta
    where = store.path or "store"
    expected = (meta.n_problems, meta.n_states, meta.n_positions + 1, meta.hidden)
    if tuple(store.hidden.shape) != expected:
        raise StoreError(f"{where}: hidden states have shape {tuple(store.hidden.shape)}, meta.json says {expected}")
    if str(store.hidden.dtype).removeprefix("torch.") != meta.dtype or meta.dtype not in _DTYPES:
        raise StoreError(f"{where}: hidden states are {store.hidden.dtype}, meta.json says {meta.dtype}")
    if tuple(store.unembed.shape) != (meta.vocab, meta.hidden):
        raise StoreError(
            f"{where}: unembedding has shape {tuple(store.unembed.shape)} but hidden size is {meta.hidden} "
            f"and vocab {meta.vocab}; the head does not belong to these states"
        )
    for name, vector in (("norm.weight", store.norm_weight), ("norm.bias", store.norm_bias)):
        if vector is not None and tuple(vector.shape) != (meta.hidden,):
            raise StoreError(f"{where}: {name} has shape {tuple(vector.shape)}, expected ({meta.hidden},)")
    if meta.norm.kind == "layernorm" and store.norm_bias is None:
        raise StoreError(f"{where}: a layernorm head needs norm.bias in head.safetensors")
    if len(store.problems) != meta.n_problems:
        raise StoreError(f"{where}: problems.jsonl has {len(store.problems)} problems, meta.json says {meta.n_problems}")
    if any(not 0 <= index < meta.n_states for index in meta.normed_states):
        raise StoreError(f"{where}: normed_states {meta.normed_states} outside 0-{meta.n_states - 1}")
    if len(set(meta.normed_states)) != len(meta.normed_states):
        raise StoreError(f"{where}: normed_states {meta.normed_states} lists a state twice")
    for name, tensor in head_tensors(store).items():
        if not tensor.is_floating_point():
            raise StoreError(f"{where}: {name} in head.safetensors is {tensor.dtype}, not a floating-point tensor")
    _check_unique_ids(store.problems, where)
    # The head is small and always checked; the states (large) only when asked.
    checked = [("norm.weight", store.norm_weight), ("norm.bias", store.norm_bias), ("unembedding", store.unembed)]
    if check_finite:
        checked.insert(0, ("hidden states", store.hidden))
    for name, tensor in checked:
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise StoreError(f"{where}: {name} contain NaN or infinite values; re-extract the store")


def check_regular_file(path: Path, missing_hint: str) -> None:
    """Refuse anything but a regular file (or a link to one) without opening it.

    Opening a FIFO blocks until a writer appears, and a device or socket is no store file either.

    Raises:
        StoreError: ``path`` is missing (with ``missing_hint``) or not a regular file.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise StoreError(f"{path} not found; {missing_hint}") from None
    except OSError as error:
        raise StoreError(f"{path} is unreadable: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise StoreError(f"{path} is {kind}, not a regular file; a store holds plain files (re-create it)")


def _check_unique_ids(problems: list[Problem], where: object) -> None:
    seen: set[str] = set()
    for problem in problems:
        if problem.id in seen:
            raise StoreError(f"{where}: problem id {problem.id!r} appears twice in problems.jsonl; ids must be unique")
        seen.add(problem.id)


def _read_meta(path: Path) -> StoreMeta:
    try:
        text = path.read_bytes()
    except OSError as error:
        raise StoreError(f"{path} is unreadable: {error.strerror or error}") from None
    try:
        return StoreMeta.model_validate_json(text, strict=True)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"].startswith("json_") or not first["loc"]:
            raise StoreError(f"{path} is unreadable: not a JSON object ({first['msg']}); re-create the store") from None
        field = ".".join(str(p) for p in first["loc"])
        hint = _META_HINTS.get(field, "re-create the store")
        raise StoreError(f"{path}: {field}: {first['msg'].replace('Input should be', 'should be')}; {hint}") from None


_META_HINTS = {
    "version": f"this ctexp reads store format {FORMAT_VERSION}; write the store again with this version",
    "norm.eps": "the norm's epsilon must be a small positive finite number, as in the model's config",
}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open handles are not dicts
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise StoreError(f"{path} is corrupt or truncated ({str(error).splitlines()[0]}); re-create the store") from None


def _required(tensors: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise StoreError(f"{path} lacks tensor {key!r}")
    return tensors[key]


def _read_problems(path: Path) -> list[Problem]:
    problems = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                problems.append(Problem.model_validate_json(line))
            except ValidationError as error:
                raise StoreError(f"{path}:{number}: not a problem record ({error.errors()[0]['msg']})") from None
    return problems
