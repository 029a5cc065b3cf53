"""The notebook API reads what the CLI reads: its DataFrames hold the values of ``ctexp runs --json``,
``ctexp show --json`` and ``ctexp best --json``, and its typed objects are the run's own files.

Two small runs (a layer lens and the logit lens) on one temporary home serve the module.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from ctexp.analysis.groupings import BREAKDOWNS
from ctexp.analysis.result import RunResult
from ctexp.errors import ConfigError, RegistryError
from ctexp.lens.kinds import Lens
from ctexp.notebook import Home, open_home
from tests.conftest import SMALL_WORLD, Cli, copy_home


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    cli = Cli(tmp_path_factory.mktemp("notebook-home"))
    for lens in ("layer", "identity"):
        cli("run", *SMALL_WORLD, "--lens", lens)
    return cli


@pytest.fixture(scope="module")
def home(cli: Cli) -> Home:
    return open_home(cli.home)


def same(value: object, expected: object) -> bool:
    """A DataFrame cell against a JSON value: missing is NaN or None, datetimes in ISO form, floats close."""
    if expected is None:
        return value is None or (isinstance(value, float) and math.isnan(value))
    if isinstance(value, datetime):
        return value == pd.Timestamp(expected)
    if isinstance(expected, float):
        return value == pytest.approx(expected, rel=1e-12)
    if isinstance(expected, list):
        return list(value) == expected  # type: ignore[call-overload]
    return value == expected


def assert_frame_is(frame: pd.DataFrame, rows: list[dict]) -> None:
    assert len(frame) == len(rows)
    for (_, row), expected in zip(frame.iterrows(), rows, strict=True):
        assert set(row.index) <= set(expected)
        for column in row.index:
            assert same(row[column], expected[column]), (column, row[column], expected[column])


def test_runs_are_ctexp_runs(cli: Cli, home: Home) -> None:
    frame = home.runs()
    assert list(frame.columns) == list(cli.json("runs")[0])
    assert_frame_is(frame, cli.json("runs"))
    assert_frame_is(home.runs(lens="identity"), cli.json("runs", "--lens", "identity"))
    by_top1 = home.runs(sort="test_top1", ascending=True, limit=1)
    assert_frame_is(by_top1, cli.json("runs", "--sort", "test_top1", "--ascending", "--limit", "1"))
    assert home.runs(status="finished", since="1h")["id"].tolist() == frame["id"].tolist()
    assert home.runs(experiment="nothing-here").empty and "test_top1" in home.runs(experiment="nothing-here")


def test_a_runs_tables_are_ctexp_show(cli: Cli, home: Home) -> None:
    shown = cli.json("show", "latest")
    run = home.run("latest")
    assert run.record.to_json() == shown["run"] and run.id == shown["run"]["id"]
    assert_frame_is(run.epochs(), shown["epochs"])
    for grouping in BREAKDOWNS:
        frame = run.results(grouping.name)
        assert [axis for axis in ("layer", "position") if axis in frame] == list(grouping.keys)
        assert_frame_is(frame, shown[grouping.field])
    assert_frame_is(run.by_layer(), shown["by_layer"])
    assert_frame_is(run.by_position(), shown["by_position"])
    assert_frame_is(run.by_cell(), shown["by_cell"])


def test_baselines_and_grid_are_the_same_numbers_reshaped(cli: Cli, home: Home) -> None:
    run = home.run(cli.json("runs", "--lens", "layer")[0]["id"])
    wide = run.by_position()
    long = run.baselines("position")
    assert sorted(set(long["method"])) == ["identity", "lens", "prior"] and len(long) == 3 * len(wide)
    for _, row in wide.iterrows():
        at = long[long["position"] == row["position"]].set_index("method")
        assert at.loc["lens", "top1"] == row["top1"] and at.loc["prior", "top1"] == row["prior_top1"]
        assert at.loc["identity", "loss"] == row["identity_loss"]
    grid = run.grid()
    for _, cell in run.by_cell().iterrows():
        assert grid.loc[cell["layer"], cell["position"]] == cell["top1"]


def test_best_is_ctexp_best(cli: Cli, home: Home) -> None:
    for by in ("position", "cell"):
        assert_frame_is(home.best(by), cli.json("best", "--by", by))
    assert_frame_is(home.best("layer", "loss", lens="layer"), cli.json("best", "--by", "layer", "--metric", "loss",
                                                                        "--lens", "layer"))


def test_result_predictions_and_lens_are_the_runs_own(cli: Cli, home: Home) -> None:
    record = cli.json("runs", "--lens", "layer")[0]
    run = home.run(record["name"])
    run_dir = cli.home / "runs" / record["id"]
    assert run.result() == RunResult.model_validate_json((run_dir / "result.json").read_text())
    predictions = run.predictions()
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == len(lines) and predictions.iloc[0].to_dict() == json.loads(lines[0])
    hits = predictions.groupby("position")["hit1"].mean()
    for _, row in run.by_position().iterrows():  # the table's top-1 is the share of hits among its states
        assert hits[row["position"]] == pytest.approx(row["top1"])
    lens, spec = run.lens()
    assert isinstance(lens, Lens) and spec.kind == "layer" and spec.layers == run.result().data.layers
    assert not lens.training


def test_files_come_from_mlflow_when_the_run_directory_is_gone(cli: Cli, tmp_path: Path) -> None:
    record = cli.json("runs", "--lens", "layer")[0]
    moved = tmp_path / "home"
    copy_home(cli.home, moved)
    shutil.rmtree(moved / "runs" / record["id"])
    # A home without the run's directory, whose MLflow store (and its artifacts) still has the run.
    run = open_home(moved, tracking_uri=f"sqlite:///{cli.home}/mlflow.db").run(record["id"][:8])
    assert run.result().run_id == record["id"]
    assert len(run.predictions()) == len((cli.home / "runs" / record["id"] / "predictions.jsonl").read_text().splitlines())
    assert run.lens()[1].kind == "layer"


def test_a_database_url_opens_the_same_runs(cli: Cli, home: Home) -> None:
    by_url = open_home(f"sqlite:///{cli.home}/ctexp.db")
    assert by_url.runs()["id"].tolist() == home.runs()["id"].tolist()
    with pytest.raises(ConfigError, match="not both"):
        open_home(f"sqlite:///{cli.home}/ctexp.db", db_url=f"sqlite:///{cli.home}/ctexp.db")


def test_errors_are_ctexps_own(cli: Cli, home: Home) -> None:
    with pytest.raises(RegistryError, match="no run matches 'nope'"):
        home.run("nope")
    with pytest.raises(RegistryError, match="unknown breakdown 'step'"):
        home.run().results("step")
    with pytest.raises(RegistryError, match="cannot sort runs by 'speed'"):
        home.runs(sort="speed")
    with pytest.raises(ConfigError, match="--since 'yesterday'"):
        home.runs(since="yesterday")
    assert home.sweeps().empty and "best_value" in home.sweeps()


def test_the_readme_session_runs(cli: Cli) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Notebook API", 1)[1].split("\n## ", 1)[0]
    (session,) = re.findall(r"```python\n(.*?)\n```", section, re.DOTALL)
    assert 'open_home("mlruns")' in session
    namespace: dict = {}
    exec(session.replace('open_home("mlruns")', f"open_home({str(cli.home)!r})"), namespace)  # noqa: S102 - the docs' own code
    assert isinstance(namespace["result"], RunResult) and isinstance(namespace["lens"], Lens)
