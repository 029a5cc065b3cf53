"""The training loop: one for every lens kind, used by ``ctexp run`` and by sweeps.

AdamW, gradient-norm clipping, early stopping on validation loss with patience, and the best
checkpoint (lowest validation loss) restored at the end. ``TrainConfig.batch_size`` counts training
states, as in the reference: a step takes ``max(1, batch_size // n_layers)`` samples, each scored at
every selected layer.

A step (``TrainStep``) does no Python work per layer, position or sample: batches are slices of
blocks gathered by index from the split resident on the device (``batches``), the lens applies all
its translators in one batched product, the loss against the frozen head and its gradient come from
``head.head_loss_and_grad`` (chunked; the two unembedding products per step are the only large
ones), and ``ctexp.lens.update.LensUpdate`` turns the gradient at the lens output into parameter
updates: clipping, weight decay and AdamW (on CPU torch's fused AdamW, over dense gradients for
small lenses and over gradient blocks formed in cache for large ones; on CUDA one compiled pass that
forms each translator's gradient from its thin factors where it is used). The loss's large
temporaries live in a ``Scratch`` the step keeps. The unembedding products run in bfloat16 where
that is faster (``resolve_dtype``: CUDA; CPUs with native bf16 and a large head) with float32
softmax; translators, norm, master weights and optimizer stay float32. Nothing in a step waits for
the device: the epoch's training loss is summed on the device and read once per epoch. Top-k is
computed only in evaluation. Small steps on CPU run on one thread (``training_threads``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ctexp.config import TrainConfig
from ctexp.errors import TrainingDiverged
from ctexp.lens.graph import GraphedStep, resolve_graph_mode
from ctexp.lens.head import Head, LossTargets, Scratch, head_loss_and_grad, scores
from ctexp.lens.kinds import Lens
from ctexp.lens.metrics import EpochMetrics
from ctexp.lens.update import FusedAdamW, LensUpdate

__all__ = ["FusedAdamW", "SplitTensors", "TrainStep", "batches", "evaluate_split", "train_lens"]

EVAL_BATCH_STATES = 8192  # at most this many states per evaluation batch ...
EVAL_LOGIT_ELEMENTS = 1 << 26  # ... and at most this many [states, vocab] logits at once (256 MiB in fp32)
# On CUDA both bounds grow with the device's free memory: logits of at most 1/EVAL_MEMORY_SHARE of it
# (``scores`` holds about three [states, vocab] float32 tensors at once), up to EVAL_MAX_LOGIT_ELEMENTS.
EVAL_MEMORY_SHARE = 16
EVAL_MAX_LOGIT_ELEMENTS = 1 << 30
# On CPUs with native bf16 products, bf16 pays off from heads of about 0.5M elements (hidden x vocab):
# a whole step, 32 states, 1 thread, AMD Zen 4: 64 x 1,586 (the default world) 0.55 ms fp32 / 0.57 ms
# bf16; 128 x 8,000 3.8 / 2.3 ms; 2,048 x 32,000 280 / 178 ms; 2,048 x 128,256 860 / 491 ms. Below,
# the conversions cost what the products save; the default world stays float32 (and its numbers as
# they were). bf16 training of the default world was checked equal too: test top-1 28.89% vs 28.92%.
CPU_BF16_MIN_HEAD_ELEMENTS = 1 << 20
PRECISIONS = ("auto", "fp32", "bf16")
GATHER_BLOCK_BYTES = 1 << 25  # training samples are gathered by index this many bytes of states at a time
# On CPU, a step smaller than this (rows x hidden x vocab multiply-adds of one unembedding product)
# runs on one thread: at such sizes a second thread saves little, and when another process holds a
# core every parallel region waits for it (measured: default world, 2 threads, a busy second core,
# 7-17 ms a step against 1.3 ms on one thread).
CPU_SINGLE_THREAD_MACS = 1 << 26


@dataclass(frozen=True)
class SplitTensors:
    """One split resident on the device."""

    states: torch.Tensor  # (S, L, d)
    position: torch.Tensor  # (S,)
    targets: torch.Tensor  # (S, K)

    def __len__(self) -> int:
        return int(self.states.shape[0])


@dataclass(frozen=True)
class TrainOutcome:
    epochs: list[EpochMetrics]
    best_epoch: int | None
    stopped_early: bool


class StopTraining(Exception):
    """Raised by an epoch callback to end training now (a sweep pruner, for instance)."""


def resolve_dtype(precision: str, device: torch.device, head: Head) -> torch.dtype:
    """The dtype of the training step's unembedding products.

    ``fp32`` and ``bf16`` are what they say; ``auto`` is bf16 on CUDA devices that support it, and on
    CPUs with native bf16 products (AVX512-BF16, AMX) for heads of at least
    ``CPU_BF16_MIN_HEAD_ELEMENTS`` elements, where it was measured faster; float32 otherwise.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and head.unembed.numel() >= CPU_BF16_MIN_HEAD_ELEMENTS and _cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def _cpu_has_bf16() -> bool:
    """Native bf16 products (AVX512-BF16 or AMX); elsewhere oneDNN emulates them, slower than fp32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    try:
        return any(check is not None and bool(check()) for check in checks)
    except RuntimeError:
        return False


class TrainStep:
    """One optimiser step of ``train_lens`` (what the bench times, too).

    ``head.head_loss_and_grad`` gives the batch's mean loss and its gradient with respect to the
    lens outputs, ``LensUpdate`` (mode ``update``: ``ctexp.lens.update``) clips and updates from it
    (with the kind's hand-written backward where it has one, no autograd graph: at small shapes its
    bookkeeping costs more than the arithmetic; else by autograd).
    Returns the mean loss as a device tensor: nothing in a step waits for the device.
    """

    def __init__(
        self, lens: Lens, head: Head, data: SplitTensors, config: TrainConfig, precision: str = "auto",
        update: str = "auto", graph: str = "auto",
    ) -> None:
        self.lens, self.head = lens, head
        self.dtype = resolve_dtype(precision, data.states.device, head)
        self.update = LensUpdate(lens, config, update)
        self.scratch = Scratch()  # the loss's large temporaries, allocated once (see Scratch)
        if graph == "auto" and not lens.has_fast_backward():
            graph = "off"  # autograd's graph in a captured step: possible, but nothing here has tried it
        graph = resolve_graph_mode(graph, data.states.device)
        self.graphed = GraphedStep(self.eager, graph) if graph != "off" else None

    def __call__(self, states: torch.Tensor, position: torch.Tensor, targets: LossTargets) -> torch.Tensor:
        """One step; on CUDA a replayed graph for batches of the captured shape (``ctexp.lens.graph``)."""
        if self.graphed is not None:
            return self.graphed(states, position, targets)
        return self.eager(states, position, targets)

    def eager(self, states: torch.Tensor, position: torch.Tensor, targets: LossTargets) -> torch.Tensor:
        """The step as it is, op by op."""
        with torch.no_grad():
            h = self.lens(states, position)
            loss, grad = head_loss_and_grad(h, self.head, targets, self.dtype, mean=True, scratch=self.scratch)
            self.update(states, position, grad)
        return loss


def batches(data: SplitTensors, order: torch.Tensor, per_step: int, targets: LossTargets | None = None):
    """The batches of an epoch, in ``order``: (states, position, targets) of ``per_step`` samples each.

    Samples are gathered by index in blocks of many steps (one indexing per block, bounded to
    ``GATHER_BLOCK_BYTES`` of states) and each step takes a slice, so a step does no indexing.
    """
    targets = targets if targets is not None else LossTargets.of(data.targets)
    sample_bytes = max(1, data.states[0].numel() * data.states.element_size())
    block = per_step * max(1, GATHER_BLOCK_BYTES // (sample_bytes * per_step))
    for first in range(0, len(order), block):
        index = order[first : first + block]
        states, position = data.states.index_select(0, index), data.position.index_select(0, index)
        chosen = targets.select(index)
        for start in range(0, len(index), per_step):
            window = slice(start, start + per_step)
            has = None if chosen.has_target is None else chosen.has_target[window]
            yield states[window], position[window], LossTargets(chosen.index[window], chosen.weight[window], has)


def evaluate_split(lens: Lens, head: Head, data: SplitTensors) -> dict[str, torch.Tensor]:
    """Scores of every state of a split, in large no-grad float32 batches (see ``head.scores``).

    Batches are sized from the device (``eval_batch_samples``), whatever the training batch size.
    """
    lens.eval()
    per_batch = eval_batch_samples(data.states.shape[1], head.vocab, data.states.device)
    parts: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, len(data), per_batch):
            window = slice(start, start + per_batch)
            logits = head(lens(data.states[window], data.position[window]))
            parts.append(scores(logits, data.targets[window]))
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def eval_batch_samples(n_layers: int, vocab: int, device: torch.device, free_bytes: int | None = None) -> int:
    """Samples per evaluation batch: bounded in states and in logits held at once.

    ``EVAL_BATCH_STATES`` states and ``EVAL_LOGIT_ELEMENTS`` logits; on CUDA, more where the device's
    free memory (``free_bytes``, else asked of the device) allows: logits of up to
    1/``EVAL_MEMORY_SHARE`` of it, at most ``EVAL_MAX_LOGIT_ELEMENTS``.
    """
    n_layers = max(1, n_layers)
    states, logits = EVAL_BATCH_STATES, EVAL_LOGIT_ELEMENTS
    if device.type == "cuda":
        free = free_bytes if free_bytes is not None else torch.cuda.mem_get_info(device)[0]
        logits = max(logits, min(EVAL_MAX_LOGIT_ELEMENTS, free // (4 * EVAL_MEMORY_SHARE)))
        states = max(states, logits // max(1, vocab))
    return max(1, min(states // n_layers, logits // (n_layers * max(1, vocab))))


def position_top1(result: dict[str, torch.Tensor], position: torch.Tensor) -> dict[int, float]:
    """Mean top-1 of each position over its states (all layers), e.g. for a position-restricted objective."""
    hits = result["hit1"].float().mean(1)  # (S,)
    return {int(p): float(hits[position == p].mean()) for p in torch.unique(position).tolist()}


def summary(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {
        "loss": float(result["loss"].mean()),
        "top1": float(result["hit1"].float().mean()),
        "top5": float(result["hit5"].float().mean()),
        "top10": float(result["hit10"].float().mean()),
    }


def train_lens(
    lens: Lens,
    head: Head,
    train: SplitTensors,
    val: SplitTensors,
    config: TrainConfig,
    seed: int,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    precision: str = "auto",
    update: str = "auto",
    graph: str = "auto",
) -> TrainOutcome:
    """Train ``lens`` in place; on return it holds the best epoch's weights.

    ``on_epoch`` is called after each epoch; it may raise ``StopTraining`` to end early.
    ``precision`` (``auto|fp32|bf16``) picks the dtype of the unembedding products (``resolve_dtype``);
    ``update`` the optimiser's mode (``ctexp.lens.update.UPDATE_MODES``); ``graph`` whether full
    batches replay a CUDA graph (``ctexp.lens.graph.GRAPH_MODES``; auto: on CUDA).
    """
    if not lens.trainable:
        return TrainOutcome(epochs=[], best_epoch=None, stopped_early=False)
    step = TrainStep(lens, head, train, config, precision, update, graph)
    targets = LossTargets.of(train.targets)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    per_step = max(1, config.batch_size // train.states.shape[1])
    with cpu_threads(training_threads(train, head, per_step)):
        return _train_epochs(lens, head, train, val, config, step, targets, generator, per_step, on_epoch)


def check_finite(epoch: int, what: str, value: float, config: TrainConfig) -> None:
    """Stop a diverged run with one line that says where it went non-finite and what to try.

    The epochs before it were reported (and recorded) already; this one is not, since its numbers mean nothing.

    Raises:
        TrainingDiverged: ``value`` is NaN or infinite.
    """
    if math.isfinite(value):
        return
    raise TrainingDiverged(
        f"training diverged at epoch {epoch}: the {what} is {value}; try a smaller --lr (now {config.lr:g}) "
        f"or --clip (now {config.clip:g}), and check the store for extreme activations"
    )


def training_threads(data: SplitTensors, head: Head, per_step: int) -> int | None:
    """The intra-op threads ``train_lens`` trains with: 1 for small steps on CPU, else None (as set).

    Small: one unembedding product of under ``CPU_SINGLE_THREAD_MACS`` multiply-adds.
    """
    macs = per_step * data.states.shape[1] * data.states.shape[2] * head.vocab
    return 1 if data.states.device.type == "cpu" and macs < CPU_SINGLE_THREAD_MACS else None


@contextmanager
def cpu_threads(threads: int | None):
    """Run the block with at most ``threads`` intra-op CPU threads (None: as it is), then restore."""
    before = torch.get_num_threads()
    if threads is None or threads >= before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_epochs(
    lens: Lens, head: Head, train: SplitTensors, val: SplitTensors, config: TrainConfig, step: TrainStep,
    targets: LossTargets, generator: torch.Generator, per_step: int,
    on_epoch: Callable[[EpochMetrics], None] | None,
) -> TrainOutcome:
    best_loss, best_state, best_epoch = float("inf"), copy.deepcopy(lens.state_dict()), None
    history: list[EpochMetrics] = []
    stale, stopped = 0, False
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        lens.train()
        order = torch.randperm(len(train), generator=generator).to(train.states.device)
        total = torch.zeros((), device=train.states.device)
        for states, position, batch_targets in batches(train, order, per_step, targets):
            total.add_(step(states, position, batch_targets), alpha=len(states))
        train_loss = float(total) / len(train)  # one host sync per epoch, none per step
        check_finite(epoch, "training loss", train_loss, config)
        val_scores = evaluate_split(lens, head, val)
        val_summary = summary(val_scores)
        check_finite(epoch, "validation loss", val_summary["loss"], config)
        record = EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=val_summary["loss"],
            val_top1=val_summary["top1"],
            val_top5=val_summary["top5"],
            val_top10=val_summary["top10"],
            val_position_top1=position_top1(val_scores, val.position),
            seconds=time.perf_counter() - started,
        )
        history.append(record)
        if record.val_loss < best_loss:
            best_loss, best_state, best_epoch, stale = record.val_loss, copy.deepcopy(lens.state_dict()), epoch, 0
        else:
            stale += 1
        try:
            if on_epoch is not None:
                on_epoch(record)
        except StopTraining:
            stopped = True
            break
        if stale >= config.patience:
            stopped = True
            break
    lens.load_state_dict(best_state)
    return TrainOutcome(epochs=history, best_epoch=best_epoch, stopped_early=stopped)
