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
* ``tiled``: the large gradients stay factored; each is formed a block of rows at a time into a
  buffer that stays in cache, and torch's fused AdamW updates that block of the parameter and its
  moments while the block is there: one pass over parameters and moments from memory, no dense
  gradient, the same kernel (and so the same arithmetic) as ``dense``. Small parameters take one
  fused call. Where the fused kernel is missing, ``dense`` is used instead.
* ``auto``: ``compiled`` on CUDA; on CPU ``tiled`` for large lenses and ``dense`` for small ones
  (``TILED_MIN_ELEMENTS``; measured with ``bench/train_throughput.py --update`` on the 2-core CPU).

Every mode computes ``clip_grad_norm_`` then ``torch.optim.AdamW`` (tests compare them). Nothing here
waits for the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from ctexp.config import TrainConfig
from ctexp.lens.factors import Factors
from ctexp.lens.scratch import Scratch

UPDATE_MODES = ("auto", "dense", "plain", "compiled", "tiled")
INLINE_MAX_ROWS = 16  # ``compiled`` forms gradients as sums of outer products up to this many rows, else a gemm
# ``tiled`` forms a gradient block as a sum of outer products up to this many rows, else by a gemm. Measured,
# a step's 32 blocks of 16 x 64 x 2048 (2-core AMD Zen 4): rows 2 / 4 / 8 / 16: outer products 4 / 8 / 20 /
# 36 ms, gemm 22 / 21 / 22 / 16 ms (a gemm with a tiny inner size runs far from its peak).
BLOCK_OUTER_MAX_ROWS = 8
# ``tiled``'s gradient block: at most this many bytes. Measured (16 translators of 2048 x 2048, 2 rows,
# 2-core AMD Zen 4): 4 MB 32 ms, 8 MB 29 ms, 16 MB 29 ms, 32 MB 37 ms a step, against 28 ms for the fused
# AdamW pass alone over a gradient already written, and 61 ms for writing it (a bmm) then that pass.
TILE_BYTES = 1 << 23
# ``auto`` tiles on CPU from this many lens parameters (16 MB in fp32). Below, a dense gradient stays in
# cache anyway, and the blocks' extra calls cost more than they save: the default world (hidden 64,
# 9 layers) trained 5-20% slower tiled than dense, with the same results.
TILED_MIN_ELEMENTS = 1 << 22
BETAS = (0.9, 0.999)
EPS = 1e-8
CLIP_EPS = 1e-6  # as clip_grad_norm_: multiply by min(1, max_norm / (norm + 1e-6))


class TrainableLens(Protocol):
    """What the update needs of a lens (``ctexp.lens.kinds.Lens``)."""

    def named_parameters(self): ...

    def write_grads(self, h: torch.Tensor, position: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor | None: ...

    def gradients(self, h: torch.Tensor, position: torch.Tensor, grad_out: torch.Tensor) -> dict[str, Factors]: ...


def resolve_update_mode(mode: str, device: torch.device, parameters: int = 0) -> str:
    """``auto`` -> ``compiled`` on CUDA; elsewhere ``tiled`` for lenses of at least ``TILED_MIN_ELEMENTS``
    trainable ``parameters``, ``dense`` below; the others as they are.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in UPDATE_MODES:
        raise ValueError(f"update mode must be one of {UPDATE_MODES}, not {mode!r}")
    if mode != "auto":
        return mode
    if device.type == "cuda":
        return "compiled"
    return "tiled" if parameters >= TILED_MIN_ELEMENTS else "dense"


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
            self.count = torch.zeros((), dtype=torch.float32, device=params[0].device)  # shared by every tensor
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
        divisor = self.begin_step(norm)
        self.apply(self.params, grads, self.exp_avg, self.exp_avg_sq, divisor)

    def begin_step(self, norm: torch.Tensor) -> torch.Tensor:
        """Count one more step; the gradient divisor that clips to ``clip`` a global norm of ``norm`` (consumed)."""
        # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); the kernel divides by its inverse.
        divisor = norm.add_(CLIP_EPS).div_(self.max_norm).clamp_(min=1.0)
        self.count.add_(1)
        return divisor

    def apply(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
        exp_avg_sq: list[torch.Tensor], divisor: torch.Tensor,
    ) -> None:
        """The fused AdamW kernel over these tensors (parameters or blocks of them, and their moments)."""
        torch._fused_adamw_(
            params, grads, exp_avg, exp_avg_sq, [], [self.count] * len(params),
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


def form_block(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``left^T @ right`` into ``out``: left (N, R, b), right (N, R, n), out (N, b, n).

    A sum of R outer products up to ``BLOCK_OUTER_MAX_ROWS`` rows, else a batched gemm.
    """
    rows = left.shape[-2]
    if rows > BLOCK_OUTER_MAX_ROWS:
        return torch.matmul(left.transpose(-1, -2), right, out=out)
    torch.mul(left[:, 0].unsqueeze(-1), right[:, 0].unsqueeze(-2), out=out)
    for row in range(1, rows):
        out.addcmul_(left[:, row].unsqueeze(-1), right[:, row].unsqueeze(-2))
    return out


def tiled_adamw(
    optimizer: FusedAdamW, index: int, factors: Factors, divisor: torch.Tensor, scratch: Scratch
) -> None:
    """AdamW on ``optimizer.params[index]`` with the gradient ``factors``, a block of rows at a time.

    Each block of the gradient (every translator's rows ``[start, start + size)``) is formed into one
    reused buffer of at most ``TILE_BYTES`` and applied by the fused kernel to the same rows of the
    parameter and its moments while it is still in cache.
    """
    param = optimizer.params[index].data
    *lead, m, n = param.shape
    count, rows = math.prod(lead), factors.rows
    left = factors.left.expand(*lead, rows, m).reshape(count, rows, m)
    right = factors.right.expand(*lead, rows, n).reshape(count, rows, n)
    tensors = [t.view(count, m, n) for t in (param, optimizer.exp_avg[index], optimizer.exp_avg_sq[index])]
    block = max(1, TILE_BYTES // (count * n * param.element_size()))
    for start in range(0, m, block):
        size = min(block, m - start)
        grad = form_block(left[:, :, start : start + size], right,
                          scratch.take("grad", (count, size, n), param.dtype, param.device))
        p, exp_avg, exp_avg_sq = (list(t[:, start : start + size].unbind(0)) for t in tensors)
        optimizer.apply(p, list(grad.unbind(0)), exp_avg, exp_avg_sq, divisor)


def global_norm(factored: dict[str, Factors], grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The global gradient norm that clipping reads: factored gradients by their Gram matrices, the rest directly."""
    parts = [f.squared_norm() for f in factored.values()]
    parts += [torch.linalg.vector_norm(grad).square() for grad in grads]
    return torch.stack(parts).sum().sqrt() if parts else torch.zeros((), device=device)


class LensUpdate:
    """Clip, weight decay and AdamW over a lens's trainable parameters, from the gradient of its output.

    ``update(h, position, grad_out)``: ``h`` the input states, ``grad_out`` the loss gradient at the
    lens output (``head_loss_and_grad``). See the module for the modes.
    """

    def __init__(self, lens: TrainableLens, config: TrainConfig, mode: str = "auto") -> None:
        self.lens, self.config = lens, config
        self.named = [(name, p) for name, p in lens.named_parameters() if p.requires_grad]
        params = [p for _, p in self.named]
        device = params[0].device if params else torch.device("cpu")
        self.mode = resolve_update_mode(mode, device, sum(p.numel() for p in params))
        if self.mode in ("dense", "tiled") or not params:
            self.optimizer = FusedAdamW(params, config) if params else None
            if self.mode == "tiled" and (self.optimizer is None or not self.optimizer.fused):
                self.mode = "dense"  # tiling needs the fused kernel; without it the plain calls, as dense
            self.scratch = Scratch()
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
        if self.mode == "tiled":
            self._tiled(factored)
            return
        dense = [p.grad for name, p in self.named if name not in factored and p.grad is not None]
        norm = global_norm(factored, dense, self.count.device)
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

    def _tiled(self, factored: dict[str, Factors]) -> None:
        """``tiled``: the parameters with a written gradient in one fused call, the factored ones block by block."""
        optimizer = self.optimizer
        # As ``dense`` (FusedAdamW.step): a parameter without a gradient steps with a zero one.
        small = [(i, p.grad if p.grad is not None else torch.zeros_like(p))
                 for i, (name, p) in enumerate(self.named) if name not in factored]
        divisor = optimizer.begin_step(global_norm(factored, [grad for _, grad in small], optimizer.count.device))
        if small:
            index = [i for i, _ in small]
            optimizer.apply([optimizer.params[i] for i in index], [grad for _, grad in small],
                            [optimizer.exp_avg[i] for i in index], [optimizer.exp_avg_sq[i] for i in index], divisor)
        for i, (name, _) in enumerate(self.named):
            if name in factored:
                tiled_adamw(optimizer, i, factored[name], divisor, self.scratch)
