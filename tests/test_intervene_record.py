"""``ctexp intervene`` is recorded like ``ctexp run``: a registry row with its rows and answers, an MLflow run
with metrics and a figure, a run directory; and ``runs``, ``show``, ``report``, ``compare`` and ``delete`` read
interventions back. Uses the tiny CODI store and lens run of ``test_intervene``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from ctexp.experiment.recorder import Terminated
from ctexp.model.intervene import Intervener
from ctexp.registry.locations import Locations
from tests.conftest import assert_one_line_error
from tests.test_intervene import Setup, intervene, intervene_json, one_thread, setup  # noqa: F401 - fixtures

FLAGS = ("--mode", "zero,swap,noise", "--positions", "0-1", "--problems", "all")


@pytest.fixture(scope="module")
def recorded(setup: Setup) -> dict:  # noqa: F811 - the fixture imported above
    """One recorded intervention, as ``--json --answers`` printed it."""
    return intervene_json(setup, *FLAGS)


def sql(where: Setup, query: str, *params: object) -> list[tuple]:
    with sqlite3.connect(where.cli.home / "ctexp.db") as db:
        return db.execute(query, params).fetchall()


def mlflow_run(where: Setup, run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{where.cli.home}/mlflow.db")
    (mlflow_id,) = sql(where, "SELECT mlflow_run_id FROM ctexp_runs WHERE id = ?", run_id)[0]
    return client, client.get_run(mlflow_id)


def newest(where: Setup) -> tuple:
    return sql(where, "SELECT id, kind, status, error FROM ctexp_runs ORDER BY started_at DESC LIMIT 1")[0]


# --- what lands where ------------------------------------------------------------------------------


def test_the_registry_row_rows_and_answers_are_what_was_printed(setup: Setup, recorded: dict) -> None:  # noqa: F811
    run_id = recorded["run_id"]
    row = sql(setup, "SELECT kind, status, source_run_id, lens, split, target, store_hash, test_top1, seconds "
                     "FROM ctexp_runs WHERE id = ?", run_id)[0]
    lens = sql(setup, "SELECT lens, split, target, store_hash FROM ctexp_runs WHERE id = ?", setup.run_id)[0]
    assert row[:3] == ("intervention", "FINISHED", setup.run_id)
    assert row[3:7] == lens and row[7] is None and row[8] > 0  # the lens columns of its lens run; no test top-1
    assert recorded["lens_run"] == recorded["config"]["run"] == setup.run_id
    with Locations.resolve(setup.cli.home).registry() as registry:
        assert registry.intervention(run_id).to_json(answers=True) == recorded
    shown = setup.cli.json("show", run_id[:8], "--answers")
    assert shown.pop("run")["kind"] == "intervention" and shown == recorded
    assert json.loads((setup.cli.home / "runs" / run_id / "result.json").read_text()) == recorded
    keys = sql(setup, "SELECT row_key, position, mode, n, lost, gained, significant FROM ctexp_intervention_rows "
                      "WHERE run_id = ? ORDER BY ordinal", run_id)
    assert keys == [(f"p{r['position']}/{r['mode']}", None if r["position"] == "all" else r["position"], r["mode"],
                     r["n"], r["lost"], r["gained"], int(r["significant"])) for r in recorded["rows"]]
    answers = sql(setup, "SELECT row_key, problem_id, text, parsed, correct FROM ctexp_intervention_answers "
                         "WHERE run_id = ? AND row_key = 'p1/zero' ORDER BY ordinal", run_id)
    expected = next(r for r in recorded["rows"] if r["position"] == 1 and r["mode"] == "zero")["answers"]
    assert answers == [("p1/zero", a["problem_id"], a["text"], a["parsed"], int(a["correct"])) for a in expected]
    control = sql(setup, "SELECT count(*) FROM ctexp_intervention_answers WHERE run_id = ? AND row_key = 'control'",
                  run_id)
    assert control == [(recorded["control"]["n"],)]


def test_mlflow_holds_params_metrics_figure_and_result(setup: Setup, recorded: dict) -> None:  # noqa: F811
    client, run = mlflow_run(setup, recorded["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ctexp.kind"] == "intervention" and run.data.tags["ctexp.lens_run"] == setup.run_id
    assert run.data.params["site"] == "feedback" and run.data.params["modes"] == "zero,swap,noise"
    metrics = run.data.metrics
    assert metrics["intervene/control/accuracy"] == pytest.approx(recorded["control"]["accuracy"])
    for row in recorded["rows"]:
        prefix = f"intervene/p{row['position']}/{row['mode']}"
        assert metrics[f"{prefix}/accuracy"] == pytest.approx(row["accuracy"])
        assert {f"{prefix}/delta", f"{prefix}/changed", f"{prefix}/p_holm"} <= set(metrics)
    assert "intervene/pall/swap/delta" in metrics
    artifacts = {f.path for folder in ("figures", "run") for f in client.list_artifacts(run.info.run_id, folder)}
    assert {"figures/intervention_accuracy.png", "run/result.json"} <= artifacts
    note = run.data.tags["mlflow.note.content"]  # the run page's description, from the result
    assert f"control accuracy {100 * recorded['control']['accuracy']:.2f}%" in note
    assert f"lens run `{setup.run_id}`" in note
    assert note.count("\n| ") == len(recorded["rows"]) + 1  # header and one table line per row


# --- the commands that read runs back ---------------------------------------------------------------


def test_runs_lists_interventions_by_kind(setup: Setup, recorded: dict) -> None:  # noqa: F811
    interventions = setup.cli.json("runs", "--kind", "intervention")
    assert recorded["run_id"] in [run["id"] for run in interventions]
    assert {run["kind"] for run in interventions} == {"intervention"}
    assert [run["id"] for run in setup.cli.json("runs", "--kind", "lens")] == [setup.run_id]
    table = setup.cli("runs", "--kind", "intervention").stdout
    assert "Kind" in table and "intervention" in table and "Test top-1" in table
    line = next(line for line in table.splitlines() if recorded["run_id"][:12] in line)
    assert " - " in line  # no test top-1
    setup.cli("runs", "--kind", "bogus", code=2)


def test_show_prints_the_control_the_rows_and_the_flipped_answers(setup: Setup, recorded: dict) -> None:  # noqa: F811
    run_id = recorded["run_id"]
    text = setup.cli("show", run_id).stdout
    assert text.startswith(f"intervention {run_id}") and "control: " in text and "Delta [95% CI]" in text
    flipped = setup.cli("show", run_id, "--answers").stdout
    assert "flipped" in flipped
    lost = sum(row["lost"] + row["gained"] for row in recorded["rows"])
    assert flipped.count(" lost ") + flipped.count(" gained ") >= min(lost, 1)
    plain = setup.cli.json("show", run_id)
    assert "answers" not in plain["control"] and "answers" not in plain["rows"][0]
    error = setup.cli("show", setup.run_id, "--answers", code=2).stderr
    assert "--answers is for intervention runs" in error


def test_report_writes_the_rows_the_figure_and_their_meaning(setup: Setup, recorded: dict, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "intervention.md"
    setup.cli("report", recorded["run_id"], "--out", str(out))
    text = out.read_text()
    for heading in ("# Intervention", "## Results", "### Observations", "### What the numbers mean",
                    "![intervention_accuracy.png]"):
        assert heading in text
    for row in recorded["rows"]:
        assert f"| {row['mode']} | {row['position']} | {row['n']} |" in text
    assert (tmp_path / "intervention_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    client, run = mlflow_run(setup, recorded["run_id"])
    assert "report/intervention.md" in {f.path for f in client.list_artifacts(run.info.run_id, "report")}


def test_compare_two_interventions_row_by_row(setup: Setup, recorded: dict) -> None:  # noqa: F811
    other = intervene_json(setup, "--mode", "zero,noise", "--positions", "0-1", "--problems", "all", "--seed", 3)
    compared = json.loads(setup.cli("compare", recorded["run_id"], other["run_id"], "--format", "json").stdout)
    pair, = compared["comparisons"]
    assert (pair["reference"], pair["other"]) == (recorded["run_id"], other["run_id"])
    assert [(row["mode"], row["position"]) for row in pair["rows"]] == [("control", None)] + [
        (row["mode"], row["position"]) for row in recorded["rows"] if row["mode"] in ("zero", "noise")]
    assert {"key": "seed", "reference": 0, "other": 3} in pair["config"]
    for row in pair["rows"][1:]:
        mine = next(r for r in recorded["rows"] if (r["mode"], r["position"]) == (row["mode"], row["position"]))
        theirs = next(r for r in other["rows"] if (r["mode"], r["position"]) == (row["mode"], row["position"]))
        assert (row["reference_accuracy"], row["other_accuracy"]) == pytest.approx((mine["accuracy"], theirs["accuracy"]))
        assert row["n"] == mine["n"] and row["p_holm"] >= row["p_value"]
    zero = next(row for row in pair["rows"] if row["mode"] == "zero")
    assert (zero["delta"], zero["lost"], zero["gained"], zero["p_value"]) == (0, 0, 0, 1)  # zero ignores the seed
    table = setup.cli("compare", recorded["run_id"], other["run_id"]).stdout
    assert "config seed: 0 -> 3" in table and "Delta [95% CI]" in table

    result = setup.cli("compare", setup.run_id, recorded["run_id"], code=2)
    assert_one_line_error(result, 2, "cannot compare a lens run with an intervention")
    setup.cli("compare", recorded["run_id"], other["run_id"], "--format", "csv", code=2)
    setup.cli("compare", recorded["run_id"], other["run_id"], "--plot", str(setup.cli.home / "x.png"), code=2)


# --- life cycle -----------------------------------------------------------------------------------


def test_an_intervention_is_not_a_lens_run_to_intervene_on(setup: Setup, recorded: dict) -> None:  # noqa: F811
    flags = ["--model", setup.assets.llama_dir, "--base", setup.assets.llama.base, "--device", "cpu"]
    result = setup.cli("intervene", "--run", recorded["run_id"], *[str(flag) for flag in flags], code=8)
    assert "intervene needs a finished lens run" in result.stderr


@pytest.mark.parametrize(("raised", "status", "code"), [
    (RuntimeError("boom"), "FAILED", 1), (KeyboardInterrupt(), "KILLED", 130), (Terminated(), "KILLED", 143),
])
def test_a_failure_mid_intervention_ends_the_run_with_nothing_half_written(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, raised: BaseException, status: str, code: int,  # noqa: F811
) -> None:
    real = Intervener.replaced
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the control and one row
            raise raised
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Intervener, "replaced", failing)
    intervene(setup, "--mode", "zero", "--positions", "0-2", code=code)
    run_id, kind, ended, error = newest(setup)
    assert (kind, ended) == ("intervention", status)
    assert error == {1: "RuntimeError: boom", 130: "interrupted", 143: "terminated (SIGTERM)"}[code]
    for table in ("ctexp_intervention_rows", "ctexp_intervention_answers"):
        assert sql(setup, f"SELECT count(*) FROM {table} WHERE run_id = ?", run_id) == [(0,)]
    assert not (setup.cli.home / "runs" / run_id).exists()
    _, run = mlflow_run(setup, run_id)
    assert run.info.status == status
    setup.cli("delete", run_id, "--yes")


def test_unreachable_tracking_server_fails_before_the_model_loads(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import ctexp.experiment.intervene as planning

    monkeypatch.setattr(planning, "load_codi", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    runs = sql(setup, "SELECT count(*) FROM ctexp_runs")
    result = intervene(setup, "--tracking-uri", "http://user:secret@127.0.0.1:9", code=9)
    assert "secret" not in result.stderr and sql(setup, "SELECT count(*) FROM ctexp_runs") == runs


def test_delete_removes_an_intervention_everywhere(setup: Setup) -> None:  # noqa: F811
    doomed = intervene_json(setup, "--mode", "zero", "--positions", "1")
    _, run = mlflow_run(setup, doomed["run_id"])
    setup.cli("delete", doomed["run_id"], "--yes")
    setup.cli("show", doomed["run_id"], code=8)
    assert not (setup.cli.home / "runs" / doomed["run_id"]).exists()
    for table in ("ctexp_intervention_rows", "ctexp_intervention_answers"):
        assert sql(setup, f"SELECT count(*) FROM {table} WHERE run_id = ?", doomed["run_id"]) == [(0,)]
    from mlflow import MlflowClient

    assert MlflowClient(f"sqlite:///{setup.cli.home}/mlflow.db").get_run(run.info.run_id).info.lifecycle_stage == "deleted"
    assert setup.cli.json("show", setup.run_id)["run"]["kind"] == "lens"  # its lens run stays
