"""Sweeps end to end: trials as runs in SQL and MLflow, pruning, resuming, exact counts, dead workers.

The sweeps run on a small world (120 problems, 2 layers, hidden 16) with 6 epochs, so that a trial
takes a second or two. PostgreSQL tests run on ``CTEXP_TEST_POSTGRES_URL``, else the local server, and
skip only where none answers; each works in a database of its own (results database and Optuna storage
both), dropped afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import Cli, app_command, copy_home, needs_postgres

WORLD = ["--world-problems", "120", "--world-layers", "2", "--world-hidden", "16"]
SWEEP = [*WORLD, "--epochs", "6", "--patience", "2"]
MAIN = ["sweep", *SWEEP, "--n-trials", "12", "--workers", "2", "--study", "main", "--seed", "0"]
# The ctexp CLI in a process of its own (for tests that kill workers).
CTEXP = [sys.executable, "-m", "ctexp.cli"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sweep-home")


@pytest.fixture(scope="module")
def main_sweep(home: Path) -> dict:
    """12 trials, 2 worker processes, the default space, TPE and the median pruner."""
    return Cli(home).json(*MAIN)


def journal(home: Path) -> optuna.storages.BaseStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(home / "optuna.journal")))


def runs_of(home: Path, sweep_id: int) -> list[tuple]:
    with sqlite3.connect(home / "ctexp.db") as db:
        return db.execute(
            "SELECT trial_number, status, id, mlflow_run_id, test_top1, best_val_loss FROM ctexp_runs "
            "WHERE sweep_id = ? ORDER BY trial_number", (sweep_id,),
        ).fetchall()


# ---------------------------------------------------------------------------------------------------------
# One sweep, two workers


def test_two_workers_finish_twelve_trials_with_some_pruned(main_sweep: dict) -> None:
    counts = main_sweep["counts"]
    assert counts["complete"] + counts["pruned"] == 12 and counts["failed"] == counts["running"] == 0
    assert counts["pruned"] >= 1, counts
    assert [trial["number"] for trial in main_sweep["trials"]] == list(range(12))
    workers = {trial["state"] for trial in main_sweep["trials"]}
    assert workers <= {"COMPLETE", "PRUNED"}
    best = main_sweep["best"]
    values = [t["value"] for t in main_sweep["trials"] if t["state"] == "COMPLETE"]
    assert best["value"] == max(values) and main_sweep["sweep"]["status"] == "FINISHED"
    assert set(best["params"]) == {"train.lr", "train.weight_decay", "train.batch_size"}


def test_trials_ran_in_two_processes_that_each_loaded_the_store_once(home: Path, main_sweep: dict) -> None:
    study = optuna.load_study(study_name="main", storage=journal(home))
    pids = {trial.user_attrs["ctexp_worker"]["pid"] for trial in study.trials}
    assert len(pids) == 2 and os.getpid() not in pids


def test_every_trial_is_a_run_and_a_child_mlflow_run(home: Path, main_sweep: dict) -> None:
    from mlflow import MlflowClient

    sweep = main_sweep["sweep"]
    runs = runs_of(home, sweep["id"])
    states = {trial["number"]: trial["state"] for trial in main_sweep["trials"]}
    assert [row[0] for row in runs] == list(range(12))
    assert {row[0]: row[1] for row in runs} == {n: "FINISHED" if s == "COMPLETE" else "PRUNED" for n, s in states.items()}
    with sqlite3.connect(home / "ctexp.db") as db:
        for number, status, run_id, _, test_top1, _ in runs:
            epochs = db.execute("SELECT COUNT(*) FROM ctexp_epochs WHERE run_id = ?", (run_id,)).fetchone()[0]
            assert epochs >= 1  # a pruned trial keeps its partial history
            assert (test_top1 is None) == (status == "PRUNED")  # ... and is never tested

    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    parent = client.get_run(sweep["mlflow_parent_run_id"])
    assert parent.data.tags["ctexp.sweep"] == "main" and parent.info.status == "FINISHED"
    assert parent.data.params["search.train.lr"] == "log:0.0001:0.01"
    params = {trial["number"]: trial["params"] for trial in main_sweep["trials"]}
    for number, status, _, mlflow_run_id, _, _ in runs:
        child = client.get_run(mlflow_run_id)
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["ctexp.trial_number"] == str(number)
        for key, value in params[number].items():
            assert child.data.params[key] == str(value)
        if status == "PRUNED":
            assert child.info.status == "KILLED" and child.data.tags["ctexp.pruned"] == "true"
        else:
            assert child.info.status == "FINISHED" and "test/top1" in child.data.metrics


def test_recovery_reading_a_run_just_before_its_worker_finished_it_leaves_it_finished(
    home: Path, main_sweep: dict, tmp_path: Path
) -> None:
    """A worker's recovery pass races another worker finishing a trial: if it read the run RUNNING and then
    the trial COMPLETE, the run is not dead; both stores keep it FINISHED."""
    from mlflow import MlflowClient

    from ctexp.registry.locations import Locations
    from ctexp.registry.models import RunStatus
    from ctexp.sweep.recovery import WorkerId, recover

    copy = tmp_path / "home"
    copy_home(home, copy)
    locations = Locations.resolve(copy)
    registry, tracker = locations.registry(), locations.tracker()
    sweep_id = main_sweep["sweep"]["id"]
    finished = [run for run in registry.list_trials(sweep_id) if run.status is RunStatus.FINISHED]

    class ReadJustBeforeTheyFinished:  # the registry as one racing read saw it: every trial's run RUNNING
        def __getattr__(self, name: str) -> object:
            return getattr(registry, name)

        def list_trials(self, sweep: int) -> list:
            return [run.model_copy(update={"status": RunStatus.RUNNING}) for run in registry.list_trials(sweep)]

    study = optuna.load_study(study_name="main", storage=journal(copy))
    try:
        assert recover(study, ReadJustBeforeTheyFinished(), tracker, sweep_id, WorkerId.current()) == []
        client = MlflowClient(f"sqlite:///{copy}/mlflow.db")
        assert finished and all(registry.resolve(run.id).status is RunStatus.FINISHED for run in finished)
        assert {client.get_run(run.mlflow_run_id).info.status for run in finished} == {"FINISHED"}
    finally:
        registry.close()


def test_optuna_dashboard_reads_the_objective_and_each_trials_mlflow_run(home: Path, main_sweep: dict) -> None:
    """The study names its value (optuna-dashboard shows val_top1, not "Objective 0"); each trial names its
    ctexp run and its MLflow run; MLflow opens the experiment on its runs, each run described."""
    from mlflow import MlflowClient

    study = optuna.load_study(study_name="main", storage=journal(home))
    assert study.metric_names == ["val_top1"]
    mlflow_ids = {row[2]: row[3] for row in runs_of(home, main_sweep["sweep"]["id"])}
    for trial in study.trials:
        assert trial.user_attrs["ctexp_mlflow_run_id"] == mlflow_ids[trial.user_attrs["ctexp_run_id"]]

    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    parent = client.get_run(main_sweep["sweep"]["mlflow_parent_run_id"])
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    note = parent.data.tags["mlflow.note.content"]
    best = main_sweep["best"]
    assert note.startswith("**Sweep `main`**: maximize `val_top1` (validation) over 12 trials, tpe sampler, median")
    assert f"**Best trial**: {best['number']}, val_top1 = {best['value']:.4f}, ctexp run `{best['run_id']}`" in note
    store_hash = json.loads((home / "runs" / best["run_id"] / "result.json").read_text())["store"]["content_hash"]
    for trial in study.trials:
        child = client.get_run(trial.user_attrs["ctexp_mlflow_run_id"])
        described = child.data.tags["mlflow.note.content"]
        if trial.state.name == "PRUNED":
            assert described.startswith("**PRUNED**: pruned at epoch ")
        else:
            assert described.startswith("**Test top-1 ") and "train.lr=" in described
        (dataset,) = child.inputs.dataset_inputs  # every trial decodes the same store
        assert dataset.dataset.digest == store_hash


def test_best_configuration_reruns_with_ctexp_run(home: Path, main_sweep: dict) -> None:
    best_toml = Path(main_sweep["best_toml"])
    assert best_toml == home / "sweeps" / "main" / "best.toml"
    result = Cli(home).json("run", "--config", str(best_toml))
    best = main_sweep["best"]
    assert result["config"]["train"]["lr"] == best["params"]["train.lr"]
    assert result["config"]["train"]["batch_size"] == best["params"]["train.batch_size"]
    assert result["config"] == {**main_sweep["best_config"], "name": "main-best"}
    at_best = next(epoch for epoch in result["epochs"] if epoch["epoch"] == result["best_epoch"])
    assert at_best["val_top1"] == pytest.approx(best["value"], abs=1e-6)  # the run reproduces the trial


def test_rerunning_resumes_and_never_exceeds_n_trials(home: Path, main_sweep: dict) -> None:
    cli = Cli(home)
    again = cli.json(*MAIN)
    assert len(again["trials"]) == 12 and again["counts"] == main_sweep["counts"]
    more = cli.json("sweep", *SWEEP, "--n-trials", "14", "--workers", "1", "--study", "main", "--seed", "0")
    assert more["counts"]["complete"] + more["counts"]["pruned"] == 14 and len(more["trials"]) == 14
    assert len(runs_of(home, main_sweep["sweep"]["id"])) == 14


def test_sweeps_lists_and_show_summarises(home: Path, main_sweep: dict) -> None:
    cli = Cli(home)
    listed = {sweep["name"]: sweep for sweep in cli.json("sweeps")}
    assert listed["main"]["runs"]["FINISHED"] + listed["main"]["runs"].get("PRUNED", 0) >= 12
    assert listed["main"]["objective"] == "val_top1" and listed["main"]["direction"] == "maximize"
    shown = cli.json("sweep", "--show", "main")
    assert shown["counts"]["complete"] + shown["counts"]["pruned"] >= 12
    assert set(shown["importances"]) == {"train.lr", "train.weight_decay", "train.batch_size"}
    assert shown["importance_evaluator"] in ("fanova", "ped-anova")
    assert abs(sum(shown["importances"].values()) - 1) < 1e-6
    assert [t["value"] for t in shown["top"]] == sorted((t["value"] for t in shown["top"]), reverse=True)
    assert "Parameter importances" in cli("sweep", "--show", "main").stdout
    assert "main" in cli("sweeps").stdout


def test_a_changed_definition_is_refused(home: Path, main_sweep: dict) -> None:
    result = Cli(home)(*MAIN, "--search", "train.lr=log:1e-3:1e-2", code=2)
    assert "exists with another search space" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Objectives and samplers


def test_position_objective_is_the_mean_validation_top1_there(home: Path) -> None:
    out = Cli(home).json("sweep", *SWEEP, "--n-trials", "2", "--study", "positions", "--objective", "positions:2-3",
                         "--sampler", "random", "--pruner", "none", "--search", "split_peak=float:0:5",
                         "--search", "split_width=choice:0.8,3")
    assert out["sweep"]["direction"] == "maximize" and out["counts"]["complete"] == 2
    assert optuna.load_study(study_name="positions", storage=journal(home)).metric_names == ["val_top1[positions 2,3]"]
    for trial in out["trials"]:
        result = json.loads((home / "runs" / trial["run_id"] / "result.json").read_text())
        at_best = next(e for e in result["epochs"] if e["epoch"] == result["best_epoch"])
        expected = (at_best["val_position_top1"]["2"] + at_best["val_position_top1"]["3"]) / 2
        assert trial["value"] == pytest.approx(expected)
        assert result["config"]["split"].startswith("weighted:")  # the split family made the weights


def test_grid_over_categoricals_with_the_loss_objective(home: Path) -> None:
    out = Cli(home).json("sweep", *SWEEP, "--study", "grid", "--objective", "val_loss", "--sampler", "grid",
                         "--search", "lens=choice:layer,layer-position", "--search", "train.batch_size=choice:16,64",
                         "--n-trials", "10")
    assert out["n_trials"] == 4 and out["sweep"]["direction"] == "minimize"  # capped to the grid's size
    assert optuna.load_study(study_name="grid", storage=journal(home)).metric_names == ["val_loss"]
    assert any("the grid has 4 points" in warning for warning in out["warnings"])
    points = {(t["params"]["lens"], t["params"]["train.batch_size"]) for t in out["trials"]}
    assert points == {("layer", 16), ("layer", 64), ("layer-position", 16), ("layer-position", 64)}
    losses = {row[2]: row[5] for row in runs_of(home, out["sweep"]["id"])}
    for trial in out["trials"]:
        if trial["state"] == "COMPLETE":
            assert trial["value"] == pytest.approx(losses[trial["run_id"]])  # the best epoch's val loss
    complete = [t for t in out["trials"] if t["state"] == "COMPLETE"]
    assert out["best"]["value"] == min(t["value"] for t in complete)


def test_a_diverging_trial_is_pruned_its_run_failed_and_the_sweep_goes_on(home: Path) -> None:
    from mlflow import MlflowClient

    out = Cli(home).json("sweep", *SWEEP, "--study", "diverge", "--sampler", "grid", "--pruner", "none",
                         "--search", "train.lr=choice:1e5,1e-3", "--n-trials", "2")
    states = {trial["params"]["train.lr"]: trial["state"] for trial in out["trials"]}
    assert states == {1e5: "PRUNED", 1e-3: "COMPLETE"} and out["sweep"]["status"] == "FINISHED"
    statuses = {row[2]: row[1] for row in runs_of(home, out["sweep"]["id"])}
    study = optuna.load_study(study_name="diverge", storage=journal(home))
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    for trial in study.trials:
        run_status = statuses[trial.user_attrs["ctexp_run_id"]]
        if trial.params["train.lr"] == 1e5:
            assert run_status == "FAILED" and "training diverged at epoch" in trial.user_attrs["ctexp_error"]
            note = client.get_run(trial.user_attrs["ctexp_mlflow_run_id"]).data.tags["mlflow.note.content"]
            assert note.startswith("**FAILED**: TrainingDiverged: training diverged at epoch")
        else:
            assert run_status == "FINISHED"


def test_rerunning_fails_and_retries_trials_whose_worker_died(home: Path) -> None:
    """Trials left RUNNING by dead workers (one that noted itself, one that died before) are failed,
    retried with their parameters, and the rerun ends with exactly n_trials done and none RUNNING."""
    args = ["sweep", *SWEEP, "--study", "orphans", "--pruner", "none", "--search", "train.lr=choice:0.001,0.003"]
    Cli(home).json(*args, "--n-trials", "1")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    study = optuna.load_study(study_name="orphans", storage=journal(home))
    noted = study.ask({"train.lr": optuna.distributions.CategoricalDistribution([0.001, 0.003])})
    noted.set_user_attr("ctexp_worker", {**study.trials[0].user_attrs["ctexp_worker"], "pid": int(dead.stdout)})
    silent = study.ask()  # its worker died before noting itself
    out = Cli(home).json(*args, "--n-trials", "3")
    assert out["counts"] == {"complete": 3, "pruned": 0, "failed": 2, "running": 0, "waiting": 0}
    by_number = {trial["number"]: trial for trial in out["trials"]}
    assert by_number[noted.number]["state"] == by_number[silent.number]["state"] == "FAIL"
    retries = {trial["retry_of"]: trial for trial in out["trials"] if trial["retry_of"] is not None}
    assert set(retries) == {noted.number, silent.number}
    assert retries[noted.number]["params"] == {"train.lr": noted.params["train.lr"]}
    assert all(trial["state"] == "COMPLETE" for trial in retries.values())


@pytest.mark.parametrize(("args", "fragment"), [
    (["--search", "train.momentum=log:0.1:1"], "'train.momentum' cannot be searched; searchable keys:"),
    (["--search", "train.lr=log:0:1"], "a log range needs LOW > 0"),
    (["--search", "train.lr=lig:1:2"], "unknown spec 'lig:1:2'"),
    (["--search", "train.lr"], "is not KEY=SPEC"),
    (["--search", "lens=choice:layer,nope"], "value 'nope'"),
    (["--sampler", "grid", "--search", "train.lr=log:1e-4:1e-2"], "the grid sampler needs finite values"),
    (["--sampler", "cmaes"], "unknown --sampler 'cmaes'; choose one of: tpe, random, grid"),
    (["--pruner", "asha"], "unknown --pruner 'asha'; choose one of: median, hyperband, none"),
    (["--objective", "test_top1"], "unknown objective 'test_top1'"),
    (["--objective", "positions:9"], "position 9 is beyond the store's 0-5"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--lens", "identity"], "the identity lens trains nothing"),
    (["--storage", "mysql://u@h/db"], "unsupported --storage"),
])
def test_bad_input_is_one_line_and_runs_nothing(tmp_path: Path, args: list[str], fragment: str) -> None:
    cli = Cli(tmp_path / "home")
    result = cli("sweep", *WORLD, *args, code=2)
    assert fragment in result.stderr
    assert cli.run_dirs() == [] and not (tmp_path / "home" / "optuna.journal").exists()


def test_unknown_sweep_is_one_line(home: Path) -> None:
    assert "no sweep named 'nope'" in Cli(home)("sweep", "--show", "nope", code=8).stderr


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL: many workers on one storage, a worker killed mid-trial




def pg_runs(url: str, sweep_name: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(
                "SELECT r.trial_number, r.status, r.id, r.error FROM ctexp_runs r JOIN ctexp_sweeps s "
                "ON s.id = r.sweep_id WHERE s.name = :name ORDER BY r.trial_number, r.started_at"), {"name": sweep_name})]
    finally:
        engine.dispose()


def assert_consistent(url: str, name: str, n_trials: int) -> optuna.Study:
    """Exactly n_trials complete or pruned trials, none RUNNING, one ctexp run per trial in its state."""
    study = optuna.load_study(study_name=name, storage=url)
    states = [trial.state.name for trial in study.trials]
    assert "RUNNING" not in states and "WAITING" not in states, states
    assert states.count("COMPLETE") + states.count("PRUNED") == n_trials, states
    runs = pg_runs(url, name)
    by_trial: dict[int, list[tuple]] = {}
    for row in runs:
        by_trial.setdefault(row[0], []).append(row)
    assert sorted(by_trial) == sorted(trial.number for trial in study.trials if trial.user_attrs.get("ctexp_run_id"))
    for trial in study.trials:
        if trial.state.name in ("COMPLETE", "PRUNED"):
            (row,) = by_trial[trial.number]  # never duplicated
            assert row[1] == ("FINISHED" if trial.state.name == "COMPLETE" else "PRUNED")
            assert row[2] == trial.user_attrs["ctexp_run_id"]
    return study


@needs_postgres
def test_two_workers_on_one_postgresql_storage_make_exactly_n_trials(postgres_url: str, tmp_path: Path) -> None:
    out = Cli(tmp_path / "home").json(
        "sweep", *SWEEP, "--n-trials", "6", "--workers", "2", "--study", "pg", "--storage", postgres_url,
        "--db-url", postgres_url,
    )
    assert out["counts"]["complete"] + out["counts"]["pruned"] == 6 and out["counts"]["failed"] == 0
    study = assert_consistent(postgres_url, "pg", 6)
    assert len({trial.user_attrs["ctexp_worker"]["pid"] for trial in study.trials}) == 2


@needs_postgres
def test_a_worker_killed_mid_trial_is_failed_retried_and_the_rerun_completes(postgres_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    # Long trials (40 epochs, no pruning) so that one is surely running when its worker is killed.
    command = [*CTEXP, "sweep", *WORLD, "--epochs", "40", "--patience", "40", "--pruner", "none", "--n-trials", "4",
               "--workers", "2", "--study", "killed", "--storage", postgres_url, "--db-url", postgres_url,
               "--home", str(home), "--json"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.5)
            with contextlib.suppress(Exception):  # the study or the tables may not exist yet
                study = optuna.load_study(study_name="killed", storage=postgres_url)
                running = [t for t in study.trials if t.state.name == "RUNNING" and t.user_attrs.get("ctexp_worker")]
                started = {row[2] for row in pg_runs(postgres_url, "killed") if row[1] == "RUNNING"}
                victim = next((t for t in running if t.user_attrs.get("ctexp_run_id") in started
                               and len(t.intermediate_values) >= 1), None)
        assert victim is not None, "no trial got to its first epoch"
        os.kill(victim.user_attrs["ctexp_worker"]["pid"], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 0, stderr.decode()[-2000:]
    assert "worker process died (signal 9)" in stderr.decode()
    study = assert_consistent(postgres_url, "killed", 4)
    killed = study.trials[victim.number]
    assert killed.state.name == "FAIL"
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == killed.params and retries[0].state.name == "COMPLETE"
    (row,) = [row for row in pg_runs(postgres_url, "killed") if row[2] == killed.user_attrs["ctexp_run_id"]]
    assert row[1] == "FAILED" and "worker died" in row[3]

    rerun = subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert json.loads(rerun.stdout)["counts"]["complete"] == 4
    assert len(assert_consistent(postgres_url, "killed", 4).trials) == len(study.trials)  # nothing new ran


def test_the_example_search_file_is_valid(tmp_path: Path) -> None:
    from ctexp.sweep.request import build_request

    example = Path(__file__).resolve().parents[1] / "examples" / "sweep.toml"
    request = build_request(example, {}, [])
    assert set(request.space.params) == {"lens", "target", "split", "train.lr", "train.weight_decay",
                                         "train.batch_size"}
    request.space.check(request.base, n_positions=6, n_states=9)  # the default world's sizes
    assert request.space.params["split"].names == ["uniform", "peaked", "late"]
    dry = Cli(tmp_path / "home").json("run", "--config", str(example), "--dry-run")  # [search] is not the run's
    assert dry["config"]["train"]["epochs"] == 30


def test_sweep_takes_the_experiment_flags_of_run() -> None:
    commands = {name: app_command(name) for name in ("run", "sweep", "sweeps")}
    run_flags = {param.name for param in commands["run"].params} - {"dry_run", "as_json", "seed", "name"}
    assert run_flags <= {param.name for param in commands["sweep"].params}
    assert "Example: ctexp sweep" in commands["sweep"].help and "Example: ctexp sweeps" in commands["sweeps"].help


def test_searchable_keys_are_the_fields_the_config_declares_searchable() -> None:
    from ctexp.config import config_fields
    from ctexp.sweep.space import build_space, field_types

    assert field_types() == {
        "lens": str, "adapter": str, "adapter_rank": int, "split": str, "empty": str, "target": str, "layers": str,
        "positions": str, "subset": str, "train.lr": float, "train.weight_decay": float, "train.batch_size": int,
        "train.epochs": int, "train.patience": int, "train.clip": float, "split_peak": float, "split_width": float,
    }
    assert {field.key for field in config_fields() if field.searchable} < set(field_types())
    space = build_space({"train": {"lr": "log:1e-4:1e-2"}, "lens": ["layer", "global"]}, ["train.epochs=int:2:4"])
    assert space.specs() == {"train.lr": "log:0.0001:0.01", "lens": "choice:layer,global", "train.epochs": "int:2:4"}
