"""Position adapters: per-position context added to a lens whose translators are shared across positions.

An adapter is composed into a lens (``Lens(..., adapter=...)``), not a lens kind of its own: it adds
``delta(h, position)`` to the translator's output, so any kind not indexed by position can take one.
Each adapter brings its hand-written backward (``write_grads``), in the same style as the lens
kinds': batched products, per-position sums as one-hot matrix products, ``.grad`` buffers reused.
"""

from __future__ import annotations

import torch
from torch import nn

from ctexp.config import AdapterKind


class PositionAdapter(nn.Module):
    """A per-position term added to a lens's output. Subclasses: ``forward`` and ``write_grads``."""

    def forward(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The term to add. h: (B, L, d); position: (B,). Returns (B, L, d) or broadcastable (B, 1, d)."""
        raise NotImplementedError

    def write_grads(self, h: torch.Tensor, position: torch.Tensor, g: torch.Tensor, onehot_t: torch.Tensor) -> None:
        """Set ``.grad`` of each parameter to the gradient of ``(self(h, position) * g).sum()``.

        ``onehot_t`` (T, B) is the positions as a one-hot matrix, shared with the lens's own backward.
        """
        raise NotImplementedError


class BiasAdapter(PositionAdapter):
    """A learned bias per position, starting at zero."""

    def __init__(self, n_positions: int, hidden: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n_positions, hidden))

    def forward(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.bias[position].unsqueeze(1)  # (B, 1, d)

    def write_grads(self, h: torch.Tensor, position: torch.Tensor, g: torch.Tensor, onehot_t: torch.Tensor) -> None:
        torch.mm(onehot_t, g.sum(1), out=grad_buffer(self.bias))  # (T, d)


class LowRankAdapter(PositionAdapter):
    """A learned low-rank delta per position, ``h -> (h U_p) V_p``.

    U starts random and V at zero: the delta starts at zero but its gradient does not (with both at
    zero neither would ever move).
    """

    def __init__(self, n_positions: int, hidden: int, rank: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(torch.randn(n_positions, hidden, rank, generator=generator) / hidden**0.5)
        self.up = nn.Parameter(torch.zeros(n_positions, rank, hidden))

    def forward(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        low = torch.einsum("bld,bdr->blr", h, self.down[position])  # (B, L, r)
        return torch.einsum("blr,bre->ble", low, self.up[position])  # (B, L, d)

    def write_grads(self, h: torch.Tensor, position: torch.Tensor, g: torch.Tensor, onehot_t: torch.Tensor) -> None:
        batch, n_positions = h.shape[0], self.down.shape[0]
        down, up = self.down[position], self.up[position]  # (B, d, r), (B, r, d)
        low = torch.bmm(h, down)  # (B, L, r)
        per_up = torch.bmm(low.transpose(1, 2), g)  # (B, r, d)
        torch.mm(onehot_t, per_up.reshape(batch, -1), out=grad_buffer(self.up).view(n_positions, -1))
        per_down = torch.bmm(h.transpose(1, 2), torch.bmm(g, up.transpose(1, 2)))  # (B, d, r)
        torch.mm(onehot_t, per_down.reshape(batch, -1), out=grad_buffer(self.down).view(n_positions, -1))


def position_adapter(kind: AdapterKind, n_positions: int, hidden: int, rank: int, seed: int) -> PositionAdapter | None:
    """The adapter of ``kind`` (None for ``none``)."""
    if kind is AdapterKind.BIAS:
        return BiasAdapter(n_positions, hidden)
    if kind is AdapterKind.LOWRANK:
        return LowRankAdapter(n_positions, hidden, rank, seed)
    return None


def grad_buffer(param: torch.Tensor) -> torch.Tensor:
    """The parameter's ``.grad`` buffer, allocated on first use (contents are overwritten)."""
    if param.grad is None or param.grad.shape != param.shape:
        param.grad = torch.empty_like(param, memory_format=torch.contiguous_format)
    return param.grad
