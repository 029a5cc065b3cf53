"""Lens-training throughput at the reference's shape, against the matrix-product floor and a plain loop.

Shape (``../shared/reference/cot-alignment-experiment.md``): hidden 2048, vocab 128,256, 16 layers,
6 positions, a ``layer`` lens, batches of 32 training states (2 samples x 16 layers). Random data:
throughput does not depend on the values. In one process and one run it measures

  (a) ctexp: training states per second of ``ctexp.lens.train.TrainStep``, the step ``train_lens`` runs,
      on batches from ``ctexp.lens.train.batches`` (slices of blocks gathered by index; all translators
      in one batched product; loss and its gradient computed with the logits, in chunks; lens
      gradients without autograd; ``ctexp.lens.update.LensUpdate`` for clipping and AdamW, ``--update``:
      auto on CPU forms a large lens's gradients block by block into torch's fused AdamW (tiled), on
      CUDA runs the compiled one-pass update; on CUDA the step replayed as a CUDA graph, ``--graph``),
      in the dtype and with the CPU threads ``train_lens`` would use (``--precision auto``;
      ``OMP_NUM_THREADS`` sets the threads);
  (b) floor: the unembedding products alone at the same batch and dtype, the logits
      ``[rows, d] @ [d, V]`` and the gradient back to the input ``[rows, V] @ [V, d]``, each in the
      fastest of the layouts tried (the unembedding as stored or transposed), into reused outputs;
  (c) reference: the straightforward version: one ``nn.Linear`` per layer called in a Python loop,
      a ``DataLoader`` over per-sample items, full float32 logits per layer and ``F.cross_entropy``,
      ``torch.optim.AdamW`` with its defaults, ``clip_grad_norm_``, ``float(loss)`` every step;
  (d) the optimizer's floor: the bytes one step must move over the lens parameters (the parameters
      and both AdamW moments, float32, each read and written once; a dense gradient is not part of
      it: ~1.61 GB for the reference's 16 translators of 2048 x 2048) at the device's copy bandwidth,
      measured here by copying a tensor of that size.

A step needs both the products and that pass, so the bound is (b) + (d). Each is warmed up, then
timed step by step; the numbers are medians. The last line is ``fraction_of_floor=<a/b>
speedup_vs_reference=<a/c> states_per_s=<a> fraction_of_bound=<(b+d)/a> bound=<products|optimizer>``
(rates, so a/b is the floor's time over ctexp's; ``bound`` names the larger part). ``--full`` also trains the reference's full size (76,800 states, 8
epochs) with ``train_lens`` and prints its wall time (the reference took 13 min 15 s; for a GPU).

    python bench/train_throughput.py                  # about a minute on 2 CPU cores
    python bench/train_throughput.py --batch-size 256
    python bench/train_throughput.py --device cuda --full
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ctexp.config import LensKind, TrainConfig
from ctexp.data.store import NormSpec, Store, StoreMeta
from ctexp.lens.graph import GRAPH_MODES, resolve_graph_mode
from ctexp.lens.head import Head
from ctexp.lens.kinds import Lens
from ctexp.lens.train import SplitTensors, TrainStep, batches, cpu_threads, resolve_dtype, train_lens, training_threads
from ctexp.lens.update import UPDATE_MODES, resolve_update_mode

HIDDEN, VOCAB, LAYERS, POSITIONS = 2048, 128_256, 16, 6
FULL_STATES, FULL_EPOCHS = 76_800, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=32, help="training states per step (as ctexp's)")
    parser.add_argument("--samples", type=int, default=None, help="samples timed per measurement (default: ~1 min)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--update", choices=UPDATE_MODES, default="auto",
                        help="(a)'s optimiser mode (ctexp.lens.update; auto: compiled on CUDA; on CPU tiled for large lenses, dense for small)")
    parser.add_argument("--graph", choices=GRAPH_MODES, default="auto",
                        help="(a) and --full replay a CUDA graph (ctexp.lens.graph; auto: on CUDA)")
    parser.add_argument("--reference-steps", type=int, default=None, help="steps of (c) to time (default: 4)")
    parser.add_argument("--full", action="store_true", help="also train 76,800 states x 8 epochs with train_lens")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--layers", type=int, default=LAYERS)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    hidden, vocab, layers = args.hidden, args.vocab, args.layers
    per_step = max(1, args.batch_size // layers)
    head = Head(random_store(hidden, vocab, layers), list(range(layers))).to(device)
    dtype = resolve_dtype(args.precision, device, head)
    default_steps = 12 if device.type == "cpu" else 50
    samples = args.samples or per_step * (default_steps + 2)
    data = random_split(max(samples, per_step * 3), layers, hidden, vocab, device)
    load = _load()
    with cpu_threads(training_threads(data, head, per_step)):  # as train_lens would run; all three alike
        _measure(args, device, head, dtype, data, per_step, load)


def _load() -> str:
    """The 1-minute load average: other processes on the cores skew every number here."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"


def _measure(args: argparse.Namespace, device: torch.device, head: Head, dtype: torch.dtype, data: SplitTensors,
             per_step: int, load: str) -> None:
    hidden, vocab, layers = args.hidden, args.vocab, args.layers
    rows = per_step * layers
    gemm = 2.0 * rows * hidden * vocab  # one unembedding product (multiply-adds x 2)
    print(f"shape: hidden {hidden}, vocab {vocab:,}, {layers} layers, {POSITIONS} positions, layer lens")
    print(f"batch: {args.batch_size} states/step -> {per_step} samples x {layers} layers = {rows} rows; "
          f"device {device}, threads {torch.get_num_threads()}, products in {str(dtype).removeprefix('torch.')}, "
          f"update {resolve_update_mode(args.update, device, layers * hidden * (hidden + 1))}, graph {resolve_graph_mode(args.graph, device)}")

    steps = max(1, len(data) // per_step - 2)
    a_time = _step_time(head, data, args, per_step, steps, device)  # (a) ctexp's step
    a_rate = rows / a_time
    print(f"(a) ctexp step:     {a_time * 1e3:9.1f} ms/step  {a_rate:10.1f} states/s  "
          f"{2 * gemm / a_time / 1e9:7.1f} GFLOP/s (unembedding products only)")
    b_time, layouts = _floor_time(head, dtype, rows, steps, device)  # (b) the floor
    b_rate = rows / b_time
    print(f"(b) floor products: {b_time * 1e3:9.1f} ms/step  {b_rate:10.1f} states/s  "
          f"{2 * gemm / b_time / 1e9:7.1f} GFLOP/s (fastest layouts: {layouts})")

    # (c) the straightforward reference.
    ref_steps = args.reference_steps or (4 if device.type == "cpu" else 20)
    c_time = _reference_time(head, data, per_step, ref_steps, device)
    c_rate = rows / c_time
    print(f"(c) reference:      {c_time * 1e3:9.1f} ms/step  {c_rate:10.1f} states/s  "
          f"{2 * gemm / c_time / 1e9:7.1f} GFLOP/s (same products, fp32)")

    d_time, bandwidth, moved = _optimizer_floor(layers, hidden, steps, device)
    print(f"(d) optimizer pass: {d_time * 1e3:9.1f} ms/step  {moved / 1e9:.2f} GB over the lens parameters "
          f"at {bandwidth / 1e9:.1f} GB/s (device copy)")
    bound = b_time + d_time
    print(f"bound (b)+(d):      {bound * 1e3:9.1f} ms/step")

    if args.full:
        _full(head, hidden, vocab, layers, args, device)
    print(f"load average (1 min) {load} before, {_load()} after; cpus {os.cpu_count()}")
    print(f"fraction_of_floor={a_rate / b_rate:.3f} speedup_vs_reference={a_rate / c_rate:.2f} states_per_s={a_rate:.1f} "
          f"fraction_of_bound={bound / a_time:.3f} bound={'products' if b_time >= d_time else 'optimizer'}")


def _step_time(head: Head, data: SplitTensors, args: argparse.Namespace, per_step: int, steps: int,
               device: torch.device) -> float:
    """(a): ``TrainStep``, the step ``train_lens`` runs, on batches as ``train_lens`` makes them."""
    lens = Lens.build(LensKind.LAYER, args.layers, POSITIONS, args.hidden).to(device)
    step = TrainStep(lens, head, data, TrainConfig(batch_size=args.batch_size), args.precision, args.update, args.graph)
    order = torch.randperm(len(data), device=device)
    full = [batch for batch in batches(data, order, per_step) if len(batch[0]) == per_step]
    return _median_time(lambda i: step(*full[i % len(full)]), steps, device)


def _floor_time(head: Head, dtype: torch.dtype, rows: int, steps: int, device: torch.device) -> tuple[float, str]:
    """(b): the two unembedding products alone, same rows and dtype: logits, and gradient to the input.

    Each product in the fastest of the layouts tried (the unembedding as stored, (V, d), or transposed
    and contiguous, (d, V); the product or its transpose), into outputs allocated once: the floor is
    what the products themselves cost, so a step that found a faster layout cannot beat it. Returns
    the time and the layouts that won.
    """
    unembed, unembed_t = head.unembed_as(dtype), head.unembed_as(dtype, transposed=True)
    vocab, hidden = unembed.shape
    x = torch.randn(rows, hidden, device=device).to(dtype)
    g = torch.randn(rows, vocab, device=device).to(dtype)
    logits = torch.empty(rows, vocab, dtype=dtype, device=device)
    grad, grad_t = (torch.empty(shape, dtype=dtype, device=device) for shape in ((rows, hidden), (hidden, rows)))
    logit_layouts = {
        "x @ U^T": lambda _: torch.mm(x, unembed.t(), out=logits),
        "x @ (U^T)": lambda _: torch.mm(x, unembed_t, out=logits),
    }
    grad_layouts = {
        "g @ U": lambda _: torch.mm(g, unembed, out=grad),
        "(U^T @ g^T)^T": lambda _: torch.mm(unembed_t, g.t(), out=grad_t),
        "g @ (U^T)^T": lambda _: torch.mm(g, unembed_t.t(), out=grad),
    }
    seconds, names = 0.0, []
    for layouts in (logit_layouts, grad_layouts):
        times = {name: _median_time(run, steps, device) for name, run in layouts.items()}
        best = min(times, key=times.__getitem__)
        seconds, names = seconds + times[best], [*names, best]
    return seconds, ", ".join(names)


def optimizer_bytes(layers: int, hidden: int) -> int:
    """Bytes one AdamW step must move over a ``layer`` lens: parameters and both moments, fp32, read and written."""
    parameters = layers * hidden * hidden + layers * hidden  # translators and biases
    return parameters * 4 * 3 * 2


def _optimizer_floor(layers: int, hidden: int, steps: int, device: torch.device) -> tuple[float, float, int]:
    """(d): seconds for the optimizer's bytes at the copy bandwidth measured now; the bandwidth; the bytes."""
    moved = optimizer_bytes(layers, hidden)
    source = torch.ones(moved // 8, dtype=torch.float32, device=device)  # a copy reads half and writes half
    target = torch.empty_like(source)
    seconds = _median_time(lambda _: target.copy_(source), max(3, steps), device)
    bandwidth = 2 * source.numel() * source.element_size() / seconds
    return moved / bandwidth, bandwidth, moved


def random_store(hidden: int, vocab: int, layers: int) -> Store:
    meta = StoreMeta(
        model="bench", n_problems=1, n_states=layers, n_positions=POSITIONS, hidden=hidden, vocab=vocab,
        dtype="float32", tokenizer="builtin", norm=NormSpec(kind="rmsnorm"), normed_states=[layers - 1],
    )
    unembed = torch.randn(vocab, hidden) / hidden**0.5
    return Store(meta, torch.empty(0), 1 + 0.1 * torch.randn(hidden), None, unembed, [])


def random_split(samples: int, layers: int, hidden: int, vocab: int, device: torch.device) -> SplitTensors:
    return SplitTensors(
        states=torch.randn(samples, layers, hidden, device=device),
        position=torch.randint(0, POSITIONS, (samples,), device=device),
        targets=torch.randint(0, vocab, (samples, 1), device=device),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(run: Callable[[int], object], steps: int, device: torch.device, warmup: int = 2) -> float:
    for i in range(warmup):
        run(i)
    _sync(device)
    times = []
    for i in range(steps):
        started = time.perf_counter()
        run(warmup + i)
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class _Items(Dataset):
    """Per-sample items, as a straightforward training script would have them."""

    def __init__(self, data: SplitTensors) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.states[i], self.data.targets[i, 0]


def _reference_time(head: Head, data: SplitTensors, per_step: int, steps: int, device: torch.device) -> float:
    """(c): one module per layer, a Python loop over layers, full fp32 logits, F.cross_entropy."""
    layers, hidden = data.states.shape[1], data.states.shape[2]
    translators = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers)).to(device)
    for linear in translators:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    optimizer = torch.optim.AdamW(translators.parameters(), lr=1e-3, weight_decay=1e-3)
    loader = DataLoader(_Items(data), batch_size=per_step, shuffle=True, drop_last=True)
    norm_weight, unembed, eps = head.norm_weight, head.unembed, head.norm_spec.eps

    def step(states: torch.Tensor, target: torch.Tensor) -> float:
        loss = 0.0
        for layer, translator in enumerate(translators):
            h = states[:, layer]
            h = h + translator(h)
            if bool(head.needs_norm[layer]):
                h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight
            logits = h @ unembed.T
            loss = loss + F.cross_entropy(logits, target)
        loss = loss / layers
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(translators.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    items = iter(loader)
    times: list[float] = []
    for i in range(steps + 1):  # the first is the warm-up
        started = time.perf_counter()
        try:
            states, target = next(items)
        except StopIteration:
            items = iter(loader)
            states, target = next(items)
        step(states.to(device), target.to(device))
        _sync(device)
        if i:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _full(head: Head, hidden: int, vocab: int, layers: int, args: argparse.Namespace, device: torch.device) -> None:
    """The reference's full size: 76,800 training states, 8 epochs, validation each epoch."""
    samples = FULL_STATES // layers
    train, val = random_split(samples, layers, hidden, vocab, device), random_split(samples // 4, layers, hidden, vocab, device)
    lens = Lens.build(LensKind.LAYER, layers, POSITIONS, hidden).to(device)
    config = TrainConfig(batch_size=args.batch_size, epochs=FULL_EPOCHS, patience=FULL_EPOCHS)
    started = time.perf_counter()
    outcome = train_lens(lens, head, train, val, config, seed=0, precision=args.precision, update=args.update,
                         graph=args.graph)
    _sync(device)
    seconds = time.perf_counter() - started
    train_seconds = sum(e.seconds for e in outcome.epochs)
    print(f"full: {FULL_STATES:,} states x {len(outcome.epochs)} epochs (+ {len(val) * layers:,} validation "
          f"states each) in {seconds:.1f} s ({FULL_STATES * len(outcome.epochs) / train_seconds:.0f} states/s "
          f"with validation; the reference took 795 s)")


if __name__ == "__main__":
    main()
