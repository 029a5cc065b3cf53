"""Lenses: translators indexed by {layer, position}, then the model's frozen final norm and unembedding.

Translators are residual, ``h -> h + h A + b`` with A and b starting at zero, as in tuned-lens: the
lens starts as the logit lens, and weight decay pulls it back towards it. All translators of a lens
live in one stacked tensor and are applied in one batched product: no Python work per layer or
position. Lenses indexed by position compute every position's translation and gather the sample's
own (T times the translator cost, still a few percent of the unembedding's).

Training does not go through autograd. The loss against the frozen head (``head_loss_and_grad``)
works through chunks of samples of bounded size, so no ``[batch, L, vocab]`` logits tensor is held
for a whole batch, and since the head is frozen and each state's loss depends on its own row alone,
it computes each state's gradient with respect to the lens output while the logits are at hand: the
unembedding products are done exactly twice per step (logits, and gradient back to the input), the
floor for this loss. ``Lens.write_grads`` turns that gradient into the parameters' gradients with a
few batched products per lens kind. ``head_cross_entropy`` is the same loss as an autograd function.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ctexp.config import AdapterKind, LensKind


class Lens(nn.Module):
    """Translators for a set of layers and positions (the head is kept apart: it is frozen and shared).

    Args:
        kind: which axes index the translators.
        n_layers: number of selected layers (the lens's layer axis follows the selection order).
        n_positions: number of CT positions T in the store.
        hidden: hidden size d.
        adapter: optional per-position context for lenses shared across positions.
        rank: rank of the low-rank adapter.
    """

    def __init__(
        self,
        kind: LensKind,
        n_layers: int,
        n_positions: int,
        hidden: int,
        adapter: AdapterKind = AdapterKind.NONE,
        rank: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.kind, self.adapter = kind, adapter
        self.n_layers, self.n_positions, self.hidden, self.rank = n_layers, n_positions, hidden, rank
        group_shape = {
            LensKind.IDENTITY: None,
            LensKind.LAYER: (n_layers,),
            LensKind.POSITION: (n_positions,),
            LensKind.LAYER_POSITION: (n_layers, n_positions),
            LensKind.GLOBAL: (),
        }[kind]
        if group_shape is not None:
            self.weight = nn.Parameter(torch.zeros(*group_shape, hidden, hidden))
            self.bias = nn.Parameter(torch.zeros(*group_shape, hidden))
        if adapter is AdapterKind.BIAS:
            self.position_bias = nn.Parameter(torch.zeros(n_positions, hidden))
        elif adapter is AdapterKind.LOWRANK:
            generator = torch.Generator().manual_seed(seed)
            # U random, V zero: the delta starts at zero but its gradient does not.
            self.adapter_down = nn.Parameter(torch.randn(n_positions, hidden, rank, generator=generator) / hidden**0.5)
            self.adapter_up = nn.Parameter(torch.zeros(n_positions, rank, hidden))

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def forward(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Translate states. h: (B, L, d); position: (B,). Returns (B, L, d)."""
        out = h + self._delta(h, position) if self.kind is not LensKind.IDENTITY else h
        if self.adapter is AdapterKind.BIAS:
            out = out + self.position_bias[position].unsqueeze(1)
        elif self.adapter is AdapterKind.LOWRANK:
            low = torch.einsum("bld,bdr->blr", h, self.adapter_down[position])  # (B, L, r)
            out = out + torch.einsum("blr,bre->ble", low, self.adapter_up[position])
        return out

    def _delta(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        if self.kind is LensKind.GLOBAL:
            return h @ self.weight + self.bias
        if self.kind is LensKind.LAYER:  # one batched product over layers: (L, B, d) @ (L, d, d)
            return torch.baddbmm(self.bias.unsqueeze(1), h.transpose(0, 1), self.weight).transpose(0, 1)
        rows = torch.arange(h.shape[0], device=h.device)
        if self.kind is LensKind.POSITION:
            every = torch.einsum("bld,tde->blte", h, self.weight) + self.bias  # (B, L, T, d)
            return every[rows, :, position]
        every = torch.einsum("bld,ltde->blte", h, self.weight) + self.bias  # (B, L, T, d)
        return every[rows, :, position]

    def write_grads(self, h: torch.Tensor, position: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor | None:
        """Set each parameter's ``.grad`` to the gradient of ``(self(h, position) * grad_out).sum()``.

        The training step's backward, without autograd: a few batched products per lens kind, no
        graph, no Python work per layer, position or sample, and the ``.grad`` buffers are reused from
        step to step (``out=``) instead of allocated. ``h`` (the input states) is a constant. Terms
        indexed by position are summed with a one-hot matrix product (deterministic, no atomics).

        Returns the squared norm of all the gradients where the factors give it more cheaply than a
        pass over them (for clipping): a layer lens with large translators and few samples a step,
        whose layer-l weight gradient H_l^T G_l has squared norm sum((H_l H_l^T) * (G_l G_l^T)), B x B
        products instead of reading L x d x d. Else None.
        """
        batch, n_layers, hidden = h.shape
        g = grad_out
        if self.kind in (LensKind.POSITION, LensKind.LAYER_POSITION) or self.adapter is not AdapterKind.NONE:
            slots = torch.arange(self.n_positions, device=position.device).unsqueeze(1)
            onehot_t = (slots == position.unsqueeze(0)).to(g.dtype)  # (T, B): no range check, no sync
        if self.kind is LensKind.GLOBAL:
            torch.mm(h.reshape(-1, hidden).t(), g.reshape(-1, hidden), out=_grad(self.weight))
            torch.sum(g, dim=(0, 1), out=_grad(self.bias))
        elif self.kind is LensKind.LAYER:
            if batch <= 2:  # a rank-1 or rank-2 update: multiply-adds run at memory speed, gemm with K <= 2 does not
                h_t, g_t = h.transpose(0, 1), g.transpose(0, 1)  # (L, B, d)
                torch.mul(h_t[:, 0].unsqueeze(2), g_t[:, 0].unsqueeze(1), out=_grad(self.weight))
                if batch == 2:
                    self.weight.grad.addcmul_(h_t[:, 1].unsqueeze(2), g_t[:, 1].unsqueeze(1))
            else:
                torch.bmm(h.permute(1, 2, 0), g.transpose(0, 1), out=_grad(self.weight))  # (L, d, B) @ (L, B, d)
            torch.sum(g, dim=0, out=_grad(self.bias))
        elif self.kind is LensKind.POSITION:
            masked = (onehot_t.view(-1, batch, 1, 1) * h).reshape(-1, batch * n_layers, hidden)  # (T, B*L, d)
            torch.matmul(masked.transpose(1, 2), g.reshape(batch * n_layers, hidden), out=_grad(self.weight))
            torch.mm(onehot_t, g.sum(1), out=_grad(self.bias))
        elif self.kind is LensKind.LAYER_POSITION:
            by_layer = g.transpose(0, 1)  # (L, B, d)
            masked = onehot_t.view(1, -1, batch, 1) * h.transpose(0, 1).unsqueeze(1)  # (L, T, B, d)
            torch.matmul(masked.transpose(-1, -2), by_layer.unsqueeze(1), out=_grad(self.weight))  # (L, T, d, d)
            torch.matmul(onehot_t, by_layer, out=_grad(self.bias))  # (L, T, d)
        if self.adapter is AdapterKind.BIAS:
            torch.mm(onehot_t, g.sum(1), out=_grad(self.position_bias))
        elif self.adapter is AdapterKind.LOWRANK:
            down, up = self.adapter_down[position], self.adapter_up[position]  # (B, d, r), (B, r, d)
            low = torch.bmm(h, down)  # (B, L, r)
            per_up = torch.bmm(low.transpose(1, 2), g)  # (B, r, d)
            torch.mm(onehot_t, per_up.reshape(batch, -1), out=_grad(self.adapter_up).view(self.n_positions, -1))
            per_down = torch.bmm(h.transpose(1, 2), torch.bmm(g, up.transpose(1, 2)))  # (B, d, r)
            torch.mm(onehot_t, per_down.reshape(batch, -1), out=_grad(self.adapter_down).view(self.n_positions, -1))
        if self.kind is LensKind.LAYER and self.weight.numel() >= GRAM_NORM_MIN_ELEMENTS and 8 * batch <= hidden:
            h_t, g_t = h.transpose(0, 1), g.transpose(0, 1)  # (L, B, d)
            grams = torch.bmm(h_t, h_t.transpose(1, 2)) * torch.bmm(g_t, g_t.transpose(1, 2))  # (L, B, B)
            others = [p.grad for p in self.parameters() if p is not self.weight]  # small: read directly
            return grams.sum() + torch.stack([torch.linalg.vector_norm(x).square() for x in others]).sum()
        return None

    def spec(self) -> dict[str, object]:
        return {
            "kind": self.kind.value,
            "adapter": self.adapter.value,
            "rank": self.rank,
            "n_layers": self.n_layers,
            "n_positions": self.n_positions,
            "hidden": self.hidden,
        }

    def save(self, directory: Path, layers: list[int]) -> None:
        """Write ``lens.safetensors`` (weights) and ``lens.json`` (what they mean)."""
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.state_dict().items()}
        if tensors:
            save_file(tensors, str(directory / "lens.safetensors"))
        spec = {**self.spec(), "layers": layers}
        (directory / "lens.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")


GRAM_NORM_MIN_ELEMENTS = 1 << 22  # translator weights from which ``write_grads`` returns the norm from the factors


def _grad(param: torch.Tensor) -> torch.Tensor:
    """The parameter's ``.grad`` buffer, allocated on first use (contents are overwritten)."""
    if param.grad is None or param.grad.shape != param.shape:
        param.grad = torch.empty_like(param, memory_format=torch.contiguous_format)
    return param.grad


