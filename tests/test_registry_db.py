"""The SQL results registry on SQLite and PostgreSQL: schema, sharing with Optuna, writes, reads, locking.

PostgreSQL tests run on ``CTEXP_TEST_POSTGRES_URL``, else the local server
(postgresql+psycopg://postgres@127.0.0.1:5432/test), and skip only where none answers; each works in a
database of its own, dropped afterwards (``conftest.postgres_url``), so nothing else is ever touched.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from ctexp.analysis.attention import (
    KIND_COLUMNS,
    AttentionReport,
    KindMass,
    RunInfo,
    TargetContrast,
    TokenMass,
    TopTokens,
)
from ctexp.analysis.intervention import InterventionResult, ProblemAnswer, adjust, paired_row, summarize_control
from ctexp.analysis.result import EpochMetrics, RunResult
from ctexp.config import ExperimentConfig, build_config
from ctexp.errors import RegistryError
from ctexp.experiment.pipeline import run_experiment
from ctexp.registry.db import Registry
from ctexp.registry.engine import (
    SQLITE_BUSY_TIMEOUT_S,
    enable_wal,
    make_engine,
    mask_url,
    migrations_dir,
    resolve_db_url,
)
from ctexp.registry.models import (
    HEAD_REVISION,
    VERSION_TABLE,
    Base,
    GroupMetricsColumns,
    Result,
    RunStatus,
    SweepStatus,
    metric_column_names,
)
from ctexp.registry.records import SweepRecord
from tests.conftest import needs_postgres

SMALL = {"world.problems": 120, "world.layers": 2, "world.hidden": 16, "train.epochs": 2}
HEAD = "0006_tinycodi"
CTEXP_TABLES = {"ctexp_sweeps", "ctexp_experiments", "ctexp_runs", "ctexp_epochs", "ctexp_results",
                "ctexp_intervention_rows", "ctexp_intervention_answers", "ctexp_attention_masses",
                "ctexp_attention_tokens", "ctexp_attention_targets"}
OLD_RESULT_TABLES = {"layer": "ctexp_layer_results", "position": "ctexp_position_results", "cell": "ctexp_cell_results"}


# ---------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def config() -> ExperimentConfig:
    return build_config(None, SMALL)


@pytest.fixture(scope="module")
def result(config: ExperimentConfig, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """One real run of a tiny world (about a second)."""
    return run_experiment(config, home=tmp_path_factory.mktemp("home"))




@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty results database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ctexp.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def registry(db_url: str) -> Iterator[Registry]:
    with Registry(db_url) as opened:
        yield opened


def new_id() -> str:
    return uuid.uuid4().hex


def start(registry: Registry, config: ExperimentConfig, run_id: str | None = None, name: str = "run",
          **extra: object) -> str:
    run_id = run_id or new_id()
    registry.start_run(run_id, name, config, store_hash="cf7a51b84f4cb0df", store_path=None, device="cpu",
                       code_version="test", **extra)  # type: ignore[arg-type]
    return run_id


def record(registry: Registry, result: RunResult, *, name: str = "run", top1: list[float] | None = None,
           config_update: dict | None = None, **extra: object) -> RunResult:
    """Record ``result`` as a new run (start, epochs, finish), its per-position top-1 replaced by ``top1``."""
    run_id = new_id()
    by_position = result.rows("position")
    if top1 is not None:
        by_position = [row.model_copy(update={"top1": value}) for row, value in zip(by_position, top1, strict=True)]
    copy = result.with_rows("position", by_position).model_copy(update={"run_id": run_id, "name": name})
    config = ExperimentConfig.model_validate({**copy.config, **(config_update or {})})
    start(registry, config, run_id, name, **extra)
    for epoch in copy.epochs:
        registry.record_epoch(run_id, epoch)
    registry.finish_run(copy)
    return copy


def open_sweep(registry: Registry, result: RunResult, name: str = "sweep-a") -> SweepRecord:
    record, _ = registry.open_sweep(
        name=name, study_name=name, storage="/tmp/optuna.journal", experiment="default", objective="val_top1",
        direction="maximize", sampler="tpe", pruner="median", n_trials=4,
        search_space={"train.lr": {"kind": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        base_config=result.config,
    )
    return record


def as_stored(epochs: list[EpochMetrics]) -> list[EpochMetrics]:
    """Epochs as the database holds them: per-position validation top-1 stays in result.json."""
    return [epoch.model_copy(update={"val_position_top1": {}}) for epoch in epochs]


def sql(url: str, query: str, **params: object) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            rows = connection.execute(text(query), params)
            return [tuple(row) for row in rows] if rows.returns_rows else []
    finally:
        engine.dispose()


def ctexp_only(name: str | None, type_: str, parent_names: dict) -> bool:
    return type_ != "table" or (name is not None and name.startswith("ctexp_") and name != VERSION_TABLE)


# ---------------------------------------------------------------------------------------------------------
# Schema


def test_head_revision_constant_is_alembics_head() -> None:
    """Opening a database compares with ``HEAD_REVISION`` rather than reading migrations/: a new migration
    must be named there too, or every database would be upgraded and then reported behind."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("path_separator", "os")
    assert ScriptDirectory.from_config(config).get_heads() == [HEAD_REVISION] == [HEAD]


def test_up_to_date_database_opens_without_alembic(db_url: str, tmp_path: Path) -> None:
    """The read path of an up-to-date database imports no Alembic (seen in a fresh process)."""
    Registry(db_url).close()
    code = ("import sys; from ctexp.registry.db import Registry; "
            f"Registry({db_url!r}).close(); print(sorted(m for m in sys.modules if m.startswith('alembic')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.stdout.strip() == "[]"


def test_schema_from_empty_is_exactly_the_models(db_url: str) -> None:
    with Registry(db_url) as registry:
        assert registry.current_revision() == registry.head_revision() == HEAD
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            assert {name for name in tables if name.startswith("ctexp_")} == CTEXP_TABLES | {VERSION_TABLE}
            context = MigrationContext.configure(connection, opts={"include_name": ctexp_only, "compare_type": True})
            assert compare_metadata(context, Base.metadata) == []  # the migration and the models agree
            indexes = {index["name"] for table in CTEXP_TABLES for index in inspect(connection).get_indexes(table)}
            assert {"ix_ctexp_runs_status", "ix_ctexp_runs_experiment_id", "ix_ctexp_runs_started_at",
                    "ix_ctexp_runs_sweep_id_trial_number", "ix_ctexp_runs_mlflow_run_id",
                    "ix_ctexp_results_layer_position_grouping_split", "ix_ctexp_results_position_grouping_split",
                    "ix_ctexp_runs_kind", "ix_ctexp_runs_source_run_id",
                    "ix_ctexp_intervention_rows_mode_position"} <= indexes
    finally:
        engine.dispose()


def test_metric_columns_are_declared_once_and_the_key_is_never_null() -> None:
    declared = [name for name in GroupMetricsColumns.__annotations__]
    assert declared == metric_column_names()
    columns = [column.name for column in Result.__table__.columns]
    assert columns[-len(declared):] == declared
    key = [column.name for column in Result.__table__.primary_key.columns]
    assert key == ["run_id", "split", "grouping", "group_key"]
    assert not any(Result.__table__.columns[name].nullable for name in key)  # NULLs are distinct in keys


@pytest.mark.parametrize("optuna_first", [True, False], ids=["optuna-first", "ctexp-first"])
def test_shares_a_database_with_optuna(db_url: str, result: RunResult, optuna_first: bool) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def study(name: str) -> None:
        optuna.create_study(storage=db_url, study_name=name).optimize(
            lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)

    if optuna_first:
        study("before")
    with Registry(db_url) as registry:
        record(registry, result)
    study("after")
    with Registry(db_url) as registry:  # reopening finds its schema current, Optuna's tables untouched
        assert len(registry.list_runs()) == 1
    for name in (["before"] if optuna_first else []) + ["after"]:
        assert len(optuna.load_study(study_name=name, storage=db_url).trials) == 2
    optuna_versions = sql(db_url, "SELECT version_num FROM alembic_version")
    assert len(optuna_versions) == 1 and optuna_versions[0][0] not in ("0001_initial", HEAD)
    assert sql(db_url, f"SELECT version_num FROM {VERSION_TABLE}") == [(HEAD,)]


def test_downgrade_removes_only_ctexp_tables_and_old_database_needs_upgrade(db_url: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=db_url, study_name="kept")
    with Registry(db_url) as registry:
        engine = create_engine(db_url)
        with engine.connect() as connection:
            command.downgrade(registry._alembic_config(connection), "base")
            connection.commit()
            left = set(inspect(connection).get_table_names())
        engine.dispose()
    assert not (left & CTEXP_TABLES) and "studies" in left
    with pytest.raises(RegistryError, match=rf"behind this ctexp \(head {HEAD}\); run `ctexp db upgrade`"):
        Registry(db_url, upgrade=False)
    with Registry(db_url) as registry:  # upgrade=True brings it back
        assert registry.current_revision() == HEAD
    assert optuna.load_study(study_name="kept", storage=db_url) is not None


def test_empty_database_with_upgrade_false_names_the_command(db_url: str) -> None:
    with pytest.raises(RegistryError, match=r"schema revision none \(empty\).*`ctexp db upgrade`"):
        Registry(db_url, upgrade=False)
    assert Registry(db_url, upgrade=False, check_schema=False).current_revision() is None


def test_newer_schema_revision_is_refused(db_url: str) -> None:
    Registry(db_url).close()
    sql(db_url, f"UPDATE {VERSION_TABLE} SET version_num = '9999_future'")
    for upgrade in (True, False):
        with pytest.raises(RegistryError) as caught:
            Registry(db_url, upgrade=upgrade)
        message = str(caught.value)
        assert f"schema revision 9999_future, newer than this ctexp (head {HEAD}); upgrade ctexp" in message
        assert "\n" not in message


def test_unreachable_database_fails_fast_with_a_masked_url() -> None:
    pytest.importorskip("psycopg")
    started = time.perf_counter()
    with pytest.raises(RegistryError) as caught:
        Registry("postgresql+psycopg://postgres:s3cret-pw@127.0.0.1:1/x")
    assert time.perf_counter() - started < 6
    message = str(caught.value)
    assert message.startswith("cannot reach the results database at postgresql+psycopg://postgres:***@127.0.0.1:1/x: ")
    assert message.endswith("check --db-url / CTEXP_DB_URL")
    assert "s3cret-pw" not in message and "\n" not in message
    assert caught.value.exit_code == 8


def test_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTEXP_DB_URL", raising=False)
    home = tmp_path / "not-yet" / "home"
    assert resolve_db_url(None, home) == f"sqlite:///{home.resolve()}/ctexp.db"
    assert not home.exists()  # created when the registry first opens it
    monkeypatch.setenv("CTEXP_DB_URL", "sqlite:////elsewhere.db")
    assert resolve_db_url(None, home) == "sqlite:////elsewhere.db"
    assert resolve_db_url("postgresql+psycopg://u@h/db", home) == "postgresql+psycopg://u@h/db"
    monkeypatch.delenv("CTEXP_DB_URL")
    Registry(resolve_db_url(None, home)).close()
    assert (home / "ctexp.db").is_file()

    assert mask_url("postgresql+psycopg://me:pw@host:5432/db") == "postgresql+psycopg://me:***@host:5432/db"
    assert "pw" not in mask_url("postgresql+psycopg://me@host/db?password=pw")
    assert mask_url("sqlite:////a/b.db") == "sqlite:////a/b.db"
    assert mask_url("not a url://me:pw@x") == "not a url://me:***@x"
    with pytest.raises(RegistryError, match="is not a database URL"):
        Registry("no-scheme-here")


# ---------------------------------------------------------------------------------------------------------
# Writes and reads


def test_round_trip_of_a_real_run(db_url: str, registry: Registry, result: RunResult,
                                  config: ExperimentConfig) -> None:
    run_id = start(registry, config, result.run_id, result.name, mlflow_run_id="mlf-1")
    running = registry.resolve(run_id)
    assert running.status is RunStatus.RUNNING and running.ended_at is None and running.test_top1 is None
    registry.record_epoch(run_id, result.epochs[0])
    registry.record_epoch(run_id, result.epochs[0])  # recording an epoch again replaces it
    assert registry.epochs(run_id) == as_stored(result.epochs[:1])
    registry.finish_run(result)
    registry.finish_run(result)  # finishing again (a retry) replaces, never duplicates

    layers, positions = result.data.layers, result.data.positions
    counts = dict(sql(db_url, "SELECT grouping, COUNT(*) FROM ctexp_results WHERE run_id = :id GROUP BY grouping",
                      id=run_id))
    assert counts == {"layer": len(layers), "position": len(positions), "cell": len(layers) * len(positions)}
    assert sql(db_url, "SELECT COUNT(*) FROM ctexp_epochs WHERE run_id = :id", id=run_id) == [(len(result.epochs),)]
    keys = sql(db_url, "SELECT grouping, group_key, layer, position FROM ctexp_results WHERE run_id = :id "
                       "AND (layer = 2 OR layer IS NULL) AND (position = 3 OR position IS NULL)", id=run_id)
    assert sorted(keys) == [("cell", "layer=2,position=3", 2, 3), ("layer", "layer=2", 2, None),
                            ("position", "position=3", None, 3)]

    # Plain SQL sees the baselines of the same states, matched by position.
    rows = sql(db_url, "SELECT position, n, top1, top1_low, prior_top1, prior_loss, identity_top5 FROM ctexp_results "
                       "WHERE run_id = :id AND grouping = 'position' AND split = 'test' ORDER BY position", id=run_id)
    prior, identity = result.baselines["prior"].rows("position"), result.baselines["identity"].rows("position")
    for row, lens_row, prior_row, identity_row in zip(rows, result.rows("position"), prior, identity, strict=True):
        low = lens_row.ci["top1"][0] if lens_row.ci.get("top1") else None
        assert row == (lens_row.position, lens_row.n, lens_row.top1, low, prior_row.top1, prior_row.loss,
                       identity_row.top5)

    cells = registry.results(run_id, "cell")
    assert [(row.layer, row.position) for row in cells] == [(cell.layer, cell.position) for cell in result.rows("cell")]
    for row, cell, prior_cell in zip(cells, result.rows("cell"), result.baselines["prior"].rows("cell"), strict=True):
        assert (row.n, row.loss, row.top10, row.prior_top1, row.lift_identity) == (
            cell.n, cell.loss, cell.top10, prior_cell.top1, cell.lift_identity)
        assert row.interval("top5") == (tuple(cell.ci["top5"]) if cell.ci.get("top5") else None)
    assert [row.layer for row in registry.results(run_id, "layer")] == layers
    assert registry.epochs(run_id) == as_stored(result.epochs)

    finished = registry.resolve(run_id)
    assert finished.status is RunStatus.FINISHED and finished.error is None
    assert (finished.test_top1, finished.test_loss, finished.prior_top1, finished.identity_top1) == (
        result.overall.top1, result.overall.loss, result.overall.prior_top1, result.overall.identity_top1)
    assert (finished.test_top1_low, finished.test_top1_high) == tuple(result.overall.ci["top1"])
    assert finished.best_epoch == result.best_epoch and finished.n_test_states == result.overall.n
    assert finished.n_test_problems == result.data.problems["test"]
    assert finished.experiment == "default" and finished.lens == "layer" and finished.split == "uniform"
    assert finished.layers == "all" and finished.config == config.model_dump(mode="json")
    assert finished.started_at.tzinfo is not None and finished.started_at <= finished.ended_at
    assert abs(finished.started_at - datetime.now(UTC)) < timedelta(minutes=5)
    as_json = finished.to_json()
    assert json.loads(json.dumps(as_json)) == as_json and as_json["status"] == "FINISHED"
    assert datetime.fromisoformat(as_json["started_at"]) == finished.started_at

    with pytest.raises(RegistryError, match="is not in the results database"):
        registry.results("0" * 32, "position")
    with pytest.raises(RegistryError, match="unknown breakdown 'row'; choose one of: layer, position, cell"):
        registry.results(run_id, "row")  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="already in the results database"):
        start(registry, config, run_id)


def test_resolve_by_id_prefix_name_mlflow_id_and_latest(registry: Registry, config: ExperimentConfig) -> None:
    first = start(registry, config, "abcd1" + "0" * 27, name="alpha")
    second = start(registry, config, "abcd2" + "0" * 27, name="beta")
    newest_alpha = start(registry, config, name="alpha")
    registry.set_mlflow_run_id(second, "f00dfeed" * 4)

    assert registry.resolve(first).id == first
    assert registry.resolve(first.upper()).id == first
    assert registry.resolve("abcd1").id == first
    assert registry.resolve("alpha").id == newest_alpha  # a name means its latest run
    assert registry.resolve("f00dfeed" * 4).id == second
    assert registry.resolve("latest").id == newest_alpha
    with pytest.raises(RegistryError) as ambiguous:
        registry.resolve("abcd")
    message = str(ambiguous.value)
    assert "ambiguous" in message and "(alpha)" in message and "(beta)" in message
    for unknown in ("nope", "abc", "ffff"):
        with pytest.raises(RegistryError, match="RUN may be a run id, a unique id prefix of 4\\+ characters, "
                                                "a run name, an MLflow run id, or 'latest'"):
            registry.resolve(unknown)
    with pytest.raises(RegistryError, match="is not in the results database"):
        registry.set_mlflow_run_id("0" * 32, "x")


def test_resolve_latest_on_an_empty_database(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="holds no runs yet"):
        registry.resolve("latest")


def test_list_runs_filters_and_sorting(registry: Registry, result: RunResult) -> None:
    sweep_id = open_sweep(registry, result).id
    low = record(registry, result, name="low", top1=None)
    high = record(registry, result.with_rows("overall", [result.overall.model_copy(update={"top1": 0.9})]),
                  name="high", config_update={"lens": "layer-position", "experiment": "other"}, sweep_id=sweep_id,
                  trial_number=0)
    running = start(registry, ExperimentConfig.model_validate({**result.config, "target": "last"}), name="running")

    ids = lambda runs: [run.id for run in runs]
    assert ids(registry.list_runs()) == [running, high.run_id, low.run_id]  # newest first
    assert ids(registry.list_runs(descending=False)) == [low.run_id, high.run_id, running]
    # Sorting by a metric puts runs without it (still running) last, either way.
    assert ids(registry.list_runs(sort="test_top1")) == [high.run_id, low.run_id, running]
    assert ids(registry.list_runs(sort="test_top1", descending=False)) == [low.run_id, high.run_id, running]
    assert ids(registry.list_runs(lens="layer-position")) == [high.run_id]
    assert ids(registry.list_runs(experiment="other")) == [high.run_id]
    assert ids(registry.list_runs(target="last")) == [running]
    assert ids(registry.list_runs(split="uniform", status="finished")) == [high.run_id, low.run_id]
    assert ids(registry.list_runs(status="RUNNING")) == [running]
    assert ids(registry.list_runs(sweep_id=sweep_id)) == [high.run_id]
    assert ids(registry.list_runs(limit=1)) == [running]
    assert registry.list_runs(since=datetime.now(UTC) + timedelta(hours=1)) == []
    assert len(registry.list_runs(since=datetime.now() - timedelta(days=1))) == 3  # naive: taken as UTC
    with pytest.raises(RegistryError, match="cannot sort runs by 'speed'; choose one of: started_at, test_top1"):
        registry.list_runs(sort="speed")
    with pytest.raises(RegistryError, match="unknown run status 'done'; choose one of: RUNNING, FINISHED"):
        registry.list_runs(status="done")


def test_best_picks_the_right_run_per_position(db_url: str, registry: Registry, result: RunResult) -> None:
    # Each of three runs is best at two positions; a run that is not FINISHED, and one of another lens,
    # would beat them all but must not count.
    a = record(registry, result, name="a", top1=[0.9, 0.8, 0.1, 0.1, 0.1, 0.1])
    b = record(registry, result, name="b", top1=[0.1, 0.1, 0.9, 0.8, 0.1, 0.1])
    c = record(registry, result, name="c", top1=[0.2, 0.2, 0.2, 0.2, 0.7, 0.95])
    failed = record(registry, result, name="failed", top1=[1.0] * 6)
    sql(db_url, "UPDATE ctexp_runs SET status = 'FAILED' WHERE id = :id", id=failed.run_id)
    other = record(registry, result, name="other-lens", top1=[1.0] * 6, config_update={"lens": "layer-position"})

    best = registry.best(by="position", lens="layer")
    assert [(row.position, row.run_name, row.value) for row in best] == [
        (0, "a", 0.9), (1, "a", 0.8), (2, "b", 0.9), (3, "b", 0.8), (4, "c", 0.7), (5, "c", 0.95)]
    row = best[5]
    assert (row.run_id, row.lens, row.experiment, row.n, row.metric) == (c.run_id, "layer", "default",
                                                                          result.rows("position")[5].n, "top1")
    assert (row.low, row.high) == tuple(result.rows("position")[5].ci["top1"])
    assert {row.run_id for row in registry.best(by="position")} == {other.run_id}
    assert registry.best(by="position", experiment="missing") == []
    assert all(row.run_id in (a.run_id, b.run_id, c.run_id) for row in registry.best(by="position", lens="layer"))

    cells = registry.best(by="cell", metric="loss", lens="layer")
    assert len(cells) == len(result.rows("cell"))  # equal losses: ties go to the earliest run
    assert {row.run_id for row in cells} == {a.run_id}
    assert len(registry.best(by="layer", metric="top5")) == len(result.rows("layer"))
    with pytest.raises(RegistryError, match="unknown breakdown 'overall'; choose one of: layer, position, cell"):
        registry.best(by="overall")
    with pytest.raises(RegistryError, match="unknown metric 'top3'; choose one of: loss, top1, top5, top10"):
        registry.best(by="position", metric="top3")


def test_best_loss_is_the_lowest_and_top1_ties_go_to_the_earlier_run(
    db_url: str, registry: Registry, result: RunResult
) -> None:
    first = record(registry, result, name="first", top1=[0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    second = record(registry, result, name="second", top1=[0.5, 0.6, 0.5, 0.5, 0.5, 0.5])
    sql(db_url, "UPDATE ctexp_results SET loss = 9.0 WHERE split = 'test' AND grouping = 'position'")
    sql(db_url, "UPDATE ctexp_results SET loss = 0.25 WHERE run_id = :id AND grouping = 'position' AND position = 2",
        id=second.run_id)
    sql(db_url, "UPDATE ctexp_results SET loss = 0.5 WHERE run_id = :id AND grouping = 'position' AND position = 2",
        id=first.run_id)

    losses = {row.position: (row.run_name, row.value) for row in registry.best(by="position", metric="loss")}
    assert losses[2] == ("second", 0.25)  # lowest wins for loss
    assert losses[3] == ("first", 9.0)  # equal: the earlier run
    top1 = {row.position: row.run_name for row in registry.best(by="position")}
    assert top1 == {0: "first", 1: "second", 2: "first", 3: "first", 4: "first", 5: "first"}


def test_end_run_killed_keeps_epochs(registry: Registry, result: RunResult, config: ExperimentConfig) -> None:
    run_id = start(registry, config)
    registry.record_epoch(run_id, result.epochs[0])
    registry.end_run(run_id, RunStatus.KILLED, "interrupted")
    run = registry.resolve(run_id)
    assert (run.status, run.error) == (RunStatus.KILLED, "interrupted") and run.ended_at is not None
    assert registry.epochs(run_id) == as_stored(result.epochs[:1])
    with pytest.raises(ValueError, match="use finish_run"):
        registry.end_run(run_id, RunStatus.FINISHED)


def test_mark_stale_runs(db_url: str, registry: Registry, config: ExperimentConfig) -> None:
    stale, alive = start(registry, config), start(registry, config)
    an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).replace(tzinfo=None)
    sql(db_url, "UPDATE ctexp_runs SET heartbeat_at = :at WHERE id = :id", at=an_hour_ago, id=stale)
    registry.heartbeat(alive)
    assert registry.mark_stale_runs(older_than_s=600) == [stale]
    assert registry.mark_stale_runs(older_than_s=600) == []
    run = registry.resolve(stale)
    assert (run.status, run.error, run.ended_at) == (RunStatus.FAILED, "heartbeat lost", run.heartbeat_at)
    assert registry.resolve(alive).status is RunStatus.RUNNING


def test_delete_cascades(db_url: str, registry: Registry, result: RunResult) -> None:
    kept, deleted = record(registry, result), record(registry, result)
    kept_intervention = record_intervention(registry, kept.run_id).run_id
    deleted_intervention = record_intervention(registry, deleted.run_id).run_id
    kept_attention = record_attention(registry, kept.run_id).run_id
    deleted_attention = record_attention(registry, deleted.run_id).run_id
    registry.delete_run(deleted.run_id)
    registry.delete_run(deleted_intervention)
    registry.delete_run(deleted_attention or "")
    for table in CTEXP_TABLES - {"ctexp_sweeps", "ctexp_experiments", "ctexp_runs"}:
        gone, there = (deleted_intervention, kept_intervention) if "intervention" in table else (
            (deleted_attention, kept_attention) if "attention" in table else (deleted.run_id, kept.run_id))
        assert sql(db_url, f"SELECT COUNT(*) FROM {table} WHERE run_id = :id", id=gone) == [(0,)], table
        assert sql(db_url, f"SELECT COUNT(*) FROM {table} WHERE run_id = :id", id=there)[0][0] > 0, table
    assert sql(db_url, "SELECT COUNT(*) FROM ctexp_experiments") == [(1,)]  # both runs share one experiment
    with pytest.raises(RegistryError, match="is not in the results database"):
        registry.delete_run(deleted.run_id)
    with pytest.raises(RegistryError, match="is not in the results database"):
        registry.finish_run(deleted)


# ---------------------------------------------------------------------------------------------------------
# Concurrency

def open_and_record(url: str, result: RunResult, barrier: Any, error_path: Path) -> None:
    """A worker process: wait for the others, then open the registry (upgrading it) and record a run."""
    try:
        barrier.wait(timeout=60)  # all eight meet the fresh database at once
        run = result.model_copy(update={"run_id": new_id()})
        with Registry(url) as registry:
            registry.start_run(run.run_id, run.name, ExperimentConfig.model_validate(run.config), store_hash="h",
                               store_path=None, device="cpu", code_version="test")
            for epoch in run.epochs:
                registry.record_epoch(run.run_id, epoch)
            registry.finish_run(run)
    except BaseException:  # noqa: BLE001 - the child reports any failure to the parent test
        error_path.write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)  # skip the parent's (pytest's) exit handlers in the forked child


def switch_new_database_to_wal(path: Path, barrier: Any, error_path: Path) -> None:
    """A worker process: meet the others, then connect as ctexp's engine does and switch to WAL."""
    try:
        barrier.wait(timeout=60)
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
        enable_wal(connection.cursor())
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
        if mode != "wal":
            raise AssertionError(f"journal mode {mode!r}")
        connection.close()
    except BaseException:  # noqa: BLE001 - the child reports any failure to the parent test
        error_path.write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def test_connections_meeting_a_new_sqlite_database_all_get_wal(tmp_path: Path) -> None:
    """Eight processes switch a new SQLite file to WAL at once, 25 times over: every one gets there.

    SQLite answers "database is locked" at once, busy timeout or not, to some of several connections
    changing the journal mode together: with a bare ``PRAGMA journal_mode = WAL`` about 3% of these
    connections failed (once in CI, through the engine, eight registries meeting a new database).
    """
    context = multiprocessing.get_context("fork")
    for round_ in range(25):
        barrier = context.Barrier(8)
        errors = [tmp_path / f"{round_}-{index}.err" for index in range(8)]
        workers = [context.Process(target=switch_new_database_to_wal, args=(tmp_path / f"{round_}.db", barrier, error))
                   for error in errors]
        for worker in workers:
            worker.start()
        for worker, error in zip(workers, errors, strict=True):
            worker.join(timeout=120)
            assert worker.exitcode == 0, error.read_text() if error.exists() else worker.exitcode
    with make_engine(f"sqlite:///{tmp_path / 'engine.db'}").connect() as connection:  # the engine's own switch
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    with make_engine("sqlite://").connect() as connection:  # in memory: no WAL, no wait
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "memory"


def test_eight_processes_on_a_fresh_database_all_land(db_url: str, result: RunResult, tmp_path: Path) -> None:
    # Forked, so the workers start in milliseconds instead of importing ctexp for a second each.
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(8)
    workers = [context.Process(target=open_and_record, args=(db_url, result, barrier, tmp_path / f"{index}.err"))
               for index in range(8)]
    for worker in workers:
        worker.start()
    for index, worker in enumerate(workers):
        worker.join(timeout=120)
        error = tmp_path / f"{index}.err"
        assert worker.exitcode == 0, error.read_text() if error.exists() else worker.exitcode
    with Registry(db_url) as registry:
        runs = registry.list_runs()
        assert len(runs) == 8 and {run.status for run in runs} == {RunStatus.FINISHED}
        assert {run.experiment for run in runs} == {"default"}
    cells = len(result.rows("cell")) * 8
    assert sql(db_url, "SELECT COUNT(*) FROM ctexp_results WHERE grouping = 'cell'") == [(cells,)]
    assert sql(db_url, "SELECT COUNT(*) FROM ctexp_experiments") == [(1,)]
    assert sql(db_url, f"SELECT version_num FROM {VERSION_TABLE}") == [(HEAD,)]


def test_eight_threads_sharing_one_registry_all_land(db_url: str, result: RunResult) -> None:
    # A run's heartbeat thread writes beside its main thread; sweeps may run trials in threads.
    with Registry(db_url) as registry:
        def work(index: int) -> str:
            run = record(registry, result, name=f"thread-{index}")
            registry.heartbeat(run.run_id)
            return run.run_id

        with ThreadPoolExecutor(max_workers=8) as pool:
            ids = list(pool.map(work, range(8)))
        assert sorted(run.id for run in registry.list_runs(status="FINISHED")) == sorted(ids)


# ---------------------------------------------------------------------------------------------------------
# Sweeps (revision 0002)


def test_sweeps_open_link_update_list_and_count_their_runs(db_url: str, registry: Registry, result: RunResult,
                                                           config: ExperimentConfig) -> None:
    sweep = open_sweep(registry, result)
    again = open_sweep(registry, result)
    assert again.id == sweep.id and again.status is SweepStatus.RUNNING and again.ended_at is None
    assert sweep.search_space["train.lr"]["log"] is True and sweep.base_config == result.config
    assert registry.set_sweep_parent(sweep.id, "parent-1") == "parent-1"
    assert registry.set_sweep_parent(sweep.id, "parent-2") == "parent-1"  # the first one recorded wins

    finished = record(registry, result, name="t1", sweep_id=sweep.id, trial_number=1)
    running = start(registry, config, name="t0", sweep_id=sweep.id, trial_number=0)
    pruned = start(registry, config, name="t2", sweep_id=sweep.id, trial_number=2)
    registry.record_epoch(pruned, result.epochs[0])
    registry.end_run(pruned, RunStatus.PRUNED, "pruned at epoch 1")
    assert [run.trial_number for run in registry.list_trials(sweep.id)] == [0, 1, 2]
    assert [run.id for run in registry.list_trials(sweep.id)] == [running, finished.run_id, pruned]
    assert registry.resolve(pruned).status is RunStatus.PRUNED and registry.epochs(pruned) == as_stored(result.epochs[:1])
    assert registry.list_runs(status="pruned")[0].id == pruned

    done = registry.update_sweep(sweep.id, status="FINISHED", best_trial_number=1, best_value=0.5, n_trials=3)
    assert (done.status, done.best_trial_number, done.best_value, done.n_trials) == (SweepStatus.FINISHED, 1, 0.5, 3)
    assert done.ended_at is not None and done.mlflow_parent_run_id == "parent-1"
    assert done.runs == {"RUNNING": 1, "FINISHED": 1, "PRUNED": 1}
    assert registry.update_sweep(sweep.id, status="RUNNING").ended_at is None
    assert registry.sweep(str(sweep.id)).name == "sweep-a"
    other = open_sweep(registry, result, name="sweep-b")
    assert [s.name for s in registry.list_sweeps()] == ["sweep-b", "sweep-a"]
    assert registry.list_sweeps(limit=1)[0].id == other.id and other.runs == {}
    assert registry.list_sweeps(experiment="nope") == []
    as_json = done.to_json()
    assert json.loads(json.dumps(as_json)) == as_json and as_json["status"] == "FINISHED"

    with pytest.raises(RegistryError, match="no sweep named 'missing'"):
        registry.sweep("missing")
    with pytest.raises(ValueError, match="cannot update"):
        registry.update_sweep(sweep.id, objective="val_loss")
    with pytest.raises(RegistryError, match="no sweep named '999'"):
        registry.update_sweep(999, status="STOPPED")
    with pytest.raises(RegistryError, match="refused"):
        start(registry, config, sweep_id=999, trial_number=0)  # the foreign key holds
    engine = make_engine(db_url)  # ctexp's engine: SQLite enforces foreign keys on it
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM ctexp_sweeps WHERE id = :id"), {"id": sweep.id})
    engine.dispose()
    assert {run.sweep_id for run in registry.list_runs()} == {None}  # ON DELETE SET NULL keeps the runs


def test_many_workers_opening_one_sweep_get_one_row(registry: Registry, result: RunResult) -> None:
    def work(_: int) -> tuple[int, bool]:
        record, created = registry.open_sweep(
            name="raced", study_name="raced", storage="s", experiment="default", objective="val_top1",
            direction="maximize", sampler="tpe", pruner="median", n_trials=4, search_space={},
            base_config=result.config,
        )
        return record.id, created

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(work, range(8)))
    assert len({sweep_id for sweep_id, _ in outcomes}) == 1
    assert sum(created for _, created in outcomes) == 1


def test_upgrade_from_0001_keeps_every_row_and_downgrade_turns_pruned_into_killed(
    db_url: str, result: RunResult, config: ExperimentConfig,
) -> None:
    with Registry(db_url) as registry:
        sweep = open_sweep(registry, result)
        kept = record(registry, result, name="kept", sweep_id=sweep.id, trial_number=0)
        pruned = start(registry, config, name="pruned", sweep_id=sweep.id, trial_number=1)
        registry.record_epoch(pruned, result.epochs[0])
        registry.end_run(pruned, RunStatus.PRUNED, "pruned")
    cells = sql(db_url, "SELECT COUNT(*) FROM ctexp_results WHERE grouping = 'cell'")[0][0]
    assert cells == len(result.rows("cell"))

    engine = create_engine(db_url)  # a plain engine: SQLite's foreign keys stay off while tables are copied
    try:
        with engine.connect() as connection:
            command.downgrade(Registry._alembic_config(connection), "0001_initial")
            connection.commit()
            assert "ctexp_sweeps" not in inspect(connection).get_table_names()
    finally:
        engine.dispose()
    assert sql(db_url, "SELECT name, status, sweep_id FROM ctexp_runs ORDER BY name") == [
        ("kept", "FINISHED", None), ("pruned", "KILLED", None)]
    assert sql(db_url, "SELECT COUNT(*) FROM ctexp_cell_results") == [(cells,)]
    assert sql(db_url, "SELECT COUNT(*) FROM ctexp_epochs WHERE run_id = :id", id=pruned) == [(1,)]

    with Registry(db_url) as registry:  # upgrades again: every row survives the table copy
        assert registry.current_revision() == HEAD
        assert registry.resolve(kept.run_id).test_top1 == kept.overall.top1
        assert len(registry.results(kept.run_id, "cell")) == len(result.rows("cell"))
        registry.end_run(start(registry, config), RunStatus.PRUNED, "pruned")
    with pytest.raises(Exception, match="(?i)check"):
        sql(db_url, "UPDATE ctexp_runs SET status = 'BOGUS' WHERE id = :id", id=kept.run_id)


# ---------------------------------------------------------------------------------------------------------
# One results table (revision 0003)


def migrate(url: str, revision: str, *, down: bool) -> None:
    """Move the schema to ``revision`` on a plain engine (SQLite's foreign keys stay off while tables move)."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            config = Registry._alembic_config(connection)
            (command.downgrade if down else command.upgrade)(config, revision)
            connection.commit()
    finally:
        engine.dispose()


def test_upgrade_from_0002_moves_every_result_row_into_one_table(
    db_url: str, result: RunResult, config: ExperimentConfig,
) -> None:
    # A database at revision 0002 holding what that revision's code wrote: two finished runs with rows in
    # the layer, position and cell tables, and a position without test states (n = 0, metrics NULL).
    # (The runs' rows are written by today's code and moved down to 0002, which keeps them as they were.)
    runs = [result.model_copy(update={"run_id": new_id(), "name": name}) for name in ("a", "b")]
    with Registry(db_url) as registry:
        for run in runs:
            start(registry, config, run.run_id, run.name)
            sql(db_url, "UPDATE ctexp_runs SET status = 'FINISHED' WHERE id = :id", id=run.run_id)
    migrate(db_url, "0002_sweeps", down=True)
    metrics = metric_column_names()
    for run in runs:
        for grouping, table in OLD_RESULT_TABLES.items():
            keys = ("layer", "position") if grouping == "cell" else (grouping,)
            for row in run.rows(grouping):
                stored = {metric: getattr(row, metric, None) for metric in metrics}
                for metric in ("loss", "top1", "top5", "top10"):
                    stored[f"{metric}_low"], stored[f"{metric}_high"] = row.ci.get(metric) or (None, None)
                insert_old(db_url, table, run.run_id, {key: getattr(row, key) for key in keys} | stored)
    insert_old(db_url, "ctexp_position_results", runs[0].run_id,
               {"position": 99, **dict.fromkeys(metrics), "n": 0, "problems": 0})
    before = {table: sql(db_url, f"SELECT COUNT(*) FROM {table}")[0][0] for table in OLD_RESULT_TABLES.values()}

    with Registry(db_url) as registry:  # upgrades to head
        assert registry.current_revision() == HEAD
        for run in runs:
            read = registry.breakdowns(run.run_id)
            for grouping in OLD_RESULT_TABLES:
                stored = [row.as_group_metrics() for row in read[grouping] if row.position != 99]
                assert stored == run.rows(grouping)
        empty = registry.results(runs[0].run_id, "position")[-1]
        assert (empty.position, empty.n, empty.top1, empty.interval("top1")) == (99, 0, None, None)
        assert {row.run_id for row in registry.best(by="cell")} == {runs[0].run_id}  # equal values: the earlier
    engine = create_engine(db_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert not tables & set(OLD_RESULT_TABLES.values()) and "ctexp_results" in tables
    counts = dict(sql(db_url, "SELECT grouping, COUNT(*) FROM ctexp_results GROUP BY grouping"))
    assert counts == {grouping: before[table] for grouping, table in OLD_RESULT_TABLES.items()}
    assert sql(db_url, "SELECT group_key, layer, position FROM ctexp_results WHERE grouping = 'cell' "
                       "AND layer = 1 AND position = 2 AND run_id = :id", id=runs[1].run_id) == [
        ("layer=1,position=2", 1, 2)]
    with pytest.raises(Exception, match="(?i)unique|duplicate"):  # the non-null key holds on both backends
        sql(db_url, "INSERT INTO ctexp_results (run_id, split, grouping, group_key, n, problems) "
                    "SELECT run_id, split, grouping, group_key, n, problems FROM ctexp_results WHERE grouping = 'layer'")

    migrate(db_url, "0002_sweeps", down=True)  # and back: the three tables again, every row in its place
    assert {table: sql(db_url, f"SELECT COUNT(*) FROM {table}")[0][0] for table in OLD_RESULT_TABLES.values()} == before
    assert sql(db_url, "SELECT n, top1 FROM ctexp_position_results WHERE position = 99") == [(0, None)]


def insert_old(url: str, table: str, run_id: str, values: dict[str, Any]) -> None:
    """One row of a results table of revisions 0001-0002, as their code wrote it."""
    columns = ", ".join(values)
    sql(url, f"INSERT INTO {table} (run_id, split, {columns}) VALUES (:run_id, 'test', "
             f"{', '.join(':' + name for name in values)})", run_id=run_id, **values)


# ---------------------------------------------------------------------------------------------------------
# Interventions (revision 0004)


def answers(correct: list[bool], text: str = "") -> list[ProblemAnswer]:
    return [ProblemAnswer(problem_id=f"problem-{i}", text=f"{text}#### {int(c)}", parsed=None if i == 3 else str(int(c)),
                          correct=c) for i, c in enumerate(correct)]


def intervention_result(lens_run: str, run_id: str | None = None) -> InterventionResult:
    """Two rows (position 2 and all) with 2 lost answers, over 6 problems, one of which has no number."""
    control = answers([True, True, True, False, True, False])
    treated = answers([False, True, False, False, True, True], "x")
    rows = [paired_row(control, treated, position=position, mode="zero", site="feedback", layer=None, seed=(0, index))
            for index, position in enumerate([2, "all"])]
    rows.append(paired_row(control[:0], treated[:0], position=3, mode="decoded", site="feedback", layer=None, seed=(0, 2)))
    return InterventionResult(
        run_id=run_id or new_id(), lens_run=lens_run, config={"run": lens_run, "site": "feedback", "seed": 0},
        control=summarize_control(control), rows=adjust(rows),
    )


def record_intervention(registry: Registry, lens_run: str) -> InterventionResult:
    result = intervention_result(lens_run)
    registry.start_intervention(result.run_id, "zeroed", lens_run_id=lens_run, config=result.config, seed=0,
                                device="cpu", code_version="test")
    registry.finish_intervention(result, 1.5)
    return result


def test_an_intervention_round_trips_and_outlives_its_lens_run(db_url: str, registry: Registry, result: RunResult) -> None:
    lens = record(registry, result, name="lens")
    intervention = intervention_result(lens.run_id)
    registry.start_intervention(intervention.run_id, "zeroed", lens_run_id=lens.run_id, config=intervention.config,
                                seed=0, device="cpu", code_version="test")
    running = registry.resolve(intervention.run_id)
    assert (running.kind, running.status, running.source_run_id) == ("intervention", RunStatus.RUNNING, lens.run_id)
    assert (running.lens, running.target, running.experiment) == (lens.config["lens"], lens.config["target"], "default")
    with pytest.raises(RegistryError, match="only a finished one"):
        registry.intervention(intervention.run_id)
    registry.finish_intervention(intervention, 1.5)
    registry.finish_intervention(intervention, 1.5)  # again: replaced, not doubled
    assert registry.intervention(intervention.run_id) == intervention
    assert sql(db_url, "SELECT count(*) FROM ctexp_intervention_answers") == [(6 + 6 + 6,)]  # control, p2, all
    assert [r.id for r in registry.list_runs(kind="intervention")] == [intervention.run_id]
    assert [r.id for r in registry.list_runs(kind="lens")] == [lens.run_id]
    with pytest.raises(RegistryError, match="unknown run kind 'bogus'"):
        registry.list_runs(kind="bogus")
    with pytest.raises(RegistryError, match="is of kind lens, not an intervention"):
        registry.intervention(lens.run_id)
    with pytest.raises(RegistryError, match="is of kind intervention, not a lens run"):
        registry.start_intervention(new_id(), "x", lens_run_id=intervention.run_id, config={}, seed=0, device="cpu",
                                    code_version="test")

    registry.delete_run(lens.run_id)  # the intervention stays, unlinked, and reads back the same
    assert registry.resolve(intervention.run_id).source_run_id is None
    assert registry.intervention(intervention.run_id) == intervention
    registry.delete_run(intervention.run_id)  # its rows and answers go with it
    for table in ("ctexp_intervention_rows", "ctexp_intervention_answers"):
        assert sql(db_url, f"SELECT count(*) FROM {table}") == [(0,)]


def test_a_failed_intervention_write_rolls_back(db_url: str, registry: Registry, result: RunResult) -> None:
    lens = record(registry, result, name="lens")
    intervention = intervention_result(lens.run_id)
    registry.start_intervention(intervention.run_id, "zeroed", lens_run_id=lens.run_id, config=intervention.config,
                                seed=0, device="cpu", code_version="test")
    broken = intervention.model_copy(update={"control": intervention.control.model_copy(
        update={"answers": intervention.control.answers * 2})})  # one problem twice: the primary key refuses it
    with pytest.raises(RegistryError):
        registry.finish_intervention(broken, 1.0)
    assert registry.resolve(intervention.run_id).status is RunStatus.RUNNING
    for table in ("ctexp_intervention_rows", "ctexp_intervention_answers"):
        assert sql(db_url, f"SELECT count(*) FROM {table}") == [(0,)]


def test_upgrade_from_0003_makes_every_run_a_lens_run_and_downgrade_drops_interventions(
    db_url: str, result: RunResult, config: ExperimentConfig,
) -> None:
    with Registry(db_url) as registry:
        kept = record(registry, result, name="kept")
        pruned = start(registry, config, name="pruned")
        registry.end_run(pruned, RunStatus.PRUNED, "pruned")
        dropped = record_intervention(registry, kept.run_id)
    migrate(db_url, "0003_results", down=True)  # a database of revision 0003, as that revision's code left it
    assert sql(db_url, "SELECT name, status FROM ctexp_runs ORDER BY name") == [("kept", "FINISHED"),
                                                                               ("pruned", "PRUNED")]
    engine = create_engine(db_url)
    try:
        columns = {column["name"] for column in inspect(engine).get_columns("ctexp_runs")}
        assert not {"kind", "source_run_id"} & columns and not {"ctexp_intervention_rows"} & set(
            inspect(engine).get_table_names())
    finally:
        engine.dispose()
    results = sql(db_url, "SELECT count(*) FROM ctexp_results WHERE run_id = :id", id=kept.run_id)

    with Registry(db_url) as registry:  # upgrades to head: every row survives the table copy, as a lens run
        assert registry.current_revision() == HEAD
        assert {(r.name, r.kind, r.source_run_id) for r in registry.list_runs()} == {("kept", "lens", None),
                                                                                   ("pruned", "lens", None)}
        assert registry.resolve(kept.run_id).test_top1 == kept.overall.top1
        assert sql(db_url, "SELECT count(*) FROM ctexp_results WHERE run_id = :id", id=kept.run_id) == results
        again = record_intervention(registry, kept.run_id)
        assert registry.intervention(again.run_id) == again
        with pytest.raises(RegistryError):
            registry.intervention(dropped.run_id)
    with pytest.raises(Exception, match="(?i)check"):
        sql(db_url, "UPDATE ctexp_runs SET kind = 'bogus' WHERE id = :id", id=kept.run_id)
    engine = create_engine(db_url)
    try:
        keys = {key["name"]: key for key in inspect(engine).get_foreign_keys("ctexp_runs")}
    finally:
        engine.dispose()
    source = keys["fk_ctexp_runs_source_run_id_ctexp_runs"]
    assert (source["referred_table"], source["options"].get("ondelete")) == ("ctexp_runs", "SET NULL")


# ---------------------------------------------------------------------------------------------------------
# Attention analyses (revision 0005)


def attention_report(run_id: str, lens_run: str | None) -> AttentionReport:
    """A report of 2 layers x (2 thoughts and bot), with top tokens and, with a lens run, a target contrast."""
    positions: list = [0, 1, "bot"]
    kinds = [KindMass(layer=layer, position=position, problems=9,
                      mass={kind: (i + layer + index) / 100 for i, kind in enumerate(KIND_COLUMNS)})
             for layer in (1, 2) for index, position in enumerate(positions)]
    tokens = [TopTokens(position=position, tokens=[TokenMass(id=7 + rank, token=f" t{rank}", mass=0.5 / (rank + 1),
                                                             problems=9 - rank) for rank in range(2)])
              for position in positions]
    target = None if lens_run is None else [
        TargetContrast(position=0, correct_states=4, incorrect_states=3, absent_states=1, problems=6, correct=0.6,
                       incorrect=0.1, difference=0.5, low=0.3, high=0.7),
        TargetContrast(position=1, correct_states=0, incorrect_states=5, absent_states=0, problems=5, correct=None,
                       incorrect=0.2, difference=None, low=None, high=None),
    ]
    info = None if lens_run is None else RunInfo(id=lens_run, name="lens", lens="layer", target="first",
                                                 tokenizer="world")
    return AttentionReport(run_id=run_id, store="/stores/x", store_hash="cf7a51b84f4cb0df", mode="mean", heads=None,
                           problems=9, layers=[1, 2], positions=positions, kinds=kinds, top_tokens=tokens,
                           run=info, target=target, statistics="how")


def record_attention(registry: Registry, lens_run: str | None) -> AttentionReport:
    report = attention_report(new_id(), lens_run)
    assert report.run_id is not None
    registry.start_attention(report.run_id, "attention", lens_run_id=lens_run, store_hash=report.store_hash,
                             store_path=report.store, layers="all", positions="all",
                             config={"store": report.store, "seed": 0}, seed=0, code_version="test")
    registry.finish_attention(report, 0.5)
    return report


def test_an_attention_analysis_round_trips_with_and_without_a_lens_run(
    db_url: str, registry: Registry, result: RunResult,
) -> None:
    lens = record(registry, result, name="lens")
    alone, related = record_attention(registry, None), record_attention(registry, lens.run_id)
    assert registry.attention(alone.run_id or "") == alone and registry.attention(related.run_id or "") == related
    first = registry.resolve(alone.run_id or "")
    assert (first.kind, first.status, first.source_run_id, first.experiment) == ("attention", RunStatus.FINISHED,
                                                                                  None, "attention")
    assert (first.lens, first.target, first.store_hash, first.layers) == ("-", "-", "cf7a51b84f4cb0df", "all")
    second = registry.resolve(related.run_id or "")
    assert (second.source_run_id, second.lens, second.experiment) == (lens.run_id, lens.config["lens"], "default")
    assert sql(db_url, "SELECT count(*) FROM ctexp_attention_masses WHERE position = -1") == [(2 * 2 * 7,)]
    assert sql(db_url, "SELECT count(*) FROM ctexp_attention_targets") == [(2,)]
    assert {r.id for r in registry.list_runs(kind="attention")} == {alone.run_id, related.run_id}
    registry.finish_attention(alone, 0.5)  # again: replaced, not doubled
    assert sql(db_url, "SELECT count(*) FROM ctexp_attention_tokens") == [(2 * 3 * 2,)]
    with pytest.raises(RegistryError, match="is of kind lens, not an attention analysis"):
        registry.attention(lens.run_id)
    with pytest.raises(RegistryError, match="is of kind attention, not a lens run"):
        registry.start_attention(new_id(), "x", lens_run_id=alone.run_id, store_hash="x", store_path=None,
                                 layers="all", positions="all", config={}, seed=0, code_version="test")
    broken = alone.model_copy(update={"top_tokens": alone.top_tokens * 2})  # one rank twice: refused, rolled back
    with pytest.raises(RegistryError):
        registry.finish_attention(broken, 0.5)
    assert registry.attention(alone.run_id or "") == alone
    registry.delete_run(related.run_id or "")
    registry.delete_run(alone.run_id or "")
    for table in ("ctexp_attention_masses", "ctexp_attention_tokens", "ctexp_attention_targets"):
        assert sql(db_url, f"SELECT count(*) FROM {table}") == [(0,)]


def test_upgrade_from_0004_keeps_every_run_and_downgrade_drops_attention(
    db_url: str, result: RunResult, config: ExperimentConfig,
) -> None:
    with Registry(db_url) as registry:
        kept = record(registry, result, name="kept")
        intervention = record_intervention(registry, kept.run_id)
        dropped = record_attention(registry, kept.run_id)
    migrate(db_url, "0004_interventions", down=True)  # a database of revision 0004, as that revision's code left it
    assert sql(db_url, "SELECT name, kind FROM ctexp_runs ORDER BY name") == [("kept", "lens"),
                                                                             ("zeroed", "intervention")]
    with pytest.raises(Exception, match="(?i)check"):
        sql(db_url, "UPDATE ctexp_runs SET kind = 'attention' WHERE id = :id", id=kept.run_id)
    engine = create_engine(db_url)
    try:
        assert not {"ctexp_attention_masses", "ctexp_attention_targets"} & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    results = sql(db_url, "SELECT count(*) FROM ctexp_results WHERE run_id = :id", id=kept.run_id)

    with Registry(db_url) as registry:  # upgrades to head: every row survives the table copy
        assert registry.current_revision() == HEAD
        assert registry.resolve(kept.run_id).test_top1 == kept.overall.top1
        assert registry.intervention(intervention.run_id) == intervention
        assert registry.resolve(intervention.run_id).source_run_id == kept.run_id
        assert sql(db_url, "SELECT count(*) FROM ctexp_results WHERE run_id = :id", id=kept.run_id) == results
        again = record_attention(registry, kept.run_id)
        assert registry.attention(again.run_id or "") == again
        with pytest.raises(RegistryError):
            registry.attention(dropped.run_id or "")
    with pytest.raises(Exception, match="(?i)check"):
        sql(db_url, "UPDATE ctexp_runs SET kind = 'bogus' WHERE id = :id", id=kept.run_id)


# ---------------------------------------------------------------------------------------------------------
# Tiny-CODI trainings (revision 0006)


def test_a_tinycodi_run_round_trips_and_downgrade_to_0005_drops_it(db_url: str, result: RunResult) -> None:
    with Registry(db_url) as registry:
        kept = record(registry, result, name="kept")
        run_id = new_id()
        registry.start_tinycodi(run_id, "tiny", settings={"latents": 4}, settings_hash="ab12", out="/models/t",
                                seed=0, code_version="test")
        registry.finish_tinycodi(run_id, {"out": "/models/t"}, 2.5)
        record_ = registry.resolve(run_id)
        assert (record_.kind, record_.status, record_.experiment, record_.lens, record_.store_path) == (
            "tinycodi", RunStatus.FINISHED, "tinycodi", "-", "/models/t")
        assert record_.config["training"] == {"out": "/models/t"}
        assert [r.id for r in registry.list_runs(kind="tinycodi")] == [run_id]
        with pytest.raises(RegistryError, match="is of kind lens, not a tiny-CODI run"):
            registry.finish_tinycodi(kept.run_id, {}, 1.0)
    migrate(db_url, "0005_attention", down=True)
    assert sql(db_url, "SELECT name, kind FROM ctexp_runs") == [("kept", "lens")]
    with pytest.raises(Exception, match="(?i)check"):
        sql(db_url, "UPDATE ctexp_runs SET kind = 'tinycodi' WHERE id = :id", id=kept.run_id)
    with Registry(db_url) as registry:  # upgrades to head again
        assert registry.current_revision() == HEAD
        assert registry.resolve(kept.run_id).test_top1 == kept.overall.top1
