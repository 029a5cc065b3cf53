"""What training reports after each epoch: the losses and validation top-k that early stopping,
sweeps' pruners and the registry read.

Apart from ``train`` so that reading results back (the registry, reports) does not import torch.
"""

from __future__ import annotations

from pydantic import Field

from ctexp.records import Record


class EpochMetrics(Record):
    epoch: int
    train_loss: float
    val_loss: float
    val_top1: float
    val_top5: float
    val_top10: float
    val_position_top1: dict[int, float] = Field(
        default_factory=dict, description="validation top-1 by position (not stored in SQL; kept in result.json)"
    )
    seconds: float
