"""The optimiser step of lens training: gradient-norm clipping, weight decay and AdamW.

``LensUpdate`` takes the gradient of the lens output and updates the lens in place, in one of these
modes (``UPDATE_MODES``):

* ``dense``: the kind writes every gradient (``Lens.write_grads``), then ``FusedAdamW`` clips and
  updates (torch's fused AdamW kernel with the clip folded in). Fastest measured on CPU.
* ``plain``: the large gradients stay factored (``Lens.gradients``, ``ctexp.lens.factors``); the clip
  norm comes from their Gram matrices, and clipping, weight decay and AdamW are written in plain
  torch over each parameter. The reference for ``compiled`` and the path where nothing compiles.
* ``compiled``: the same update by ``torch.compile``, with each gradient entry formed inside the
  update from the factors (a sum of R outer products) where the rows are few: one pass that reads
  and writes the parameters and both moments and nothing else, no dense gradient.
* ``auto``: ``compiled`` on CUDA, ``dense`` elsewhere (on the 2-core CPU ``dense`` measured fastest:
  ``bench/train_throughput.py --update``).

Every mode computes ``clip_grad_norm_`` then ``torch.optim.AdamW`` (tests compare them). Nothing here
waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ctexp.config import TrainConfig
from ctexp.lens.factors import Factors

UPDATE_MODES = ("auto", "dense", "plain", "compiled")
INLINE_MAX_ROWS = 16  # ``compiled`` forms gradients as sums of outer products up to this many rows, else a gemm
BETAS = (0.9, 0.999)
EPS = 1e-8
CLIP_EPS = 1e-6  # as clip_grad_norm_: multiply by min(1, max_norm / (norm + 1e-6))


class TrainableLens(Protocol):
    """What the update needs of a lens (``ctexp.lens.kinds.Lens``)."""

    def named_parameters(self): ...

    def write_grads(self, h: torch.Tensor, position: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor | None: ...

    def gradients(self, h: torch.Tensor, position: torch.Tensor, grad_out: torch.Tensor) -> dict[str, Factors]: ...


def resolve_update_mode(mode: str, device: torch.device) -> str:
    """``auto`` -> ``compiled`` on CUDA, ``dense`` elsewhere; the others as they are.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in UPDATE_MODES:
        raise ValueError(f"update mode must be one of {UPDATE_MODES}, not {mode!r}")
    if mode != "auto":
        return mode
    return "compiled" if device.type == "cuda" else "dense"


class FusedAdamW:
    """AdamW with gradient-norm clipping, as ``clip_grad_norm_`` then ``torch.optim.AdamW(fused=True)``.

    The clipping factor goes to the fused kernel as its gradient divisor instead of a pass that
    rescales every gradient, and the per-step Python of ``torch.optim`` (hooks, grouping, state
    look-ups) is skipped: for small lenses that overhead is most of a step. Where the fused kernel is
    missing (other devices, other torch builds), the same two public calls are made instead.
    """

    def __init__(self, params: list[torch.Tensor], config: TrainConfig) -> None:
        self.params, self.max_norm = params, config.clip
        self.hyper = {"lr": config.lr, "beta1": BETAS[0], "beta2": BETAS[1], "weight_decay": config.weight_decay,
                      "eps": EPS}
        devices = {p.device.type for p in params}
        self.fused = (
            hasattr(torch, "_fused_adamw_") and hasattr(torch, "_foreach_norm")
            and devices <= {"cpu", "cuda"} and len(devices) == 1
            and all(p.dtype == torch.float32 for p in params)
        )
        if self.fused:
            self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
            self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
            self.count = torch.zeros((), dtype=torch.float32, device=params[0].device)
            self.counts = [self.count] * len(params)  # one step count shared by every tensor
        else:
            self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def step(self, squared_norm: torch.Tensor | None = None) -> None:
        """Clip the gradients' global norm to ``clip`` and take one AdamW step. No host synchronisation.

        ``squared_norm``: the gradients' squared global norm where already known (else computed here).
        """
        if not self.fused:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
            self.optimizer.step()
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if squared_norm is not None:
            norm = squared_norm.sqrt()
        else:
            norms = torch._foreach_norm(grads)  # what clip_grad_norm_ computes, in one call
            norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); the kernel divides by its inverse.
        divisor = norm.add_(CLIP_EPS).div_(self.max_norm).clamp_(min=1.0)
        self.count.add_(1)
        torch._fused_adamw_(
            self.params, grads, self.exp_avg, self.exp_avg_sq, [], self.counts,
            amsgrad=False, maximize=False, grad_scale=divisor, found_inf=None, **self.hyper,
        )


def adamw_pass(
    param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
    count: torch.Tensor, lr: float, weight_decay: float,
) -> None:
    """One AdamW update of ``param`` by ``grad`` (already clipped), in place: torch's single-tensor AdamW."""
    beta1, beta2 = BETAS
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**count)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**count).sqrt()).add_(EPS)
    param.mul_(1 - lr * weight_decay).sub_(exp_avg / denom * step_size)


def factored_pass(
    param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
    scale: torch.Tensor, count: torch.Tensor, lr: float, weight_decay: float, inline: bool,
) -> None:
    """``adamw_pass`` with the gradient ``scale * left^T right`` formed here.

    ``inline``: as a sum of outer products, which ``torch.compile`` fuses into the update (one pass,
    no dense gradient); else by a gemm.
    """
    if inline:  # unrolled over the rows: element-wise work that the compiler fuses into the update
        grad = left[..., 0, :].unsqueeze(-1) * right[..., 0, :].unsqueeze(-2)
        for row in range(1, left.shape[-2]):
            grad = grad + left[..., row, :].unsqueeze(-1) * right[..., row, :].unsqueeze(-2)
        grad = grad * scale
    else:
        grad = torch.matmul(left.transpose(-1, -2), right).mul_(scale)
    adamw_pass(param, exp_avg, exp_avg_sq, grad, count, lr, weight_decay)


class LensUpdate:
    """Clip, weight decay and AdamW over a lens's trainable parameters, from the gradient of its output.

    ``update(h, position, grad_out)``: ``h`` the input states, ``grad_out`` the loss gradient at the
    lens output (``head_loss_and_grad``). See the module for the modes.
    """

    def __init__(self, lens: TrainableLens, config: TrainConfig, mode: str = "auto") -> None:
        self.lens, self.config = lens, config
        self.named = [(name, p) for name, p in lens.named_parameters() if p.requires_grad]
        params = [p for _, p in self.named]
        self.mode = resolve_update_mode(mode, params[0].device if params else torch.device("cpu"))
        if self.mode == "dense" or not params:
            self.optimizer = FusedAdamW(params, config) if params else None
            return
        self.exp_avg = {name: torch.zeros_like(p) for name, p in self.named}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in self.named}
        self.count = torch.zeros((), dtype=torch.float32, device=params[0].device)
        self.factored_pass: Callable[..., None] = factored_pass
        self.adamw_pass: Callable[..., None] = adamw_pass
        if self.mode == "compiled":
            self.factored_pass = torch.compile(factored_pass, dynamic=False)
            self.adamw_pass = torch.compile(adamw_pass, dynamic=False)

    def __call__(self, h: torch.Tensor, position: torch.Tensor, grad_out: torch.Tensor) -> None:
        if self.mode == "dense" or not self.named:
            squared_norm = self.lens.write_grads(h, position, grad_out)
            if self.optimizer is not None:
                self.optimizer.step(squared_norm)
            return
        factored = self.lens.gradients(h, position, grad_out)
        dense = [(name, p) for name, p in self.named if name not in factored]
        parts = [f.squared_norm() for f in factored.values()]
        parts += [torch.linalg.vector_norm(p.grad).square() for _, p in dense if p.grad is not None]
        norm = torch.stack(parts).sum().sqrt() if parts else torch.zeros((), device=self.count.device)
        scale = (self.config.clip / (norm + CLIP_EPS)).clamp(max=1.0)
        self.count.add_(1)
        lr, decay = self.config.lr, self.config.weight_decay
        inline = self.mode == "compiled"
        for name, p in self.named:
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            if name in factored:
                f = factored[name]
                self.factored_pass(p.data, m, v, f.left, f.right, scale, self.count, lr, decay,
                                   inline and f.rows <= INLINE_MAX_ROWS)
            elif p.grad is not None:
                self.adamw_pass(p.data, m, v, p.grad * scale, self.count, lr, decay)
