"""Benchmark of the SQL results registry on SQLite: cross-run queries at scale, and recording one run.

Builds a registry of 10,000 synthetic finished runs (6 positions each, rows inserted in bulk), times
``Registry.best(by="position")`` (median of 5), then times recording a small real run (start_run, its
epochs, finish_run; median of 5). Prints ``key=value`` lines:

    python bench/registry.py
    best_over_10000_runs_ms=...
    record_run_ms=...
    default_run_s=... record_default_sql_ms=... record_default_mlflow_ms=...
    record_fraction_of_default_run=... best_over_10000_runs_ms=...

The last line is the summary: recording a default run in both stores (SQL, and MLflow with its
metrics, artifacts and figures; warm process) as a fraction of the run itself (goal < 0.05), and the
cross-run query over 10,000 runs (goal < 200 ms).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert

from ctexp.config import ExperimentConfig, build_config
from ctexp.experiment import run_experiment
from ctexp.registry.db import Registry
from ctexp.registry.tracking import Tracker, flatten_config
from ctexp.registry.models import Experiment, PositionResult, Run, RunStatus, metric_column_names
from ctexp.result import RunResult

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
        connection.execute(insert(PositionResult), positions)
    engine.dispose()


def position_row(run_id: str, position: int, rng: random.Random) -> dict[str, Any]:
    row: dict[str, Any] = {name: rng.random() for name in metric_column_names()}
    row |= {"run_id": run_id, "split": "test", "position": position, "n": 400, "problems": 60}
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


def record_in_mlflow(tracker: Tracker, config: ExperimentConfig, result: RunResult, run_dir: Path) -> None:
    """What ``ctexp run`` does with MLflow for one run: start, epochs, final metrics, artifacts, figures."""
    mlflow_run_id = tracker.start_run(
        experiment="bench", run_name=result.name, ctexp_run_id=uuid.uuid4().hex,
        params=flatten_config(config.model_dump(mode="json")), tags={},
    )
    for epoch in result.epochs:
        tracker.log_epoch(mlflow_run_id, epoch)
    tracker.finish_run(mlflow_run_id, result, run_dir)


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
            run_dir = home / "runs" / default_result.run_id
            sql_ms = median_ms(lambda: record_run(registry, default, default_result))
            mlflow_ms = median_ms(lambda: record_in_mlflow(tracker, default, default_result, run_dir), repeats=3)
    fraction = (sql_ms + mlflow_ms) / 1000 / default_run_s
    print(f"setup_{args.runs}_runs_s={setup_s:.1f}")
    print(f"best_over_{args.runs}_runs_ms={best_ms:.1f}")
    print(f"record_run_ms={record_ms:.1f}")
    print(f"default_run_s={default_run_s:.2f} record_default_sql_ms={sql_ms:.1f} record_default_mlflow_ms={mlflow_ms:.1f}")
    print(f"record_fraction_of_default_run={fraction:.3f} best_over_{args.runs}_runs_ms={best_ms:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
