"""Reusable scratch memory for the training step's large temporaries."""

from __future__ import annotations

import math

import torch

__all__ = ["Scratch"]


class Scratch:
    """Scratch tensors reused from call to call, by name: a training step's large temporaries.

    ``head.head_loss_and_grad``'s [rows, vocab] logits and probabilities are tens of MB at the
    reference's shape. Allocated afresh every step, each comes from the OS as new pages (glibc serves
    large blocks by ``mmap``), and faulting them in cost more than the work on them: measured on the
    2-core CPU, 23 ms to cast 32 x 128,256 bf16 logits into a new float32 tensor against 0.6 ms into
    a reused one. A ``TrainStep`` holds one ``Scratch`` for all its steps (``update.LensUpdate``'s
    tiled mode one for its gradient blocks); the loss uses it for large heads only
    (``head.LARGE_HEAD_ELEMENTS``), where small new tensors cost less than the bookkeeping. A slot grows to the largest request; a caller never
    holds two live results from one slot.
    """

    def __init__(self) -> None:
        self._slots: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of ``shape``, backed by the slot ``name`` (grown where too small)."""
        numel = math.prod(shape)
        slot = self._slots.get(name)
        if slot is None or slot.numel() < numel or slot.dtype != dtype or slot.device != device:
            self._slots.pop(name, None)  # the old block goes before the new one is made
            slot = self._slots[name] = torch.empty(numel, dtype=dtype, device=device)
        return slot[:numel].view(shape)
