"""Benchmark of the registry on SQLite: cross-run queries at scale, and the cost of recording a run.

Builds a registry of 10,000 synthetic finished runs (6 positions each, rows inserted in bulk) and times
``Registry.best(by="position")`` (median of 5). Then runs a default experiment (the embedded world,
default settings) once and replays what ``ctexp run`` does to record it, in a warm process (stores
open, imports paid), median of 5 each:

- SQL: the run's row, its epochs, and its per-layer/position/cell results;
- MLflow: the run with its params and tags, per-epoch metrics, final metrics, the run directory as
  artifacts, and its status;
- figures: rendering the three PNGs (matplotlib) and logging them.

Finally it times one fresh ``ctexp run`` process on the default world (stores already created), to
show what a user waits for beyond the run itself (imports, opening the stores, printing).

    python bench/registry.py
    best_over_10000_runs_ms=...
    record_run_ms=...
    default_run_s=... record_sql_ms=... record_mlflow_ms=... figures_ms=...
    command_s=... command_run_s=...
    record_fraction_of_default_run=... with_figures=... best_over_10000_runs_ms=...

The last line is the summary: recording (SQL and MLflow) as a fraction of the default run (goal
< 0.05), the same with the figures' rendering included, and the cross-run query over 10,000 runs
(goal < 200 ms).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert

from ctexp.analysis.figures import save_figures
from ctexp.analysis.result import RunResult
from ctexp.config import ExperimentConfig, build_config
from ctexp.experiment.pipeline import run_experiment
from ctexp.registry.db import Registry
from ctexp.registry.models import Experiment, Result, Run, RunStatus, metric_column_names
from ctexp.registry.tracking.names import flatten_config
from ctexp.registry.tracking.tracker import Tracker

SMALL = {"world.problems": 120, "world.layers": 2, "world.hidden": 16, "train.epochs": 2}
LENSES = ("identity", "layer", "layer-position", "position", "global")
POSITIONS = 6
REPEATS = 5


def synthetic_runs(url: str, config: ExperimentConfig, n_runs: int, seed: int = 0) -> None:
    """Insert ``n_runs`` finished runs with per-position results straight into the tables, in bulk."""
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(days=30)
    engine = create_engine(url)
    with engine.begin() as connection:
        experiment_id = connection.execute(insert(Experiment).returning(Experiment.id), {
            "name": "bench", "config_json": config.model_dump(mode="json"), "config_hash": config.config_hash(),
            "created_at": start,
        }).scalar_one()
        runs, positions = [], []
        for index in range(n_runs):
            run_id, started = uuid.uuid4().hex, start + timedelta(seconds=index * 60)
            top1 = rng.random()
            runs.append({
                "id": run_id, "name": f"bench-{index}", "experiment_id": experiment_id, "status": RunStatus.FINISHED,
                "started_at": started, "ended_at": started + timedelta(seconds=30), "heartbeat_at": started,
                "config_json": {}, "lens": LENSES[index % len(LENSES)], "adapter": "none", "split": "uniform",
                "target": "first", "layers": "all", "positions": "all", "store_hash": "bench", "store_path": None,
                "code_version": "bench", "device": "cpu", "seed": index, "test_top1": top1, "test_loss": 5 - top1,
            })
            positions += [position_row(run_id, position, rng) for position in range(POSITIONS)]
        connection.execute(insert(Run), runs)
        connection.execute(insert(Result), positions)
    engine.dispose()


def position_row(run_id: str, position: int, rng: random.Random) -> dict[str, Any]:
    row: dict[str, Any] = {name: rng.random() for name in metric_column_names()}
    row |= {"run_id": run_id, "split": "test", "grouping": "position", "group_key": f"position={position}",
            "layer": None, "position": position, "n": 400, "problems": 60}
    row["top1_low"], row["top1_high"] = row["top1"] - 0.05, row["top1"] + 0.05
    return row


def median_ms(work: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def record_run(registry: Registry, config: ExperimentConfig, result: RunResult) -> None:
    """What ``ctexp run`` does with the registry for one run."""
    run = result.model_copy(update={"run_id": uuid.uuid4().hex})
    registry.start_run(run.run_id, run.name, config, store_hash=run.store.content_hash, store_path=None,
                       device=run.device, code_version="bench")
    for epoch in run.epochs:
        registry.record_epoch(run.run_id, epoch)
    registry.finish_run(run)


def start_mlflow_run(tracker: Tracker, config: ExperimentConfig, result: RunResult) -> str:
    return tracker.start_run(
        experiment="bench", run_name=result.name, ctexp_run_id=uuid.uuid4().hex,
        params=flatten_config(config.model_dump(mode="json")), tags={},
    )


def record_in_mlflow(tracker: Tracker, config: ExperimentConfig, result: RunResult, run_dir: Path) -> None:
    """What ``ctexp run`` does with MLflow for one run, but the figures: start, epochs, results, status."""
    mlflow_run_id = start_mlflow_run(tracker, config, result)
    for epoch in result.epochs:
        tracker.log_epoch(mlflow_run_id, epoch)
    tracker.log_results(mlflow_run_id, result, run_dir)
    tracker.set_status(mlflow_run_id, "FINISHED")


def render_and_log_figures(tracker: Tracker, mlflow_run_id: str, result: RunResult) -> None:
    """What the recorder does with a run's figures: render the three PNGs, hand them to MLflow."""
    with tempfile.TemporaryDirectory(prefix="ctexp-bench-figures-") as scratch:
        tracker.log_figures(mlflow_run_id, save_figures(result, Path(scratch)))


def fresh_command(home: Path) -> tuple[float, float]:
    """Wall seconds of one ``ctexp run --json`` process on the default world, and its run's own seconds."""
    command = [sys.executable, "-c", "from ctexp.cli import main; main()", "run", "--json", "--home", str(home)]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, json.loads(finished.stdout)["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000, help="synthetic runs (default 10000)")
    args = parser.parse_args(argv)

    config = build_config(None, SMALL)
    with tempfile.TemporaryDirectory(prefix="ctexp-bench-") as scratch:
        url = f"sqlite:///{Path(scratch) / 'ctexp.db'}"
        started = time.perf_counter()
        with Registry(url) as registry:
            synthetic_runs(url, config, args.runs)
            setup_s = time.perf_counter() - started
            best = registry.best(by="position")
            assert len(best) == POSITIONS, best
            best_ms = median_ms(lambda: registry.best(by="position"))

            result = run_experiment(config, home=Path(scratch) / "home")
            record_ms = median_ms(lambda: record_run(registry, config, result))

            # The registry's cost beside a default run (the embedded world, default settings).
            default = build_config(None, {})
            home = Path(scratch) / "default-home"
            started = time.perf_counter()
            default_result = run_experiment(default, home=home)
            default_run_s = time.perf_counter() - started
            tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}")
            tracker.warm_up()  # imports and schema creation: once per process, not per run
            save_figures(default_result, Path(scratch) / "warm-figures")  # matplotlib's import and font cache
            run_dir = home / "runs" / default_result.run_id
            sql_ms = median_ms(lambda: record_run(registry, default, default_result))
            mlflow_ms = median_ms(lambda: record_in_mlflow(tracker, default, default_result, run_dir))
            figures_run = start_mlflow_run(tracker, default, default_result)
            figures_ms = median_ms(lambda: render_and_log_figures(tracker, figures_run, default_result))
            fresh_command(home)  # the first command in a home creates nothing more, but warms the disk cache
            command_s, command_run_s = fresh_command(home)
    record_s = (sql_ms + mlflow_ms) / 1000
    print(f"setup_{args.runs}_runs_s={setup_s:.1f}")
    print(f"best_over_{args.runs}_runs_ms={best_ms:.1f}")
    print(f"record_run_ms={record_ms:.1f}")
    print(f"default_run_s={default_run_s:.2f} record_sql_ms={sql_ms:.1f} record_mlflow_ms={mlflow_ms:.1f} "
          f"figures_ms={figures_ms:.1f}")
    print(f"command_s={command_s:.2f} command_run_s={command_run_s:.2f}")
    with_figures = (record_s + figures_ms / 1000) / default_run_s
    print(f"record_fraction_of_default_run={record_s / default_run_s:.3f} with_figures={with_figures:.3f} "
          f"best_over_{args.runs}_runs_ms={best_ms:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
