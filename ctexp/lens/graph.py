"""A fixed-shape training step replayed as a CUDA graph: one launch a step instead of dozens.

Once the step is fused, a small step on a GPU is bound by kernel launches (about 50 a step, each a
few microseconds of host time). ``GraphedStep`` runs the first ``warmup`` batches as they are (they
train: nothing is run twice or thrown away; they also compile what ``torch.compile`` compiles and
let cuBLAS pick its kernels), then captures the step once on static input buffers and from then on
copies each batch into those buffers and replays. A batch of another shape (the epoch's last,
partial one) runs as it is, so it still trains. The step must not synchronise with the host (the
training step does not) and must keep its tensors' addresses from step to step (parameters,
optimiser state and ``.grad`` buffers are updated in place).

``capture="static"`` is a stand-in for devices without graphs (and for tests): the same static
buffers, with the step re-run on them instead of a replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ctexp.lens.head import LossTargets

GRAPH_MODES = ("auto", "off", "cuda", "static")
WARMUP_STEPS = 3  # batches run as they are before the capture (torch recommends a few, on a side stream)

Step = Callable[[torch.Tensor, torch.Tensor, LossTargets], torch.Tensor]


def resolve_graph_mode(mode: str, device: torch.device) -> str:
    """``auto`` -> ``cuda`` on CUDA devices, ``off`` elsewhere.

    Raises:
        ValueError: an unknown mode, or ``cuda`` off a CUDA device.
    """
    if mode not in GRAPH_MODES:
        raise ValueError(f"graph mode must be one of {GRAPH_MODES}, not {mode!r}")
    if mode == "auto":
        return "cuda" if device.type == "cuda" else "off"
    if mode == "cuda" and device.type != "cuda":
        raise ValueError(f"graph mode 'cuda' needs a CUDA device, not {device.type}")
    return mode


class GraphedStep:
    """``step`` captured once on static buffers and replayed for every batch of the captured shape."""

    def __init__(self, step: Step, capture: str = "cuda", warmup: int = WARMUP_STEPS) -> None:
        self.step, self.capture, self.warmup = step, capture, warmup
        self.seen = 0
        self.inputs: tuple[torch.Tensor, ...] | None = None
        self.has_target = False
        self.loss: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0  # batches run by replay (or by the stand-in on the static buffers)

    def __call__(self, states: torch.Tensor, position: torch.Tensor, targets: LossTargets) -> torch.Tensor:
        flat = _flatten(states, position, targets)
        if self.seen < self.warmup:
            self.seen += 1
            return self._warm(states, position, targets)
        if self.inputs is None:
            self._capture(flat, targets.has_target is not None)
        if not self._fits(flat, targets.has_target is not None):
            return self.step(states, position, targets)  # another shape (the last partial batch): as it is
        for static, value in zip(self.inputs, flat, strict=True):
            static.copy_(value)
        self.replays += 1
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        return self.step(*self._static_batch())

    def _warm(self, states: torch.Tensor, position: torch.Tensor, targets: LossTargets) -> torch.Tensor:
        if self.capture != "cuda":
            return self.step(states, position, targets)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.step(states, position, targets)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture(self, flat: tuple[torch.Tensor, ...], has_target: bool) -> None:
        self.inputs = tuple(value.clone() for value in flat)
        self.has_target = has_target
        if self.capture != "cuda":
            return
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records only: the batch is run by the first replay
            self.loss = self.step(*self._static_batch())

    def _fits(self, flat: tuple[torch.Tensor, ...], has_target: bool) -> bool:
        return has_target == self.has_target and all(
            a.shape == b.shape and a.dtype == b.dtype for a, b in zip(self.inputs, flat, strict=True)
        )

    def _static_batch(self) -> tuple[torch.Tensor, torch.Tensor, LossTargets]:
        states, position, index, weight, *has = self.inputs
        return states, position, LossTargets(index, weight, has[0] if has else None)


def _flatten(states: torch.Tensor, position: torch.Tensor, targets: LossTargets) -> tuple[torch.Tensor, ...]:
    has = () if targets.has_target is None else (targets.has_target,)
    return (states, position, targets.index, targets.weight, *has)
