"""A run whose training diverges ends FAILED with one line that names the cause, not the database."""

from __future__ import annotations

import re

import pytest
import torch

from ctexp.config import TrainConfig
from ctexp.errors import TrainingDiverged
from ctexp.lens.train import check_finite
from tests.conftest import assert_one_line_error

# On this world, lr 3e3 trains two finite epochs and goes NaN in the third (deterministic for the seed).
DIVERGING = ["--world-problems", "120", "--world-layers", "2", "--world-hidden", "16", "--epochs", "6",
             "--patience", "6", "--lr", "3e3", "--name", "diverging"]


def test_a_diverging_run_fails_with_its_cause_and_keeps_earlier_epochs(cli) -> None:
    line = assert_one_line_error(cli("run", *DIVERGING, code=11), 11, "training diverged at epoch", "--lr (now 3000)")
    epoch = int(re.search(r"epoch (\d+)", line).group(1))
    assert epoch >= 2  # so that this test sees epochs kept before the divergence
    shown = cli.json("show", "diverging")
    assert shown["run"]["status"] == "FAILED"
    assert "TrainingDiverged: training diverged" in shown["run"]["error"]
    assert [row["epoch"] for row in shown["epochs"]] == list(range(1, epoch))
    assert shown["by_position"] == [] and shown["by_cell"] == []  # nothing else half-recorded
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cli.home}/mlflow.db")
    run = client.get_run(shown["run"]["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == list(range(1, epoch))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_names_the_epoch_and_what_to_try(value: float) -> None:
    with pytest.raises(TrainingDiverged, match=r"at epoch 4: the validation loss is .*--lr \(now 0.001\)"):
        check_finite(4, "validation loss", value, TrainConfig())
    check_finite(4, "validation loss", float(torch.tensor(1.5)), TrainConfig())  # finite: nothing happens
