"""Does the fast lens step train as the plain one on this device? A check for a GPU session, not a bench.

Trains two copies of a ``layer`` lens from the same start on the same batches for ``--steps`` steps:
one with dense gradients, torch's fused AdamW and no graph (``update=dense, graph=off``), one as
``train_lens`` would on the device (``--update``, ``--graph``; on CUDA: the compiled one-pass update
replayed as a CUDA graph). Prints the largest relative difference of any parameter tensor and of the
losses; the last line is ``step_equivalence max_relative_difference=<x> max_loss_difference=<y>``.
In float32 products (``--precision fp32``) both should be within ~1e-5.

    python bench/step_equivalence.py --device cuda
    python bench/step_equivalence.py --hidden 64 --vocab 500 --update plain --graph static   # on a CPU
"""

from __future__ import annotations

import argparse
import copy

import torch
from train_throughput import POSITIONS, random_split, random_store

from ctexp.config import LensKind, TrainConfig
from ctexp.lens.graph import GRAPH_MODES
from ctexp.lens.head import Head
from ctexp.lens.kinds import Lens
from ctexp.lens.train import TrainStep, batches
from ctexp.lens.update import UPDATE_MODES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="steps (the first 3 are the graph's warm-up)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="fp32")
    parser.add_argument("--update", choices=UPDATE_MODES, default="auto")
    parser.add_argument("--graph", choices=GRAPH_MODES, default="auto")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    head = Head(random_store(args.hidden, args.vocab, args.layers), list(range(args.layers))).to(device)
    per_step = max(1, args.batch_size // args.layers)
    data = random_split(per_step * args.steps, args.layers, args.hidden, args.vocab, device)
    plain = Lens.build(LensKind.LAYER, args.layers, POSITIONS, args.hidden).to(device)
    with torch.no_grad():  # away from zero, so that weight decay and every gradient term count
        for p in plain.parameters():
            p.copy_(0.01 * torch.randn_like(p))
    fast = copy.deepcopy(plain)
    config = TrainConfig(batch_size=args.batch_size, lr=1e-3, clip=0.5)
    plain_step = TrainStep(plain, head, data, config, args.precision, update="dense", graph="off")
    fast_step = TrainStep(fast, head, data, config, args.precision, update=args.update, graph=args.graph)
    order = torch.arange(len(data), device=device)
    loss_difference = 0.0
    for states, position, targets in batches(data, order, per_step):
        want = plain_step(states, position, targets)
        got = fast_step(states, position, targets)
        loss_difference = max(loss_difference, abs(float(got) - float(want)))
    worst = max(
        float((a - b).detach().norm() / b.detach().norm().clamp(min=1e-30))
        for a, b in zip(fast.parameters(), plain.parameters(), strict=True)
    )
    print(f"{args.steps} steps on {device}: update {fast_step.update.mode}, graph "
          f"{'on' if fast_step.graphed is not None else 'off'} against dense/off, products {args.precision}")
    print(f"step_equivalence max_relative_difference={worst:.3g} max_loss_difference={loss_difference:.3g}")


if __name__ == "__main__":
    main()
