"""The frozen head: the model's final norm and unembedding, and the loss kernels through it.

The loss against the frozen head (``head_loss_and_grad``) works through chunks of samples of bounded
size, so no ``[batch, L, vocab]`` logits tensor is held for a whole batch, and since the head is frozen
and each state's loss depends on its own row alone, it computes each state's gradient with respect to
the lens output while the logits are at hand: the unembedding products are done exactly twice per
step (logits, and gradient back to the input), the floor for this loss. ``head_cross_entropy`` is the
same loss as an autograd function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ctexp.data.store import NormSpec, Store
from ctexp.lens.scratch import Scratch


class Head(nn.Module):
    """The frozen final norm and unembedding; the norm is skipped for states that already had it."""

    def __init__(self, store: Store, layers: list[int]) -> None:
        super().__init__()
        self.norm_spec: NormSpec = store.meta.norm
        self.register_buffer("norm_weight", store.norm_weight.float().clone())  # (d,)
        bias = store.norm_bias.float().clone() if store.norm_bias is not None else torch.zeros_like(self.norm_weight)
        self.register_buffer("norm_bias", bias)  # (d,)
        self.register_buffer("unembed", store.unembed.float().clone())  # (V, d)
        needs = [layer not in store.meta.normed_states for layer in layers]
        self.register_buffer("needs_norm", torch.tensor(needs, dtype=torch.bool))  # (L,)
        self._norm_layers = "all" if all(needs) else "none" if not any(needs) else "some"

    @property
    def vocab(self) -> int:
        return int(self.unembed.shape[0])

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the final norm to the layers that need it. h: (B, L, d)."""
        return self.normalize_saving(h)[0]

    def normalize_saving(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``normalize(h)``, and what ``normalize_backward`` needs: the unit-scaled states and 1/rms."""
        if self._norm_layers == "none":
            return h, None
        if self.norm_spec.kind == "rmsnorm":
            inv = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.norm_spec.eps)
            unit = h * inv
            normed = unit * self.norm_weight
        else:
            centered = h - h.mean(-1, keepdim=True)
            inv = torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + self.norm_spec.eps)
            unit = centered * inv
            normed = unit * self.norm_weight + self.norm_bias
        if self._norm_layers == "some":
            normed = torch.where(self.needs_norm.view(1, -1, 1), normed, h)  # (B, L, d)
        return normed, (unit, inv)

    def normalize_backward(
        self, h: torch.Tensor, grad: torch.Tensor, saved: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The gradient with respect to ``h`` of ``(normalize(h) * grad).sum()``, without autograd.

        ``saved`` is the second value of ``normalize_saving(h)`` (recomputed when not given).
        """
        if self._norm_layers == "none":
            return grad
        unit, inv = saved if saved is not None else self.normalize_saving(h)[1]
        g = grad * self.norm_weight
        if self.norm_spec.kind == "layernorm":
            g = g - g.mean(-1, keepdim=True)
        grad_h = torch.addcmul(g, unit, (g * unit).mean(-1, keepdim=True), value=-1).mul_(inv)
        if self._norm_layers == "all":
            return grad_h
        return torch.where(self.needs_norm.view(1, -1, 1), grad_h, grad)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.normalize(h) @ self.unembed.T  # (B, L, V)

    def unembed_as(self, dtype: torch.dtype, transposed: bool = False) -> torch.Tensor:
        """The unembedding in ``dtype``, (V, d), or contiguous (d, V) with ``transposed``; cached.

        Converted once, not once per step. ``transposed`` serves the gradient product
        ``dlogits @ unembed`` computed as ``(unembed^T @ dlogits^T)^T``: measured 3x faster on CPU in
        bf16 (32 rows, reference shape, AMD Zen 4: 22 ms against 67 ms) and faster in fp32 too. The
        cache follows the buffer: a new device, a new tensor or an in-place change converts again.
        """
        if dtype == self.unembed.dtype and not transposed:
            return self.unembed
        key = (dtype, transposed, self.unembed.device, self.unembed.data_ptr(), self.unembed._version)
        slot = "_unembed_cast_t" if transposed else "_unembed_cast"
        cached = self.__dict__.get(slot)
        if cached is None or cached[0] != key:
            source = self.unembed.detach()
            cached = (key, (source.t() if transposed else source).to(dtype).contiguous())
            self.__dict__[slot] = None  # the old copy goes before the new one is made
            self.__dict__[slot] = cached
        return cached[1]


LOSS_CHUNK_ELEMENTS = 1 << 24  # at most this many [rows, vocab] logits at once in ``head_loss_and_grad`` (64 MiB fp32)
# From this many head elements (hidden x vocab) on, the loss keeps its temporaries in the step's
# ``Scratch`` and runs the gradient product on the transposed unembedding. Below, fresh small tensors
# and the direct product cost less: the default world's head (64 x 1,586) took 243 us a call that way
# against 310-340 us through the scratch and the transposed product.
LARGE_HEAD_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class LossTargets:
    """-1-padded targets (B, K) as ``head_loss_and_grad`` uses them, prepared once per split.

    ``weight`` is 1/n_valid on valid targets and 0 on padding, so that a sample's loss is the mean
    cross-entropy over its targets (as in ``scores``); ``has_target`` (B,) is None when every sample
    has a target (the usual case: it spares a multiplication per step).
    """

    index: torch.Tensor  # (B, K) target ids, padding clamped to 0
    weight: torch.Tensor  # (B, K) float32
    has_target: torch.Tensor | None  # (B,) float32

    @classmethod
    def of(cls, targets: torch.Tensor) -> LossTargets:
        valid = targets >= 0
        weight = valid.float()
        weight = weight / weight.sum(-1, keepdim=True).clamp(min=1)
        has_target = valid.any(-1)
        return cls(targets.clamp(min=0), weight, None if bool(has_target.all()) else has_target.float())

    def select(self, batch: torch.Tensor) -> LossTargets:
        """The targets of the samples ``batch`` (indices)."""
        has = None if self.has_target is None else self.has_target.index_select(0, batch)
        return LossTargets(self.index.index_select(0, batch), self.weight.index_select(0, batch), has)


def head_loss_and_grad(
    h: torch.Tensor,
    head: Head,
    targets: torch.Tensor | LossTargets,
    dtype: torch.dtype = torch.float32,
    mean: bool = False,
    need_grad: bool = True,
    chunk_elements: int = LOSS_CHUNK_ELEMENTS,
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy of translated states through the frozen head, and its gradient, in chunks.

    Per chunk of samples: the norm, logits in ``dtype``, ``log_softmax`` in float32 and the targets'
    log-probabilities; then, for the gradient, the softmax minus the weighted one-hot of the targets
    multiplied back through the unembedding (and, once, back through the norm). A state's loss
    depends on its own row alone and the head is frozen, so this is d(loss)/d(h) for every state,
    computed while the logits are at hand: the two unembedding products (logits, and gradient to the
    input) are the only large ones, and no ``[B, L, V]`` tensor for the whole batch is ever held
    (at most ``chunk_elements`` logits, at least one sample's). Nothing here synchronises with the device.

    Args:
        h: (B, L, d) lens outputs (before the final norm), float32.
        head: the frozen norm and unembedding.
        targets: (B, K) -1 padded (several targets: the mean of their cross-entropies), or the same
            prepared by ``LossTargets.of``.
        dtype: of the unembedding products: float32, or bfloat16 for speed; the softmax is float32.
        mean: return the mean over states (and its gradient) instead of per-state losses.
        need_grad: compute the gradient (else the second value is None).
        scratch: where the large temporaries live between calls (a training step passes its own);
            a fresh one when not given.

    Returns:
        loss, (B, L) or a scalar, float32; and d(loss.sum())/dh (B, L, d), float32, or None.
    """
    prepared = targets if isinstance(targets, LossTargets) else LossTargets.of(targets)
    scratch = scratch if scratch is not None else Scratch()
    if torch.is_grad_enabled():
        with torch.no_grad():
            return _head_loss_and_grad(h, head, prepared, dtype, mean, need_grad, chunk_elements, scratch)
    return _head_loss_and_grad(h, head, prepared, dtype, mean, need_grad, chunk_elements, scratch)


def _head_loss_and_grad(
    h: torch.Tensor, head: Head, prepared: LossTargets, dtype: torch.dtype, mean: bool, need_grad: bool,
    chunk_elements: int, scratch: Scratch,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``head_loss_and_grad`` with autograd off."""
    unembed = head.unembed_as(dtype)  # (V, d): the logits product
    large = unembed.numel() >= LARGE_HEAD_ELEMENTS
    unembed_t = head.unembed_as(dtype, transposed=True) if need_grad and large else None  # (d, V)
    batch, n_layers, hidden = h.shape
    chunk = max(1, chunk_elements // max(1, n_layers * unembed.shape[0]))
    x, saved = head.normalize_saving(h)
    rows = x.reshape(batch * n_layers, hidden)
    index = prepared.index.unsqueeze(1).expand(-1, n_layers, -1)  # (B, L, K)
    weight = prepared.weight.unsqueeze(1).expand(-1, n_layers, -1)  # (B, L, K)
    loss = h.new_empty(batch, n_layers, dtype=torch.float32)
    grad = h.new_empty(batch * n_layers, hidden, dtype=torch.float32) if need_grad else None

    def buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """Memory for a large temporary: the scratch's, reused, for a large head; else None (a new tensor)."""
        return scratch.take(name, shape, dtype, h.device) if large else None

    for start in range(0, batch, chunk):
        end = min(batch, start + chunk)
        n, whole = end - start, end - start == batch  # one chunk (the usual case): no slicing at all
        part = slice(start * n_layers, end * n_layers)
        chunk_rows = rows if whole else rows[part]
        shape = (n * n_layers, unembed.shape[0])
        logits = torch.mm(chunk_rows if dtype == chunk_rows.dtype else chunk_rows.to(dtype), unembed.t(),
                          out=buffer("logits", shape, dtype))
        idx, w = (index, weight) if whole else (index[start:end], weight[start:end])  # (n, L, K)
        picked = logits.view(n, n_layers, -1).gather(2, idx).float()  # the targets' logits
        # Softmax in float32 by hand, in place: exp(x - max), its sum, and the loss as logsumexp - logit;
        # one pass fewer than log_softmax then softmax. bf16 logits are cast first: a subtraction that
        # promotes bf16 - fp32 as it goes ran 30x slower than the cast and an in-place subtraction.
        top = logits.amax(-1, keepdim=True).float()
        probs = logits if dtype == torch.float32 else _cast(logits, torch.float32, buffer("probs", shape, torch.float32))
        probs.sub_(top).exp_()
        total = probs.sum(-1, keepdim=True)
        lse = (top + total.log()).view(n, n_layers, 1)
        torch.sum((lse - picked) * w, dim=-1, out=loss if whole else loss[start:end])
        if need_grad:
            dlogits = probs.div_(total).view(n, n_layers, -1)
            dlogits = dlogits.scatter_add_(2, idx, w.neg()).view(shape)  # softmax - targets
            if dtype != torch.float32:  # into the spent logits' memory where it is reused
                dlogits = _cast(dlogits, dtype, buffer("logits", shape, dtype))
            out = grad if whole else grad[part]
            if unembed_t is None:
                torch.mm(dlogits, unembed, out=out) if dtype == torch.float32 else out.copy_(dlogits @ unembed)
            else:  # dlogits @ unembed, as (unembed^T @ dlogits^T)^T: see Head.unembed_as
                out.copy_(torch.mm(unembed_t, dlogits.t(), out=buffer("grad_t", (hidden, shape[0]), dtype)).t())
    if need_grad:
        grad = grad.view(batch, n_layers, hidden)
        if prepared.has_target is not None:
            grad.mul_(prepared.has_target.view(-1, 1, 1))  # samples without a target: loss 0, no gradient
        if mean:
            grad.div_(batch * n_layers)
        grad = head.normalize_backward(h, grad, saved)
    return (loss.mean() if mean else loss), grad


def _cast(tensor: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """``tensor`` in ``dtype``: into ``out`` where given, else a new tensor."""
    return tensor.to(dtype) if out is None else out.copy_(tensor)


class _HeadLoss(torch.autograd.Function):
    """``head_loss_and_grad`` for autograd: forward saves only the (B, L, d) gradient; backward scales it.

    The alternatives were to save nothing and recompute the logits in backward (a third unembedding
    product per step) or to save the logits ([B, L, V] memory, which is what this avoids).
    """

    @staticmethod
    def forward(ctx, h, head, targets, dtype, mean, chunk_elements):
        loss, grad = head_loss_and_grad(h, head, targets, dtype, mean, ctx.needs_input_grad[0], chunk_elements)
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        scale = grad_loss if grad_loss.dim() == 0 else grad_loss.unsqueeze(-1)
        return grad * scale, None, None, None, None, None


def head_cross_entropy(
    h: torch.Tensor,
    head: Head,
    targets: torch.Tensor | LossTargets,
    dtype: torch.dtype = torch.float32,
    mean: bool = False,
    chunk_elements: int = LOSS_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``head_loss_and_grad``'s loss as an autograd function of ``h`` (the head gets no gradient).

    Equal (to rounding) to ``scores(head(h), targets)["loss"]`` in float32 (``.mean()`` of it with
    ``mean``), and never holding more than ``chunk_elements`` logits at once.
    """
    prepared = targets if isinstance(targets, LossTargets) else LossTargets.of(targets)
    return _HeadLoss.apply(h, head, prepared, dtype, mean, chunk_elements)


def scores(logits: torch.Tensor, targets: torch.Tensor, k: int = 10) -> dict[str, torch.Tensor]:
    """Per-state loss and top-k hits.

    For several targets the loss is the mean cross-entropy over them and a top-k hit means any of
    them is in the top k.

    Args:
        logits: (B, L, V).
        targets: (B, K), -1 padded.

    Returns:
        loss (B, L); hit1, hit5, hit10 (B, L) bool; top_ids, top_probs (B, L, k).
    """
    valid = targets >= 0  # (B, K)
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, L, V)
    index = targets.clamp(min=0).unsqueeze(1).expand(-1, logits.shape[1], -1)  # (B, L, K)
    target_lp = log_probs.gather(-1, index)  # (B, L, K)
    weight = valid.unsqueeze(1).float()
    loss = -(target_lp * weight).sum(-1) / weight.sum(-1).clamp(min=1)  # (B, L)
    top_lp, top_ids = log_probs.topk(k, dim=-1)  # (B, L, k)
    match = (top_ids.unsqueeze(2) == targets.view(targets.shape[0], 1, -1, 1)) & valid.view(valid.shape[0], 1, -1, 1)
    hit_at = match.any(2)  # (B, L, k): some target at rank j
    first_hit = torch.where(hit_at.any(-1), hit_at.float().argmax(-1), torch.full_like(loss, k, dtype=torch.long))
    return {
        "loss": loss,
        "hit1": first_hit < 1,
        "hit5": first_hit < 5,
        "hit10": first_hit < 10,
        "top_ids": top_ids,
        "top_probs": top_lp.exp(),
    }
