"""A gradient kept as the product of thin matrices, ``left^T @ right``, instead of written out.

A translator's weight gradient in a lens step is ``H^T G``: the states of the rows it translated
and the loss gradient at its output, a few rows by the hidden size each. Kept factored, its squared
norm comes from two small Gram matrices (``||A^T B||_F^2 = sum((A A^T) * (B B^T))``: R x R instead of
a pass over d x d), and the optimiser can form each entry where it uses it (``ctexp.lens.update``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

THIN_RATIO = 8  # factors are thin when the hidden size is at least this many times the rows


@dataclass(frozen=True)
class Factors:
    """The gradient ``left^T @ right`` over leading axes: left (..., R, m), right (..., R, n), broadcastable."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.left.shape[-2])

    @property
    def shape(self) -> torch.Size:
        leading = torch.broadcast_shapes(self.left.shape[:-2], self.right.shape[:-2])
        return torch.Size((*leading, self.left.shape[-1], self.right.shape[-1]))

    def numel(self) -> int:
        return self.shape.numel()

    def thin(self) -> bool:
        """Whether the Gram matrices are much smaller than the gradient (its norm from them pays)."""
        return THIN_RATIO * self.rows <= min(self.left.shape[-1], self.right.shape[-1])

    def dense(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The gradient written out (into ``out`` where given), by one batched gemm.

        Also for 1 or 2 rows: on the 2-core Xeon (AMX) a (16, 2048, 2) @ (16, 2, 2048) bmm took 35-40 ms
        against 101-108 ms for a multiply and an ``addcmul_`` of outer products (1-2 threads, load ~4).
        """
        return torch.matmul(self.left.transpose(-1, -2), self.right, out=out)

    def squared_norm(self) -> torch.Tensor:
        """``dense().square().sum()`` from the R x R Gram matrices of the factors."""
        grams = torch.matmul(self.left, self.left.transpose(-1, -2)) * torch.matmul(self.right, self.right.transpose(-1, -2))
        return grams.sum()
