"""Recording attention in ``ctexp extract --attention``: a batch's weights as per-problem rows, the shards, the file.

``CodiModel.think(..., attention=True)`` returns each batch's weights over its left-padded sequence.
``ShardAttention`` turns them into per-problem rows whose context starts at the problem's first token
(see :mod:`ctexp.data.attention` for the layout) and collects a shard's worth for ``Staging.commit``;
``write_store_attention`` streams the shards' rows, in source order, into ``STORE/attention.safetensors``
while the store is assembled, so that memory stays bounded by one shard's rows and the file appears with
the store, atomically, or not at all.
"""

from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ctexp.data.attention import NO_TOKEN, AttentionMode, ContextKind, attention_metadata, attention_path, token_kind
from ctexp.data.store import StoreMeta
from ctexp.errors import StoreError
from ctexp.model.shards import Staging

_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.int8: "I8"}


def question_kinds(tokenizer: Any, prompts: list[list[int]]) -> list[list[ContextKind]]:
    """The kind of every question token: ``START`` for a leading BOS, else by the token's text.

    Args:
        tokenizer: The Hugging Face tokenizer that made the prompts.
        prompts: Question ids per problem.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    kinds: dict[int, ContextKind] = {}
    for ids in prompts:
        for token in ids:
            if token not in kinds:
                kinds[token] = token_kind(tokenizer.decode([token]))
    return [
        [ContextKind.START if j == 0 and token == bos else kinds[token] for j, token in enumerate(ids)]
        for ids in prompts
    ]


class ShardAttention:
    """One shard's attention rows, collected batch by batch."""

    def __init__(self, mode: AttentionMode, bot_id: int, n_positions: int) -> None:
        self.mode = mode
        self.bot_id = bot_id
        self.n_positions = n_positions
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, weights: torch.Tensor, prompts: list[list[int]], kinds: list[list[ContextKind]]) -> None:
        """Add one batch.

        Args:
            weights: ``(B, L, H, T+1, n+T)`` as ``CodiModel.think`` returns them (left-padded keys).
            prompts: The batch's question ids (without bot).
            kinds: Their tokens' kinds.
        """
        width = weights.shape[-1]
        n = width - self.n_positions  # the widest question + bot
        source = weights.float().mean(dim=2) if self.mode is AttentionMode.MEAN else weights  # (B, L, [H], T+1, W)
        rows = torch.zeros_like(source)
        tokens = torch.full((len(prompts), width), NO_TOKEN, dtype=torch.int64)  # (B, W)
        slots = torch.full((len(prompts), width), int(ContextKind.PAD), dtype=torch.int8)  # (B, W)
        for b, (ids, kind) in enumerate(zip(prompts, kinds, strict=True)):
            start = n - (len(ids) + 1)  # the row's left padding
            rows[b, ..., : width - start] = source[b, ..., start:]
            tokens[b, : len(ids) + 1] = torch.tensor([*ids, self.bot_id])
            context = [*kind, ContextKind.BOT, *[ContextKind.THOUGHT] * self.n_positions]
            slots[b, : len(context)] = torch.tensor([int(k) for k in context], dtype=torch.int8)
        self._batches.append((rows, tokens, slots))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The shard's rows, padded to its widest context: ``weights``, ``tokens``, ``kinds``."""
        width = max(batch[0].shape[-1] for batch in self._batches)
        return {
            name: torch.cat([_pad(batch[i], width, fill) for batch in self._batches])
            for i, (name, fill) in enumerate((("weights", 0), ("tokens", NO_TOKEN), ("kinds", int(ContextKind.PAD))))
        }


def write_store_attention(target: Path, meta: StoreMeta, staging: Staging, mode: AttentionMode) -> Path:
    """Stream every shard's attention rows, in source order, into ``target/attention.safetensors``.

    Args:
        target: The store's directory (while it is being assembled).
        meta: The store's sealed meta (its content hash ties the file to the store).
        staging: The finished partial extraction.
        mode: What the shards hold.

    Raises:
        StoreError: A shard's attention file is missing or does not fit the store.
    """
    with ExitStack() as stack:
        shards = [stack.enter_context(safe_open(str(_shard_file(staging, k)), framework="pt"))
                  for k in range(staging.n_shards)]
        views = [shard.get_slice("weights") for shard in shards]
        shapes = [tuple(view.get_shape()) for view in views]
        width = max(shape[-1] for shape in shapes)
        row_shape = _row_shape(shapes, meta, mode, staging.path)
        dtype = _dtype(views[0].get_dtype())
        locations = staging.row_locations()
        tokens = torch.cat([_pad(shard.get_tensor("tokens"), width, NO_TOKEN) for shard in shards])  # (P, C)
        kinds = torch.cat([_pad(shard.get_tensor("kinds"), width, int(ContextKind.PAD)) for shard in shards])
        order = _source_order(locations, staging.manifest.shard_size)
        rows = (_pad(views[k][row : row + 1], width, 0) for k, row in locations)
        path = attention_path(target)
        _stream(path, tokens[order], kinds[order], (len(locations), *row_shape, width), dtype, rows,
                attention_metadata(mode, meta.content_hash))
    return path


def _pad(tensor: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    """Pad the last axis to ``width`` with ``fill``."""
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1]), value=fill)


def _shard_file(staging: Staging, shard: int) -> Path:
    path = staging.attention_file(shard)
    if not path.is_file():
        raise StoreError(
            f"{path} not found: the partial extraction was made without --attention; rerun with --force"
        )
    return path


def _row_shape(
    shapes: list[tuple[int, ...]], meta: StoreMeta, mode: AttentionMode, where: Path
) -> tuple[int, ...]:
    """One problem's weight shape without the context axis: ``(L, T+1)`` or ``(L, H, T+1)``."""
    rows = {shape[1:-1] for shape in shapes}
    first = next(iter(rows))
    heads = mode is AttentionMode.HEADS
    fits = len(rows) == 1 and len(first) == (3 if heads else 2)
    if not fits or first[0] != meta.n_states - 1 or first[-1] != meta.n_positions + 1:
        raise StoreError(f"{where}: the shards hold attention rows of shapes {sorted(rows)}; rerun with --force")
    return first


def _dtype(code: str) -> torch.dtype:
    for dtype, name in _CODES.items():
        if name == code:
            return dtype
    raise StoreError(f"shards hold {code} attention weights; expected F32, BF16 or F16")


def _source_order(locations: list[tuple[int, int]], shard_size: int) -> torch.Tensor:
    """Indices into the shards' concatenated rows, in source order."""
    return torch.tensor([shard * shard_size + row for shard, row in locations], dtype=torch.long)


def _stream(path: Path, tokens: torch.Tensor, kinds: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
            rows: Any, metadata: dict[str, str]) -> None:
    """Write the attention safetensors file with the weights written row by row.

    Tensors are laid out by falling item size (tokens int64, weights, kinds int8), so that each starts at an
    offset aligned to its items.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights_bytes = itemsize * int(torch.tensor(shape).prod())
    sizes = {"tokens": tokens.numel() * 8, "weights": weights_bytes, "kinds": kinds.numel()}
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor_shape, code in (("tokens", tokens.shape, "I64"), ("weights", shape, _CODES[dtype]),
                                     ("kinds", kinds.shape, "I8")):
        header[name] = {"dtype": code, "shape": list(tensor_shape), "data_offsets": [offset, offset + sizes[name]]}
        offset += sizes[name]
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        handle.write(_bytes(tokens))
        for row in rows:
            handle.write(_bytes(row.to(dtype)))
        handle.write(_bytes(kinds))


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()
