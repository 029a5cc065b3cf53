"""Resumable, memory-bounded store writing: shards in ``OUT.partial/``, then one streamed store.

Layout of the staging directory::

    OUT.partial/
      manifest.json            fingerprint, processing order, shard size, finished shards
      shard-00000.safetensors  "hidden": [n, states, T + 1, hidden] for the shard's problems, in order
      shard-00000.jsonl        those problems, with predicted/correct filled
      shard-00000.attention.safetensors   with ``--attention`` only: the shard's attention rows

Shard k holds the problems ``order[k * shard_size : (k + 1) * shard_size]``. A shard counts as done
only once the manifest lists it (the manifest is replaced atomically after the shard's files), so a
crash at any point loses at most the shard in progress. The finished store is streamed problem by
problem (in source order) from the memory-mapped shards into a temporary sibling of ``OUT`` and
renamed into place: memory stays bounded by one problem's states plus the head, and the store's
content hash is computed on the way, byte for byte as :func:`ctexp.data.store.content_hash` computes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from ctexp.data.problems import Problem
from ctexp.data.store import StoreMeta, atomic_directory, check_out
from ctexp.errors import StoreError
from ctexp.records import Record

PARTIAL_SUFFIX = ".partial"
MANIFEST = "manifest.json"
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def partial_path(out: Path) -> Path:
    """The staging directory of a store being written: ``OUT.partial`` beside it."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


class ShardRecord(Record):
    """One finished shard."""

    index: int
    count: int
    correct: int


class Manifest(Record):
    """The contents of ``manifest.json``."""

    format: Literal["ctexp-partial-store"] = "ctexp-partial-store"
    version: int = 1
    fingerprint: str
    shard_size: int
    order: list[int]
    finished: list[ShardRecord] = Field(default_factory=list)


class Staging:
    """A partial extraction on disk; see the module docstring for its layout."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @staticmethod
    def check(path: Path, fingerprint: str, force: bool) -> None:
        """Raise unless ``path`` is absent, empty, or a partial extraction that ``open`` may resume or replace.

        Raises:
            StoreError: ``path`` holds another extraction (and ``force`` is off), or something else.
        """
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            return
        manifest = _read_manifest(path)
        if manifest is None:
            raise StoreError(f"{path} exists but holds no partial extraction; remove it or choose another --out")
        if manifest.fingerprint != fingerprint and not force:
            raise StoreError(
                f"{path} holds an unfinished extraction with other settings or inputs; rerun with the same "
                "ones to resume it, or pass --force to discard it"
            )

    @classmethod
    def open(cls, path: Path, fingerprint: str, order: list[int], shard_size: int, force: bool) -> Staging:
        """Resume the partial extraction at ``path`` if it has this fingerprint, else start one.

        Raises:
            StoreError: As :meth:`check`, or ``path`` cannot be written.
        """
        cls.check(path, fingerprint, force)
        manifest = _read_manifest(path)
        if manifest is not None and manifest.fingerprint == fingerprint and manifest.order == order:
            return cls(path, manifest)
        staging = cls(path, Manifest(fingerprint=fingerprint, shard_size=shard_size, order=order))
        try:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
            staging._write_manifest()
        except OSError as error:
            raise StoreError(f"cannot write {path}: {error.strerror or error}") from None
        return staging

    @property
    def n_shards(self) -> int:
        return -(-len(self.manifest.order) // self.manifest.shard_size)

    @property
    def shards_done(self) -> int:
        return len(self.manifest.finished)

    @property
    def done(self) -> int:
        """Problems in finished shards."""
        return sum(record.count for record in self.manifest.finished)

    @property
    def correct(self) -> int:
        """Correctly answered problems in finished shards."""
        return sum(record.correct for record in self.manifest.finished)

    def pending(self) -> list[int]:
        """Indices of the shards still to do, in order."""
        finished = {record.index for record in self.manifest.finished}
        return [k for k in range(self.n_shards) if k not in finished]

    def shard_indices(self, shard: int) -> list[int]:
        """The problem indices (into the source's problems) of one shard, in processing order."""
        size = self.manifest.shard_size
        return self.manifest.order[shard * size : (shard + 1) * size]

    def commit(
        self,
        shard: int,
        hidden: torch.Tensor,
        problems: list[Problem],
        attention: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write one finished shard, then record it in the manifest.

        Args:
            shard: The shard index.
            hidden: ``(n, S, T+1, d)`` states of the shard's problems, in ``shard_indices`` order.
            problems: Those problems with their answers filled.
            attention: Tensors of the shard's attention rows (``ctexp.model.attention``), if recorded.
        """
        if len(problems) != len(self.shard_indices(shard)) or hidden.shape[0] != len(problems):
            raise ValueError(f"shard {shard} expects {len(self.shard_indices(shard))} problems")
        stem = self.path / f"shard-{shard:05d}"
        try:
            if attention is not None:  # before the manifest lists the shard, like its other files
                save_file({k: v.contiguous() for k, v in attention.items()}, f"{stem}.attention.safetensors.tmp")
                os.replace(f"{stem}.attention.safetensors.tmp", self.attention_file(shard))
            save_file({"hidden": hidden.contiguous()}, f"{stem}.safetensors.tmp")
            with open(f"{stem}.jsonl.tmp", "w", encoding="utf-8") as handle:
                handle.writelines(problem.model_dump_json() + "\n" for problem in problems)
            os.replace(f"{stem}.safetensors.tmp", f"{stem}.safetensors")
            os.replace(f"{stem}.jsonl.tmp", f"{stem}.jsonl")
            correct = sum(bool(problem.correct) for problem in problems)
            self.manifest.finished.append(ShardRecord(index=shard, count=len(problems), correct=correct))
            self._write_manifest()
        except OSError as error:
            raise StoreError(f"cannot write {stem}: {error.strerror or error}") from None

    def assemble(
        self,
        out: Path,
        meta: StoreMeta,
        head: dict[str, torch.Tensor],
        force: bool,
        finish: Callable[[Path, StoreMeta], None] | None = None,
    ) -> tuple[Path, StoreMeta]:
        """Stream the finished shards into the store at ``out`` (atomically), then remove the staging dir.

        Args:
            out: The store directory.
            meta: The store's meta, without content hash.
            head: ``norm.weight``, optional ``norm.bias``, ``unembed.weight``.
            force: Replace an existing store.
            finish: Called with the store's (temporary) directory and sealed meta before it is renamed into
                place, to add optional files (the attention file).

        Returns:
            The store's path and its meta with the content hash.

        Raises:
            StoreError: A shard is missing or corrupt, or the store cannot be written.
        """
        if self.pending():
            raise StoreError(f"{self.path} is missing shards {self.pending()}; rerun the extraction to finish them")
        check_out(out, force)
        with atomic_directory(out, "store") as target:
            sealed = self._write_store(target, meta, head)
            if finish is not None:
                finish(target, sealed)
        shutil.rmtree(self.path, ignore_errors=True)
        return out, sealed

    def _write_store(self, target: Path, meta: StoreMeta, head: dict[str, torch.Tensor]) -> StoreMeta:
        digest = hashlib.sha256()
        problems = self._problems()
        with ExitStack() as stack:
            shards = [
                stack.enter_context(safe_open(str(self._shard_file(k)), framework="pt")) for k in range(self.n_shards)
            ]
            first = shards[0].get_slice("hidden")
            row_shape, dtype = first.get_shape()[1:], _dtype_of(first.get_dtype())
            shape = (len(problems), *row_shape)
            expected = (meta.n_states, meta.n_positions + 1, meta.hidden)
            if tuple(row_shape) != expected:
                raise StoreError(
                    f"{self.path}: shards hold states of shape {tuple(row_shape)}, expected {expected}; "
                    "rerun with --force"
                )
            rows = _row_locations(self.manifest)
            _stream_hidden(
                target / "hidden.safetensors",
                shape,
                dtype,
                (shards[k].get_slice("hidden") for k, _ in rows),
                (row for _, row in rows),
                digest,
            )
        for name, tensor in sorted(head.items()):
            _digest_tensor(digest, name, tensor)
        save_file({k: v.contiguous() for k, v in head.items()}, str(target / "head.safetensors"))
        with (target / "problems.jsonl").open("w", encoding="utf-8") as handle:
            for problem in problems:
                line = problem.model_dump_json()
                digest.update(line.encode())
                handle.write(line + "\n")
        sealed = meta.model_copy(
            update={"content_hash": digest.hexdigest()[:16], "dtype": str(dtype).removeprefix("torch.")}
        )
        (target / "meta.json").write_text(sealed.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return sealed

    def _problems(self) -> list[Problem]:
        """Every problem, in source order, as the shards recorded them."""
        by_index: dict[int, Problem] = {}
        for shard in range(self.n_shards):
            path = self._shard_file(shard).with_suffix(".jsonl")
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
                recorded = [Problem.model_validate_json(line) for line in lines if line.strip()]
            except (OSError, ValidationError, UnicodeDecodeError) as error:
                raise StoreError(f"{path} is unreadable ({type(error).__name__}); rerun with --force") from None
            indices = self.shard_indices(shard)
            if len(recorded) != len(indices):
                raise StoreError(f"{path} holds {len(recorded)} problems, expected {len(indices)}; rerun with --force")
            by_index.update(zip(indices, recorded, strict=True))
        return [by_index[i] for i in range(len(self.manifest.order))]

    def attention_file(self, shard: int) -> Path:
        """Where a shard's attention rows are (whether or not they are there)."""
        return self.path / f"shard-{shard:05d}.attention.safetensors"

    def row_locations(self) -> list[tuple[int, int]]:
        """(shard, row) of every problem, in source order."""
        return _row_locations(self.manifest)

    def _shard_file(self, shard: int) -> Path:
        path = self.path / f"shard-{shard:05d}.safetensors"
        if not path.is_file():
            raise StoreError(f"{path} not found; the partial extraction is damaged, rerun with --force")
        return path

    def _write_manifest(self) -> None:
        temporary = self.path / (MANIFEST + ".tmp")
        temporary.write_text(self.manifest.model_dump_json() + "\n", encoding="utf-8")
        os.replace(temporary, self.path / MANIFEST)


def _read_manifest(path: Path) -> Manifest | None:
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        return Manifest.model_validate_json(file.read_bytes())
    except (OSError, ValidationError):
        return None


def _row_locations(manifest: Manifest) -> list[tuple[int, int]]:
    """(shard, row) of every problem, in source order."""
    locations: dict[int, tuple[int, int]] = {}
    size = manifest.shard_size
    for position, problem in enumerate(manifest.order):
        locations[problem] = (position // size, position % size)
    return [locations[i] for i in range(len(manifest.order))]


def _dtype_of(name: str) -> torch.dtype:
    for dtype, code in _SAFETENSORS_DTYPES.items():
        if code == name:
            return dtype
    raise StoreError(f"shards hold {name} states; expected one of {sorted(_SAFETENSORS_DTYPES.values())}")


def _digest_tensor(digest: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    """Feed one tensor to the hash as ``ctexp.data.store.content_hash`` does."""
    _digest_header(digest, name, tuple(tensor.shape), tensor.dtype)
    digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def _digest_header(digest: hashlib._Hash, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    digest.update(name.encode())
    digest.update(str(tuple(shape)).encode() + str(dtype).encode())


def _stream_hidden(path: Path, shape: tuple[int, ...], dtype: torch.dtype, slices, rows, digest: hashlib._Hash) -> None:
    """Write a one-tensor safetensors file ("hidden") row by row, hashing the bytes as they go."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = itemsize * int(torch.tensor(shape).prod())
    header = {"hidden": {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    _digest_header(digest, "hidden", shape, dtype)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for view, row in zip(slices, rows, strict=True):
            data = view[row : row + 1].contiguous().view(torch.uint8).numpy().tobytes()
            handle.write(data)
            digest.update(data)
