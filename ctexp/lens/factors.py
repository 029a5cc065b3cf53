"""A gradient kept as the product of thin matrices, ``left^T @ right``, instead of written out.

A translator's weight gradient in a lens step is ``H^T G``: the states of the rows it translated
and the loss gradient at its output, a few rows by the hidden size each. Kept factored, its squared
norm comes from two small Gram matrices (``||A^T B||_F^2 = sum((A A^T) * (B B^T))``: R x R instead of
a pass over d x d), and the optimiser can form each entry where it uses it (``ctexp.lens.update``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OUTER_PRODUCT_MAX_ROWS = 2  # up to this many rows, ``dense`` sums outer products (a gemm with K <= 2 is slow)
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
        """The gradient written out (into ``out`` where given). For 1 or 2 rows, outer products.

        A step of 1 or 2 rows per translator is a rank-1 or rank-2 update: multiply-adds run at memory
        speed, while a gemm with K <= 2 does not.
        """
        if self.rows > OUTER_PRODUCT_MAX_ROWS:
            return torch.matmul(self.left.transpose(-1, -2), self.right, out=out)
        first = self.left[..., 0, :].unsqueeze(-1), self.right[..., 0, :].unsqueeze(-2)
        out = torch.mul(*first, out=out) if out is not None else torch.mul(*first)
        for row in range(1, self.rows):
            out.addcmul_(self.left[..., row, :].unsqueeze(-1), self.right[..., row, :].unsqueeze(-2))
        return out

    def squared_norm(self) -> torch.Tensor:
        """``dense().square().sum()`` from the R x R Gram matrices of the factors."""
        grams = torch.matmul(self.left, self.left.transpose(-1, -2)) * torch.matmul(self.right, self.right.transpose(-1, -2))
        return grams.sum()
