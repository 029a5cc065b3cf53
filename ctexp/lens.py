"""Lenses: translators indexed by {layer, position}, then the model's frozen final norm and unembedding.

Translators are residual, ``h -> h + h A + b`` with A and b starting at zero, as in tuned-lens: the
lens starts as the logit lens, and weight decay pulls it back towards it. All translators of a lens
live in one stacked tensor and are applied in one batched product: no Python work per layer or
position. Lenses indexed by position compute every position's translation and gather the sample's
own (T times the translator cost, still a few percent of the unembedding's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ctexp.config import AdapterKind, LensKind
from ctexp.store import NormSpec, Store


class Head(nn.Module):
    """The frozen final norm and unembedding; the norm is skipped for states that already had it."""

    def __init__(self, store: Store, layers: list[int]) -> None:
        super().__init__()
        self.norm_spec: NormSpec = store.meta.norm
        self.register_buffer("norm_weight", store.norm_weight.float().clone())  # (d,)
        bias = store.norm_bias.float().clone() if store.norm_bias is not None else torch.zeros_like(self.norm_weight)
        self.register_buffer("norm_bias", bias)  # (d,)
        self.register_buffer("unembed", store.unembed.float().clone())  # (V, d)
        normed = torch.tensor([layer in store.meta.normed_states for layer in layers])
        self.register_buffer("needs_norm", ~normed)  # (L,)

    @property
    def vocab(self) -> int:
        return int(self.unembed.shape[0])

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the final norm to the layers that need it. h: (B, L, d)."""
        if self.norm_spec.kind == "rmsnorm":
            normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.norm_spec.eps) * self.norm_weight
        else:
            centered = h - h.mean(-1, keepdim=True)
            normed = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + self.norm_spec.eps)
            normed = normed * self.norm_weight + self.norm_bias
        return torch.where(self.needs_norm.view(1, -1, 1), normed, h)  # (B, L, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.normalize(h) @ self.unembed.T  # (B, L, V)


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
        rows = torch.arange(h.shape[0], device=h.device)
        if self.kind is LensKind.GLOBAL:
            return h @ self.weight + self.bias
        if self.kind is LensKind.LAYER:
            return torch.einsum("bld,lde->ble", h, self.weight) + self.bias
        if self.kind is LensKind.POSITION:
            every = torch.einsum("bld,tde->blte", h, self.weight) + self.bias  # (B, L, T, d)
            return every[rows, :, position]
        every = torch.einsum("bld,ltde->blte", h, self.weight) + self.bias  # (B, L, T, d)
        return every[rows, :, position]

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
