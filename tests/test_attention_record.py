"""``ctexp attention`` is recorded like ``ctexp intervene``: a registry row with its report's rows, an MLflow run
with metrics, a figure and a description, a run directory; and ``runs``, ``show``, ``report`` and ``delete``
read attention analyses back. Uses the planted-attention store and lens run of ``test_attention``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from ctexp.analysis.attention import KIND_COLUMNS
from ctexp.experiment.recorder import Terminated
from ctexp.registry.locations import Locations
from tests.conftest import Cli, assert_one_line_error
from tests.test_attention import planted  # noqa: F401 - the fixture

FLAGS = ("--layers", "1-2", "--positions", "0-2,bot", "--resamples", "200")


@pytest.fixture(scope="module")
def recorded(planted: dict) -> dict:  # noqa: F811 - the fixture imported above
    """One attention analysis related to the lens run, as ``--json`` printed it."""
    return planted["cli"].json("attention", "--store", str(planted["root"] / "world"), "--run", planted["run"], *FLAGS)


def sql(cli: Cli, query: str, *params: object) -> list[tuple]:
    with sqlite3.connect(cli.home / "ctexp.db") as db:
        return db.execute(query, params).fetchall()


def mlflow_run(cli: Cli, run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cli.home}/mlflow.db")
    (mlflow_id,) = sql(cli, "SELECT mlflow_run_id FROM ctexp_runs WHERE id = ?", run_id)[0]
    return client, client.get_run(mlflow_id)


# --- what lands where ------------------------------------------------------------------------------


def test_the_registry_row_and_rows_are_what_was_printed(planted: dict, recorded: dict) -> None:  # noqa: F811
    cli: Cli = planted["cli"]
    run_id = recorded["run_id"]
    row = sql(cli, "SELECT kind, status, source_run_id, lens, split, target, store_hash, device, test_top1, seconds "
                   "FROM ctexp_runs WHERE id = ?", run_id)[0]
    lens = sql(cli, "SELECT lens, split, target, store_hash FROM ctexp_runs WHERE id = ?", planted["run"])[0]
    assert row[:3] == ("attention", "FINISHED", planted["run"])
    assert row[3:7] == lens and row[7] == "cpu" and row[8] is None and row[9] > 0
    assert recorded["run"]["id"] == planted["run"] and recorded["target"]
    with Locations.resolve(cli.home).registry() as registry:
        assert registry.attention(run_id).model_dump(mode="json") == recorded
    assert json.loads((cli.home / "runs" / run_id / "result.json").read_text()) == recorded
    masses = sql(cli, "SELECT layer, position, kind, mass FROM ctexp_attention_masses WHERE run_id = ?", run_id)
    assert sorted(masses) == sorted(
        (row["layer"], -1 if row["position"] == "bot" else row["position"], kind, row["mass"][kind])
        for row in recorded["kinds"] for kind in KIND_COLUMNS)
    targets = sql(cli, "SELECT position, correct_states, incorrect_states, mass_correct, mass_incorrect, difference, "
                       "ci_low, ci_high FROM ctexp_attention_targets WHERE run_id = ? ORDER BY position", run_id)
    assert targets == [(r["position"], r["correct_states"], r["incorrect_states"], r["correct"], r["incorrect"],
                        r["difference"], r["low"], r["high"]) for r in recorded["target"]]


def test_mlflow_holds_params_metrics_figure_report_and_description(planted: dict, recorded: dict) -> None:  # noqa: F811
    client, run = mlflow_run(planted["cli"], recorded["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ctexp.kind"] == "attention" and run.data.tags["ctexp.lens_run"] == planted["run"]
    assert run.data.params["layers"] == "1-2" and run.data.params["run"] == planted["run"]
    metrics = run.data.metrics
    assert len([key for key in metrics if key.startswith("attention/l")]) == 2 * 4 * len(KIND_COLUMNS)
    bot = next(row for row in recorded["kinds"] if (row["layer"], row["position"]) == (2, "bot"))
    assert metrics["attention/l2/pbot/question"] == pytest.approx(bot["mass"]["question"])
    for row in recorded["target"]:
        if row["difference"] is not None:
            assert metrics[f"attention/p{row['position']}/target_difference"] == pytest.approx(row["difference"])
    artifacts = {f.path for folder in ("figures", "run") for f in client.list_artifacts(run.info.run_id, folder)}
    assert {"figures/attention_kinds.png", "run/result.json"} <= artifacts
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("**Attention** of store") and f"lens run `{planted['run']}`" in note
    assert f"ctexp run `{recorded['run_id']}`" in note


def test_without_a_run_it_joins_the_attention_experiment(planted: dict) -> None:  # noqa: F811
    cli: Cli = planted["cli"]
    printed = cli("attention", "--store", str(planted["root"] / "other"), "--layers", "2").stdout
    assert "Attention mass by context kind" in printed and "recorded in" in printed
    run_id = printed.split("run ")[-1].split()[0]
    row = sql(cli, "SELECT r.kind, r.source_run_id, r.lens, r.target, r.layers, e.name FROM ctexp_runs r "
                   "JOIN ctexp_experiments e ON e.id = r.experiment_id WHERE r.id = ?", run_id)
    assert row == [("attention", None, "-", "-", "2", "attention")]
    shown = cli.json("show", run_id)
    assert shown.pop("record")["kind"] == "attention" and shown["run"] is None and shown["target"] is None
    _, run = mlflow_run(cli, run_id)
    assert "ctexp.lens_run" not in run.data.tags and "attention/p0/target_difference" not in run.data.metrics


# --- the commands that read them back ---------------------------------------------------------------


def test_runs_show_report_and_compare(planted: dict, recorded: dict, tmp_path: Path) -> None:  # noqa: F811
    cli: Cli = planted["cli"]
    run_id = recorded["run_id"]
    listed = cli.json("runs", "--kind", "attention")
    assert run_id in [run["id"] for run in listed] and {run["kind"] for run in listed} == {"attention"}
    assert planted["run"] not in [run["id"] for run in listed]
    shown = cli.json("show", run_id[:8])
    assert shown.pop("record")["source_run_id"] == planted["run"] and shown == recorded
    text = cli("show", run_id).stdout
    assert text.startswith(f"attention analysis {run_id}") and "correct vs incorrect" in text
    assert "Question tokens attended most" in text
    cli("show", run_id, "--answers", code=2)

    out = tmp_path / "attention.md"
    cli("report", run_id, "--out", str(out))
    report = out.read_text()
    for heading in ("# Attention", "### Attention mass by context kind", "### Question tokens attended most",
                    "### Attention on the target's occurrences", "### Observations", "### What the numbers mean",
                    "![attention_kinds.png]"):
        assert heading in report
    assert (tmp_path / "attention_kinds.png").read_bytes()[:4] == b"\x89PNG"
    client, run = mlflow_run(cli, run_id)
    assert "report/attention.md" in {f.path for f in client.list_artifacts(run.info.run_id, "report")}

    result = cli("compare", planted["run"], run_id, code=2)
    assert_one_line_error(result, 2, "compare takes lens runs or interventions")


def test_delete_removes_an_attention_analysis_everywhere(planted: dict) -> None:  # noqa: F811
    cli: Cli = planted["cli"]
    doomed = cli.json("attention", "--store", str(planted["root"] / "world"), "--layers", "1", "--positions", "bot")
    _, run = mlflow_run(cli, doomed["run_id"])
    cli("delete", doomed["run_id"], "--yes")
    cli("show", doomed["run_id"], code=8)
    assert not (cli.home / "runs" / doomed["run_id"]).exists()
    for table in ("ctexp_attention_masses", "ctexp_attention_tokens", "ctexp_attention_targets"):
        assert sql(cli, f"SELECT count(*) FROM {table} WHERE run_id = ?", doomed["run_id"]) == [(0,)]
    from mlflow import MlflowClient

    assert MlflowClient(f"sqlite:///{cli.home}/mlflow.db").get_run(run.info.run_id).info.lifecycle_stage == "deleted"


# --- life cycle -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("raised", "status", "code"), [
    (RuntimeError("boom"), "FAILED", 1), (KeyboardInterrupt(), "KILLED", 130), (Terminated(), "KILLED", 143),
])
def test_a_failure_mid_run_ends_it_with_nothing_half_written(
    planted: dict, monkeypatch: pytest.MonkeyPatch, raised: BaseException, status: str, code: int,  # noqa: F811
) -> None:
    import ctexp.experiment.attention as analysis

    cli: Cli = planted["cli"]

    def failing(*args, **kwargs):
        raise raised

    monkeypatch.setattr(analysis, "top_tokens", failing)  # after the masses, before anything is written
    cli("attention", "--store", str(planted["root"] / "world"), "--layers", "1", code=code)
    run_id, kind, ended, error = sql(cli, "SELECT id, kind, status, error FROM ctexp_runs "
                                          "ORDER BY started_at DESC LIMIT 1")[0]
    assert (kind, ended) == ("attention", status)
    assert error == {1: "RuntimeError: boom", 130: "interrupted", 143: "terminated (SIGTERM)"}[code]
    for table in ("ctexp_attention_masses", "ctexp_attention_tokens", "ctexp_attention_targets"):
        assert sql(cli, f"SELECT count(*) FROM {table} WHERE run_id = ?", run_id) == [(0,)]
    assert not (cli.home / "runs" / run_id).exists()
    _, run = mlflow_run(cli, run_id)
    assert run.info.status == status
    assert cli.json("show", run_id)["record"]["status"] == status  # shown without a report
    cli("delete", run_id, "--yes")


def test_bad_input_records_nothing(planted: dict) -> None:  # noqa: F811
    cli: Cli = planted["cli"]
    before = sql(cli, "SELECT count(*) FROM ctexp_runs")
    cli("attention", "--store", str(planted["root"] / "bare"), code=3)
    cli("attention", "--store", str(planted["root"] / "world"), "--layers", "0", code=2)
    assert sql(cli, "SELECT count(*) FROM ctexp_runs") == before
