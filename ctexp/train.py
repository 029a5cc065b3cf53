"""The training loop: one for every lens kind, used by ``ctexp run`` and by sweeps.

AdamW, gradient-norm clipping, early stopping on validation loss with patience, and the best
checkpoint (lowest validation loss) restored at the end. ``TrainConfig.batch_size`` counts training
states, as in the reference: a step takes ``max(1, batch_size // n_layers)`` samples, each scored at
every selected layer.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ctexp.config import TrainConfig
from ctexp.lens import Head, Lens, scores
from ctexp.result import EpochMetrics

EVAL_BATCH_STATES = 8192


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


def evaluate_split(lens: Lens, head: Head, data: SplitTensors) -> dict[str, torch.Tensor]:
    """Scores of every state of a split, in large no-grad batches (see ``lens.scores``)."""
    lens.eval()
    per_batch = max(1, EVAL_BATCH_STATES // max(1, data.states.shape[1]))
    parts: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, len(data), per_batch):
            window = slice(start, start + per_batch)
            logits = head(lens(data.states[window], data.position[window]))
            parts.append(scores(logits, data.targets[window]))
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


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
) -> TrainOutcome:
    """Train ``lens`` in place; on return it holds the best epoch's weights.

    ``on_epoch`` is called after each epoch; it may raise ``StopTraining`` to end early.
    """
    if not lens.trainable:
        return TrainOutcome(epochs=[], best_epoch=None, stopped_early=False)
    optimizer = torch.optim.AdamW(lens.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    per_step = max(1, config.batch_size // train.states.shape[1])
    best_loss, best_state, best_epoch = float("inf"), copy.deepcopy(lens.state_dict()), None
    history: list[EpochMetrics] = []
    stale, stopped = 0, False
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        lens.train()
        order = torch.randperm(len(train), generator=generator).to(train.states.device)
        total, count = 0.0, 0
        for start in range(0, len(train), per_step):
            batch = order[start : start + per_step]
            logits = head(lens(train.states[batch], train.position[batch]))  # (b, L, V)
            loss = scores(logits, train.targets[batch], k=1)["loss"].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lens.parameters(), config.clip)
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        val_summary = summary(evaluate_split(lens, head, val))
        record = EpochMetrics(
            epoch=epoch,
            train_loss=total / count,
            val_loss=val_summary["loss"],
            val_top1=val_summary["top1"],
            val_top5=val_summary["top5"],
            val_top10=val_summary["top10"],
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
