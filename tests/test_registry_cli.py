"""The registry through the CLI: runs land in SQL and MLflow, and every registry command answers from them."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import SMALL_WORLD, Cli

STATES, POSITIONS = 3, 6


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with two finished runs of different lenses (module-scoped: MLflow's schema is slow to create)."""
    home = tmp_path_factory.mktemp("registry-home")
    cli = Cli(home)
    cli("run", *SMALL_WORLD, "--lens", "layer", "--name", "first", "--experiment", "reg")
    cli("run", *SMALL_WORLD, "--lens", "layer-position", "--name", "second", "--experiment", "reg")
    return home


@pytest.fixture
def reg(home: Path) -> Cli:
    return Cli(home)


def test_plain_sql_returns_both_runs_and_every_cell(home: Path):
    with sqlite3.connect(home / "ctexp.db") as db:
        runs = db.execute("SELECT name, lens, status FROM ctexp_runs ORDER BY started_at").fetchall()
        assert runs == [("first", "layer", "FINISHED"), ("second", "layer-position", "FINISHED")]
        cells = db.execute(
            "SELECT r.name, count(*) FROM ctexp_results c JOIN ctexp_runs r ON r.id = c.run_id "
            "WHERE c.grouping = 'cell' GROUP BY r.name"
        ).fetchall()
        assert sorted(cells) == [("first", STATES * POSITIONS), ("second", STATES * POSITIONS)]
        by_position = db.execute(
            "SELECT position, count(*) FROM ctexp_results WHERE grouping = 'position' GROUP BY position ORDER BY position"
        ).fetchall()
        assert by_position == [(p, 2) for p in range(POSITIONS)]
        assert db.execute("SELECT count(*) FROM ctexp_epochs").fetchone()[0] >= 2
        experiments = db.execute("SELECT DISTINCT name FROM ctexp_experiments").fetchall()
        assert experiments == [("reg",)]


def test_sql_rows_equal_the_run_result(home: Path):
    run_dir = next(p for p in (home / "runs").iterdir() if json.loads((p / "result.json").read_text())["name"] == "first")
    result = json.loads((run_dir / "result.json").read_text())
    with sqlite3.connect(home / "ctexp.db") as db:
        rows = db.execute(
            "SELECT position, n, top1, top1_low, top1_high, prior_top1, identity_top1 FROM ctexp_results "
            "WHERE run_id = ? AND grouping = 'position' ORDER BY position", (result["run_id"],)
        ).fetchall()
    for row, expected in zip(rows, result["by_position"], strict=True):
        assert row[0] == expected["position"] and row[1] == expected["n"]
        assert row[2] == pytest.approx(expected["top1"])
        assert (row[3], row[4]) == pytest.approx(tuple(expected["ci"]["top1"]))
        assert row[5] == pytest.approx(expected["prior_top1"]) and row[6] == pytest.approx(expected["identity_top1"])


def test_mlflow_holds_both_runs_with_metrics_and_figures(home: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    experiment = client.get_experiment_by_name("reg")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["first", "second"]
    with sqlite3.connect(home / "ctexp.db") as db:
        linked = dict(db.execute("SELECT mlflow_run_id, id FROM ctexp_runs").fetchall())
    for run in runs:
        assert run.data.tags["ctexp.run_id"] == linked[run.info.run_id]
        assert 0 <= run.data.metrics["test/top1"] <= 1
        assert "position3/top1" in run.data.metrics and "layer2/top1" in run.data.metrics
        assert run.data.params["train.lr"] == "0.001"
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        figures = {f.path for f in client.list_artifacts(run.info.run_id, "figures")}
        assert {"figures/layer_position_top1.png", "figures/position_top1.png", "figures/training_curves.png"} <= figures


def test_runs_lists_filters_and_sorts(reg: Cli):
    listed = reg.json("runs")
    assert [r["name"] for r in listed] == ["second", "first"]  # newest first
    for key in ("id", "name", "status", "lens", "split", "target", "sweep_id", "trial_number", "mlflow_run_id",
                "test_top1"):
        assert key in listed[0]
    assert [r["name"] for r in reg.json("runs", "--lens", "layer")] == ["first"]
    assert reg.json("runs", "--status", "failed") == []
    assert len(reg.json("runs", "--since", "1h")) == 2
    ordered = reg.json("runs", "--sort", "test_top1", "--ascending")
    assert [r["test_top1"] for r in ordered] == sorted(r["test_top1"] for r in ordered)
    assert "first" in reg("runs").stdout


def test_show_resolves_every_kind_of_reference(reg: Cli):
    latest = reg.json("show", "latest")
    assert latest["run"]["name"] == "second"
    run_id, mlflow_id = latest["run"]["id"], latest["run"]["mlflow_run_id"]
    for ref in (run_id, run_id[:8], "second", mlflow_id):
        assert reg.json("show", ref)["run"]["id"] == run_id
    assert len(latest["by_cell"]) == STATES * POSITIONS
    text = reg("show", "first").stdout
    assert "Performance by position" in text and "Training progress" in text


def test_best_answers_per_position(reg: Cli):
    rows = reg.json("best", "--by", "position")
    assert [row["position"] for row in rows] == list(range(POSITIONS))
    by_name = {r["name"]: r["id"] for r in reg.json("runs")}
    for row in rows:
        shown = reg.json("show", row["run_id"])
        value = next(p["top1"] for p in shown["by_position"] if p["position"] == row["position"])
        other = by_name["first"] if row["run_id"] == by_name["second"] else by_name["second"]
        rival = next(p["top1"] for p in reg.json("show", other)["by_position"] if p["position"] == row["position"])
        assert value == row["value"] and value >= (rival or 0)
    assert len(reg.json("best", "--by", "cell")) == STATES * POSITIONS
    assert "Best run by layer" in reg("best", "--by", "layer", "--metric", "loss").stdout


def test_report_regenerates_the_reference_tables_from_the_database(reg: Cli, tmp_path: Path):
    out = tmp_path / "report.md"
    reg("report", "first", "--out", str(out))
    text = out.read_text()
    for heading in ("## Executive Summary", "### Training Progress", "### Performance by Layer",
                    "### Performance by Position", "### Observations", "### Sample Predictions"):
        assert heading in text
    shown = reg.json("show", "first")
    for row in shown["by_position"]:
        if row["top1"] is not None:
            assert f"{100 * row['top1']:.2f}%" in text
    assert (tmp_path / "position_top1.png").read_bytes()[:4] == b"\x89PNG"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{reg.home}/mlflow.db")
    assert "report/report.md" in {f.path for f in client.list_artifacts(shown["run"]["mlflow_run_id"], "report")}


def test_report_without_figures_writes_the_markdown_alone(reg: Cli, tmp_path: Path):
    out = tmp_path / "quick.md"
    assert f"wrote {out}" in reg("report", "second", "--out", str(out), "--no-figures").stdout
    text = out.read_text()
    assert "### Performance by Position" in text and "## Figures" not in text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["quick.md"]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{reg.home}/mlflow.db")
    assert client.list_artifacts(reg.json("show", "second")["run"]["mlflow_run_id"], "report") == []


def test_unknown_and_ambiguous_runs_are_one_line(reg: Cli):
    reg("show", "no-such-run", code=8)
    reg("report", "no-such-run", code=8)
    reg("delete", "no-such-run", "--yes", code=8)


def test_db_current_and_upgrade(reg: Cli, tmp_path: Path):
    current = json.loads(reg("db", "current", "--json").stdout)
    assert current["current"] == current["head"]
    fresh = f"sqlite:///{tmp_path}/fresh.db"
    assert "empty" in reg("db", "current", "--db-url", fresh).stdout
    assert "schema at revision" in reg("db", "upgrade", "--db-url", fresh).stdout
    assert "up to date" in reg("db", "current", "--db-url", fresh).stdout


def test_unreachable_database_fails_before_training(cli: Cli):
    result = cli("run", *SMALL_WORLD, "--db-url", "postgresql+psycopg://user:secret@127.0.0.1:1/x", code=8)
    assert "secret" not in result.stderr
    assert cli.run_dirs() == []


def test_unreachable_tracking_server_fails_before_training(cli: Cli):
    started = time.monotonic()
    result = cli("run", *SMALL_WORLD, "--tracking-uri", "http://user:secret@127.0.0.1:9", code=9)
    assert time.monotonic() - started < 15
    assert "secret" not in result.stderr and "Training" not in result.stdout
    assert cli.run_dirs() == []
    with sqlite3.connect(cli.home / "ctexp.db") as db:
        assert db.execute("SELECT count(*) FROM ctexp_runs").fetchone()[0] == 0


def test_delete_removes_the_run_everywhere(tmp_path: Path):
    cli = Cli(tmp_path / "home")
    out = cli.json("run", *SMALL_WORLD, "--lens", "identity", "--name", "doomed")
    cli("delete", "doomed", "--yes")
    cli("show", "doomed", code=8)
    assert cli.run_dirs() == []
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cli.home}/mlflow.db")
    assert client.search_runs(
        [client.get_experiment_by_name("default").experiment_id], f"tags.`ctexp.run_id` = '{out['run_id']}'"
    ) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ui_serves_the_runs_over_http_on_loopback(home: Path):
    port = _free_port()
    env = {**os.environ, "CTEXP_HOME": str(home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "ctexp.cli", "ui", "--port", str(port)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=reg"
        deadline = time.monotonic() + 90
        body = None
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    body = json.loads(response.read())
            except OSError:
                if process.poll() is not None:
                    pytest.fail(process.stderr.read().decode()[-2000:])
                time.sleep(0.5)
        assert body is not None, "the MLflow UI did not answer within 90 s"
        experiment_id = body["experiment"]["experiment_id"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            runs = json.loads(response.read())["runs"]
        assert sorted(run["info"]["run_name"] for run in runs) == ["first", "second"]
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=20)
