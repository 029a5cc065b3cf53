"""Crash safety and concurrency: interrupted runs end KILLED, dead ones FAILED, parallel runs all land."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SMALL_WORLD, Cli, needs_postgres

# Enough epochs that a signal reliably arrives mid-training; patience keeps it from stopping early.
LONG_RUN = ["--world-problems", "200", "--world-layers", "2", "--world-hidden", "16", "--epochs", "400",
            "--patience", "400"]


def _ctexp(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "CTEXP_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ctexp.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _query(home: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(home / "ctexp.db") as db:
        return db.execute(sql).fetchall()


def _wait_for_epochs(home: Path, process: subprocess.Popen, count: int, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if (home / "ctexp.db").exists():
            try:
                rows = _query(home, "SELECT run_id, count(*) FROM ctexp_epochs GROUP BY run_id")
            except sqlite3.OperationalError:
                rows = []
            if rows and rows[0][1] >= count:
                return rows[0][0]
        time.sleep(0.2)
    pytest.fail("the run recorded no epochs in time")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_training_ends_the_run_killed_in_both_stores(tmp_path: Path, sig: int, code: int):
    home = tmp_path / "home"
    process = _ctexp(home, "run", *LONG_RUN)
    run_id = _wait_for_epochs(home, process, 2)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert ("Error: terminated" if code == 143 else "Error: interrupted") in stderr, stderr
    assert "Traceback" not in stderr
    status, mlflow_run_id, _error = _query(home, f"SELECT status, mlflow_run_id, error FROM ctexp_runs WHERE id = '{run_id}'")[0]
    assert status == "KILLED"
    assert _query(home, f"SELECT count(*) FROM ctexp_epochs WHERE run_id = '{run_id}'")[0][0] >= 2
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    run = client.get_run(mlflow_run_id)
    assert run.info.status == "KILLED"
    # The epochs queued for MLflow's background writer were written before the run ended: nothing lost.
    epochs = _query(home, f"SELECT count(*) FROM ctexp_epochs WHERE run_id = '{run_id}'")[0][0]
    assert len(client.get_metric_history(mlflow_run_id, "val_loss")) == epochs
    assert not (home / "runs" / run_id).exists()  # no half-written run directory
    assert not [p for p in (home / "runs").glob(".*tmp*")] if (home / "runs").exists() else True


def test_a_run_whose_process_died_is_failed_by_the_next_command(tmp_path: Path):
    home = tmp_path / "home"
    process = _ctexp(home, "run", *LONG_RUN)
    run_id = _wait_for_epochs(home, process, 1)
    process.kill()  # SIGKILL: no handler runs
    process.communicate(timeout=30)
    assert _query(home, f"SELECT status FROM ctexp_runs WHERE id = '{run_id}'")[0][0] == "RUNNING"
    # Age its heartbeat past the bound instead of waiting five minutes.
    with sqlite3.connect(home / "ctexp.db") as db:
        db.execute("UPDATE ctexp_runs SET heartbeat_at = '2000-01-01 00:00:00' WHERE id = ?", (run_id,))
    runs = Cli(home).json("runs")
    assert [(r["id"], r["status"]) for r in runs] == [(run_id, "FAILED")]
    assert "heartbeat" in runs[0]["error"]


def _eight_parallel_runs(home: Path, *extra: str) -> None:
    processes = [
        _ctexp(home, "run", *SMALL_WORLD, "--epochs", "1", "--lens", "identity", "--name", f"parallel-{i}", *extra)
        for i in range(8)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr


def test_eight_parallel_runs_on_one_fresh_home_all_land(tmp_path: Path):
    home = tmp_path / "home"
    _eight_parallel_runs(home)
    rows = _query(home, "SELECT name, status FROM ctexp_runs ORDER BY name")
    assert rows == [(f"parallel-{i}", "FINISHED") for i in range(8)]
    assert _query(home, "SELECT count(*) FROM ctexp_results WHERE grouping = 'cell' AND split = 'test'")[0][0] == 8 * 3 * 6
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    experiment = client.get_experiment_by_name("default")
    assert len(client.search_runs([experiment.experiment_id])) == 8


@needs_postgres
def test_eight_parallel_runs_on_one_fresh_postgresql_database_all_land(tmp_path: Path, postgres_url: str):
    from sqlalchemy import create_engine, text

    _eight_parallel_runs(tmp_path / "home", "--db-url", postgres_url)
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT name, status FROM ctexp_runs ORDER BY name")).all()
            cells = connection.execute(text("SELECT count(*) FROM ctexp_results WHERE grouping = 'cell' AND split = 'test'")).scalar_one()
    finally:
        engine.dispose()
    assert [tuple(row) for row in rows] == [(f"parallel-{i}", "FINISHED") for i in range(8)]
    assert cells == 8 * 3 * 6


def test_mlflow_refusing_the_run_fails_it_with_one_line(cli: Cli):
    """MLflow works in the background: its refusal (here, a deleted experiment) still ends the run FAILED
    in the results database, and the command with one line and MLflow's exit code."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cli.home}/mlflow.db")
    client.delete_experiment(client.create_experiment("gone", artifact_location=(cli.home / "gone").as_uri()))
    line = cli("run", *SMALL_WORLD, "--experiment", "gone", code=9).stderr
    assert "MLflow experiment 'gone' is deleted" in line and "recorded FAILED" in line
    [(status, error)] = _query(cli.home, "SELECT status, error FROM ctexp_runs")
    assert status == "FAILED" and "is deleted" in error


def test_mlflow_failing_after_training_keeps_the_results_and_says_where(cli: Cli, monkeypatch: pytest.MonkeyPatch):
    """A write that fails after training (the run directory, on the background writer) fails the run: FAILED in
    both stores, never FINISHED without its MLflow record, and the line says where the results are."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    def refuse(*args: object, **kwargs: object) -> None:
        raise MlflowException("artifact store is full")

    monkeypatch.setattr(MlflowClient, "log_artifacts", refuse)
    line = cli("run", *SMALL_WORLD, code=9).stderr
    monkeypatch.undo()
    [(run_id, status, mlflow_run_id)] = _query(cli.home, "SELECT id, status, mlflow_run_id FROM ctexp_runs")
    assert "artifact store is full" in line and f"its results are in {cli.home.resolve() / 'runs' / run_id}" in line
    assert status == "FAILED"
    assert (cli.home / "runs" / run_id / "result.json").is_file()
    assert MlflowClient(f"sqlite:///{cli.home}/mlflow.db").get_run(mlflow_run_id).info.status == "FAILED"
