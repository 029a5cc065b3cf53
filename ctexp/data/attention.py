"""The attention file of an activation store: what bot and each thought attend to, per layer.

An optional file beside the store's hidden states (``load_store`` neither needs nor reads it)::

    STORE/attention.safetensors
      "weights"  [problems, L, T + 1, C]      mean over heads (mode ``mean``), float32
                 [problems, L, H, T + 1, C]   per head (mode ``heads``), in the extraction's dtype
      "tokens"   [problems, C] int64          the context's token ids; -1 for thoughts and padding
      "kinds"    [problems, C] int8           what each context slot is (``ContextKind``)
      metadata   format, version, mode, store_hash (the content hash of the store it belongs to)

Axes:
    * layer ``i`` (0..L-1) is the transformer block that writes hidden state ``i + 1``: its attention
      produced the store's layer ``i + 1``. Layer 0 of the store (the embeddings) has no attention. Reports
      name layers by the state they write, 1..L, as the store and lenses do.
    * rows 0..T-1 are the thoughts' queries, row T is bot's, as the store's position axis.
    * context slot ``c`` of problem p: its question tokens ``0..n_p - 1`` (BOS included, if the tokenizer
      adds one), bot at ``n_p``, thought ``j`` at ``n_p + 1 + j``, then padding up to C (the widest context).

Row ``t`` of a thought holds its weights over slots ``0..n_p + 1 + t`` (itself included), bot's over
``0..n_p``; every row sums to 1 over its context and is exactly 0 beyond it. ``load_attention`` checks all
of this against the store, so that a damaged or foreign file is one ``StoreError`` rather than a wrong
report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ctexp.data.sources.choices import AttentionMode, ContextKind
from ctexp.data.store import Store, StoreMeta, check_regular_file
from ctexp.errors import StoreError

ATTENTION_FILE = "attention.safetensors"
ATTENTION_FORMAT = "ctexp-attention"
ATTENTION_VERSION = "1"
# Eager attention returns bf16 weights in a bf16 extraction: each is rounded by up to 2^-9 of itself, so a
# row sums to 1 within ~0.2%. A wrong mask or a missing slot moves the sum far more than this.
ROW_SUM_TOLERANCE = 1e-2
NO_TOKEN = -1
_CHECK_CHUNK = 64  # problems checked at once: bounds the temporaries of a per-head file
_OPERATORS = frozenset("+-*/=×÷^<>")


QUESTION_KINDS = (ContextKind.START, ContextKind.NUMBER, ContextKind.OPERATOR, ContextKind.WORD)


def token_kind(text: str) -> ContextKind:
    """The kind of a question token from its text: a number, an operator, or another token.

    Examples: ``" 48"`` and ``"1,200"`` are numbers, ``" *"`` and ``"="`` operators, ``" apples"`` and
    ``"."`` other tokens.
    """
    stripped = text.strip()
    if any(ch.isdigit() for ch in stripped) and all(ch.isdigit() or ch in ",." for ch in stripped):
        return ContextKind.NUMBER
    if stripped and all(ch in _OPERATORS for ch in stripped):
        return ContextKind.OPERATOR
    return ContextKind.WORD


@dataclass(frozen=True)
class Attention:
    """A store's attention file in memory.

    Attributes:
        mode: ``mean`` or ``heads``.
        store_hash: The content hash of the store the weights belong to.
        weights: ``(P, L, T+1, C)`` or ``(P, L, H, T+1, C)``; see the module docstring for the axes.
        tokens: ``(P, C)`` int64 context token ids, ``NO_TOKEN`` for thoughts and padding.
        kinds: ``(P, C)`` int8 ``ContextKind`` values.
    """

    mode: AttentionMode
    store_hash: str
    weights: torch.Tensor
    tokens: torch.Tensor
    kinds: torch.Tensor
    path: Path | None = None

    @property
    def n_layers(self) -> int:
        return int(self.weights.shape[1])

    @property
    def n_heads(self) -> int | None:
        return int(self.weights.shape[2]) if self.mode is AttentionMode.HEADS else None

    @property
    def lengths(self) -> torch.Tensor:
        """``(P,)`` question lengths ``n_p``: the slot of each problem's bot."""
        return (self.kinds == ContextKind.BOT).to(torch.int64).argmax(dim=1)

    def head_mean(self) -> torch.Tensor:
        """``(P, L, T+1, C)`` float32 weights averaged over heads (the weights themselves in mode ``mean``)."""
        if self.mode is AttentionMode.MEAN:
            return self.weights.float()
        return self.weights.float().mean(dim=2)


def attention_path(store: Path) -> Path:
    """Where a store keeps its attention file."""
    return Path(store) / ATTENTION_FILE


def attention_metadata(mode: AttentionMode, store_hash: str) -> dict[str, str]:
    """The file's safetensors metadata."""
    return {"format": ATTENTION_FORMAT, "version": ATTENTION_VERSION, "mode": mode.value, "store_hash": store_hash}


def write_attention(attention: Attention, store: Path) -> Path:
    """Write a store's attention file (to a temporary sibling, then one rename).

    Raises:
        StoreError: The file cannot be written.
    """
    path = attention_path(store)
    temporary = path.with_name(path.name + ".tmp")
    tensors = {
        "weights": attention.weights.contiguous(),
        "tokens": attention.tokens.to(torch.int64).contiguous(),
        "kinds": attention.kinds.to(torch.int8).contiguous(),
    }
    try:
        save_file(tensors, str(temporary), metadata=attention_metadata(attention.mode, attention.store_hash))
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def load_attention(store: Store) -> Attention:
    """Read and check the attention file of a loaded store.

    Raises:
        StoreError: One line: the store has no attention file, or it is unreadable, of another store, or
            inconsistent (shapes, dtypes, context layout, non-finite or negative weights, weights outside a
            row's context, rows that do not sum to 1).
    """
    if store.path is None:
        raise StoreError("the store has no directory, so no attention file")
    path = attention_path(store.path)
    if not path.exists():
        raise StoreError(
            f"{store.path} has no {ATTENTION_FILE}; record it with 'ctexp extract --attention mean' (or heads)"
        )
    check_regular_file(path, "re-record the attention")
    metadata, tensors = _read(path)
    mode = _check_metadata(path, metadata, store.meta)
    for name in ("weights", "tokens", "kinds"):
        if name not in tensors:
            raise StoreError(f"{path} lacks tensor {name!r}; re-record the attention")
    unknown = sorted(set(tensors) - {"weights", "tokens", "kinds"})
    if unknown:
        raise StoreError(f"{path} holds unknown tensors {unknown}; an attention file holds weights, tokens, kinds")
    attention = Attention(mode, metadata["store_hash"], tensors["weights"], tensors["tokens"], tensors["kinds"], path)
    validate_attention(attention, store.meta)
    return attention


def validate_attention(attention: Attention, meta: StoreMeta) -> None:
    """Check an attention file against its store's meta.

    Raises:
        StoreError: The first inconsistency found, in one line.
    """
    where = attention.path or ATTENTION_FILE
    _check_shapes(attention, meta, where)
    lengths = _check_context(attention, meta.n_positions, where)
    weights = attention.weights
    for start in range(0, weights.shape[0], _CHECK_CHUNK):
        chunk = weights[start : start + _CHECK_CHUNK].float()
        if attention.mode is AttentionMode.MEAN:
            chunk = chunk.unsqueeze(2)  # (p, L, 1, T+1, C): one "head"
        inside = context_mask(lengths[start : start + _CHECK_CHUNK], meta.n_positions, weights.shape[-1])
        _check_rows(chunk, inside, start, where)


def context_mask(lengths: torch.Tensor, n_positions: int, width: int) -> torch.Tensor:
    """``(P, T+1, C)`` True where a row may attend: slots ``0..n + 1 + t`` for thought t, ``0..n`` for bot."""
    last = torch.arange(n_positions + 1)  # (T+1,): the last slot of each row, past the question's
    last = torch.where(last < n_positions, last + 1, torch.zeros_like(last))  # thought t: n + 1 + t; bot: n
    slots = torch.arange(width)  # (C,)
    return slots.view(1, 1, -1) <= (lengths.view(-1, 1, 1) + last.view(1, -1, 1))  # (P, T+1, C)


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return metadata, {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        first = str(error).splitlines()[0]
        raise StoreError(f"{path} is corrupt or truncated ({first}); re-record the attention") from None


def _check_metadata(path: Path, metadata: dict[str, str], meta: StoreMeta) -> AttentionMode:
    if metadata.get("format") != ATTENTION_FORMAT:
        raise StoreError(f"{path} is not a ctexp attention file (format {metadata.get('format')!r})")
    if metadata.get("version") != ATTENTION_VERSION:
        raise StoreError(
            f"{path} is attention format version {metadata.get('version')!r}; this ctexp reads version "
            f"{ATTENTION_VERSION}, re-record the attention"
        )
    try:
        mode = AttentionMode(metadata.get("mode", ""))
    except ValueError:
        raise StoreError(f"{path}: mode {metadata.get('mode')!r} is neither mean nor heads") from None
    if metadata.get("store_hash") != meta.content_hash:
        raise StoreError(
            f"{path} belongs to store {metadata.get('store_hash')!r}, not to this store ({meta.content_hash}); "
            "re-record the attention with this store"
        )
    return mode


def _check_shapes(attention: Attention, meta: StoreMeta, where: object) -> None:
    weights, tokens, kinds = attention.weights, attention.tokens, attention.kinds
    heads = attention.mode is AttentionMode.HEADS
    if weights.dim() != (5 if heads else 4) or not weights.is_floating_point():
        axes = "problems, layers, heads, positions + 1, context" if heads else "problems, layers, positions + 1, context"
        form = f"[{axes}]"
        raise StoreError(
            f"{where}: weights are {weights.dtype} {tuple(weights.shape)}; mode {attention.mode} stores {form} floats"
        )
    layers, width = meta.n_states - 1, weights.shape[-1]
    head_axis = (weights.shape[2],) if heads else ()
    expected = (meta.n_problems, layers, *head_axis, meta.n_positions + 1, width)
    if tuple(weights.shape) != expected or width < 1:
        raise StoreError(
            f"{where}: weights have shape {tuple(weights.shape)}, the store needs {expected} "
            f"({meta.n_problems} problems, {layers} layers, {meta.n_positions} positions + bot)"
        )
    for name, tensor, dtype in (("tokens", tokens, torch.int64), ("kinds", kinds, torch.int8)):
        if tensor.dtype != dtype or tuple(tensor.shape) != (meta.n_problems, width):
            raise StoreError(
                f"{where}: {name} are {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {(meta.n_problems, width)}"
            )


def _check_context(attention: Attention, n_positions: int, where: object) -> torch.Tensor:
    """Check every problem's context layout (question, bot, T thoughts, padding); return the question lengths."""
    kinds, tokens = attention.kinds.to(torch.int64), attention.tokens
    bots = (kinds == ContextKind.BOT).sum(dim=1)  # (P,)
    if bool((bots != 1).any()):
        problem = int((bots != 1).nonzero()[0, 0])
        raise StoreError(f"{where}: problem {problem} has {int(bots[problem])} bot slots in kinds, expected 1")
    lengths = attention.lengths  # (P,)
    slots = torch.arange(kinds.shape[1]).view(1, -1)  # (1, C)
    n = lengths.view(-1, 1)  # (P, 1)
    question = slots < n
    expected = torch.full_like(kinds, ContextKind.PAD)
    expected = torch.where(slots == n, int(ContextKind.BOT), expected)
    expected = torch.where((slots > n) & (slots <= n + n_positions), int(ContextKind.THOUGHT), expected)
    is_question_kind = (kinds >= ContextKind.START) & (kinds <= ContextKind.WORD)
    bad = torch.where(question, ~is_question_kind, kinds != expected)
    bad |= question & (tokens < 0)
    bad |= ~question & (slots != n) & (tokens != NO_TOKEN)
    if bool(bad.any()):
        problem, slot = (int(v) for v in bad.nonzero()[0])
        raise StoreError(
            f"{where}: problem {problem}, context slot {slot}: kind {int(kinds[problem, slot])} token "
            f"{int(tokens[problem, slot])} breaks the layout (question tokens, bot, {n_positions} thoughts, padding)"
        )
    if int(lengths.max()) + 1 + n_positions > kinds.shape[1]:
        raise StoreError(f"{where}: the context is narrower than the longest question + bot + {n_positions} thoughts")
    return lengths


def _check_rows(chunk: torch.Tensor, inside: torch.Tensor, offset: int, where: object) -> None:
    """``chunk`` is ``(p, L, H, T+1, C)`` float32, ``inside`` ``(p, T+1, C)``."""
    inside = inside[:, None, None]  # (p, 1, 1, T+1, C)
    problems = [
        ("weights that are NaN or infinite", ~torch.isfinite(chunk)),
        ("negative weights", chunk < 0),
        ("non-zero weights outside the row's causal context", ~inside & (chunk != 0)),
    ]
    for what, bad in problems:
        if bool(bad.any()):
            p, layer, head, row, slot = (int(v) for v in bad.nonzero()[0])
            raise StoreError(
                f"{where}: {what} (problem {offset + p}, layer {layer + 1}, {_row_name(row, chunk.shape[3])}, "
                f"slot {slot}); re-record the attention"
            )
    sums = chunk.sum(dim=-1)  # (p, L, H, T+1)
    off = (sums - 1).abs() > ROW_SUM_TOLERANCE
    if bool(off.any()):
        p, layer, head, row = (int(v) for v in off.nonzero()[0])
        total = float(sums[p, layer, head, row])
        raise StoreError(
            f"{where}: weights of problem {offset + p}, layer {layer + 1}, {_row_name(row, chunk.shape[3])} sum to "
            f"{total:.4g} over the context, not 1; re-record the attention"
        )


def _row_name(row: int, rows: int) -> str:
    return "bot" if row == rows - 1 else f"position {row}"

