"""MLflow tracking: a real run recorded in a SQLite store, read back through a client bound to it.

Creating MLflow's SQLite schema takes seconds, so one store (and one recorded run) serves the module.
Nothing here uses ``mlflow.set_tracking_uri`` or the fluent API: every read goes through an
``MlflowClient`` bound to the test's URI, so no global MLflow state leaks between tests.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from ctexp.analysis.figures import save_figures
from ctexp.analysis.result import RunResult
from ctexp.config import build_config
from ctexp.data.sources.world import build_world
from ctexp.errors import TrackingError
from ctexp.experiment.pipeline import run_experiment
from ctexp.registry.tracking.datasets import store_dataset
from ctexp.registry.tracking.describe import describe, describe_unfinished
from ctexp.registry.tracking.names import final_metrics, flatten_config
from ctexp.registry.tracking.tracker import Tracker
from ctexp.registry.tracking.uris import mask_password, quiet_mlflow, resolve_tracking_uri, safe_artifact_path
from tests.conftest import Cli

SMALL = {"world.problems": 120, "world.layers": 2, "world.hidden": 16, "train.epochs": 2}
EXPERIMENT = "tracking-test"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ["figures/layer_position_top1.png", "figures/position_top1.png", "figures/training_curves.png"]


@dataclass(frozen=True)
class Store:
    home: Path
    uri: str
    tracker: Tracker
    client: mlflow.MlflowClient


@dataclass(frozen=True)
class Recorded:
    result: RunResult
    run_dir: Path
    mlflow_run_id: str


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    home = tmp_path_factory.mktemp("tracking-home")
    uri = f"sqlite:///{home}/mlflow.db"
    return Store(home, uri, Tracker(uri), mlflow.MlflowClient(tracking_uri=uri))


@pytest.fixture(scope="module")
def recorded(store: Store) -> Recorded:
    """One small run, recorded as the CLI will: start, one call per epoch, finish with its rendered figures."""
    result = run_experiment(build_config(None, SMALL), home=store.home)
    run_dir = store.home / "runs" / result.run_id
    run_id = store.tracker.start_run(
        experiment=EXPERIMENT,
        run_name=result.name,
        ctexp_run_id=result.run_id,
        params=flatten_config(result.config),
        tags={"ctexp.store_hash": result.store.content_hash, "ctexp.code_version": "test"},
        dataset=store_dataset(build_world(build_config(None, SMALL).world)),
    )
    for epoch in result.epochs:
        store.tracker.log_epoch(run_id, epoch)
    store.tracker.finish_run(run_id, result, run_dir, save_figures(result, store.home / "figures" / result.run_id))
    return Recorded(result, run_dir, run_id)


@pytest.fixture(scope="module")
def identity(store: Store) -> Recorded:
    """An identity-lens run (no epochs), recorded the same way."""
    result = run_experiment(build_config(None, {**SMALL, "lens": "identity"}), home=store.home)
    run_dir = store.home / "runs" / result.run_id
    run_id = store.tracker.start_run(
        experiment=EXPERIMENT, run_name=result.name, ctexp_run_id=result.run_id,
        params=flatten_config(result.config), tags={},
    )
    store.tracker.finish_run(run_id, result, run_dir, save_figures(result, store.home / "figures" / result.run_id))
    return Recorded(result, run_dir, run_id)


def _experiment_id(store: Store) -> str:
    experiment = store.client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    return experiment.experiment_id


def _artifact_paths(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    paths = []
    for info in client.list_artifacts(run_id, path):
        paths.extend(_artifact_paths(client, run_id, info.path) if info.is_dir else [info.path])
    return paths


def test_recorded_run_reads_back(store: Store, recorded: Recorded) -> None:
    runs = store.client.search_runs(
        [_experiment_id(store)], f"tags.`ctexp.run_id` = '{recorded.result.run_id}'"
    )
    assert [run.info.run_id for run in runs] == [recorded.mlflow_run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == recorded.result.name
    assert run.data.metrics["test/top1"] == pytest.approx(recorded.result.overall.top1)
    assert run.data.metrics["prior/top1"] == pytest.approx(recorded.result.baselines["prior"].overall.top1)
    assert run.data.params["train.lr"] == "0.001"
    assert run.data.params["world.layers"] == "2"
    assert run.data.params["store"] == "null"
    assert run.data.tags["ctexp.run_id"] == recorded.result.run_id
    assert run.data.tags["ctexp.code_version"] == "test"
    assert run.data.tags["ctexp.store_hash"] == recorded.result.store.content_hash
    assert run.data.tags["mlflow.user"]


def test_experiments_are_marked_model_training_so_the_ui_opens_on_runs(store: Store, recorded: Recorded) -> None:
    experiment = store.client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # An experiment made before ctexp marked them (or by hand) is marked on its next run.
    store.client.create_experiment("unmarked", artifact_location=(store.home / "artifacts").as_uri())
    store.tracker.start_run(experiment="unmarked", run_name="r", ctexp_run_id="r", params={}, tags={})
    assert store.client.get_experiment_by_name("unmarked").tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_description_tells_the_result_in_markdown(store: Store, recorded: Recorded) -> None:
    result = recorded.result
    note = store.client.get_run(recorded.mlflow_run_id).data.tags["mlflow.note.content"]
    assert note == describe(result)
    overall, (low, high) = result.overall, result.overall.ci["top1"]
    assert note.startswith(f"**Test top-1 {100 * overall.top1:.2f}% [{100 * low:.1f}, {100 * high:.1f}]**")
    for name, label in (("prior", "prior (train-set token frequencies)"), ("identity", "logit lens (identity)")):
        baseline = result.baselines[name].overall
        lift = 100 * (overall.top1 - baseline.top1)
        assert f"- Baseline {label}: top-1 {100 * baseline.top1:.2f}%" in note
        assert f"; lift {lift:+.2f} points" in note
    positions = result.rows("position")
    table = [line for line in note.splitlines() if line.startswith("| ") and not line.startswith("| Position")]
    assert len(table) == len(positions)
    for line, row in zip(table, positions, strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:2] == [str(row.position), f"{row.n:,}"] and cells[3] == f"{100 * row.top1:.2f}%"
        assert cells[7:9] == [f"{100 * row.prior_top1:.2f}%", f"{100 * row.identity_top1:.2f}%"]
    best = max(result.rows("layer"), key=lambda row: row.top1)
    assert f"**Best layer**: {best.layer}, top-1 {100 * best.top1:.2f}%" in note
    (config_line,) = [line for line in note.splitlines() if line.startswith("**Config**: ")]
    assert config_line == "**Config**: `" + " ".join(f"{k}={v}" for k, v in flatten_config(result.config).items()) + "`"


def test_a_run_without_results_says_how_it_stands() -> None:
    config = build_config(None, SMALL).model_dump(mode="json")
    running = describe_unfinished("RUNNING", config)
    assert running.startswith("**RUNNING**: training; the results replace this description") and "train.lr=0.001" in running
    assert describe_unfinished("FAILED", config, "ValueError: boom").startswith("**FAILED**: ValueError: boom\n")
    with pytest.raises(TypeError, match="no run description for dict"):
        describe(config)


def test_the_store_is_the_runs_dataset_input(store: Store, recorded: Recorded) -> None:
    (dataset_input,) = store.client.get_run(recorded.mlflow_run_id).inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.digest == recorded.result.store.content_hash
    assert dataset.name == recorded.result.store.model  # the embedded world: its spec names it
    assert (dataset.source_type, json.loads(dataset.source)) == ("code", {"uri": recorded.result.store.model})
    columns = {column["name"]: column["type"] for column in json.loads(dataset.schema)["mlflow_colspec"]}
    assert columns == {"hidden": "float32 [120, 3, 7, 16]", "norm.weight": "float32 [16]",
                       "unembed.weight": "float32 [1586, 16]", "problems": "jsonl [120]"}
    assert json.loads(dataset.profile)["problems"] == 120
    assert [(tag.key, tag.value) for tag in dataset_input.tags] == [("mlflow.data.context", "train/val/test")]


def test_runs_on_one_store_on_disk_share_its_dataset(tmp_path: Path) -> None:
    """Through the CLI: the dataset is the store directory, and two runs on it name the same (name, digest)."""
    cli = Cli(tmp_path / "home")
    out = tmp_path / "stores" / "small"
    cli("world", "--out", str(out), "--problems", "120", "--layers", "2", "--hidden", "16")
    results = [cli.json("run", "--store", str(out), "--epochs", "1", "--lens", lens) for lens in ("layer", "identity")]
    client = mlflow.MlflowClient(f"sqlite:///{cli.home}/mlflow.db")
    experiment = client.get_experiment_by_name("default")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    datasets = []
    for result in results:
        (run,) = client.search_runs([experiment.experiment_id], f"tags.`ctexp.run_id` = '{result['run_id']}'")
        (dataset_input,) = run.inputs.dataset_inputs
        datasets.append(dataset_input.dataset)
        assert run.data.tags["mlflow.note.content"] == describe(RunResult.model_validate(result))
    assert datasets[0] == datasets[1]
    assert datasets[0].digest == results[0]["store"]["content_hash"]
    assert (datasets[0].name, datasets[0].source_type) == ("small", "local")
    assert json.loads(datasets[0].source) == {"uri": str(out.resolve())}


def test_a_dataset_another_worker_inserted_first_is_shared_not_an_error(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sweep workers start runs on one store at once: both miss the dataset, one insert loses the race."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first, second = Tracker(uri), Tracker(uri)
    dataset = store_dataset(build_world(build_config(None, SMALL).world))
    log_inputs = second._client.log_inputs
    lost = []

    def losing_the_race(run_id: str, datasets: list) -> None:
        if not lost:  # the other worker inserts the row between this worker's lookup and its insert
            first.start_run(experiment=EXPERIMENT, run_name="a", ctexp_run_id="a", params={}, tags={}, dataset=dataset)
            lost.append(run_id)
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        log_inputs(run_id, datasets)

    monkeypatch.setattr(second._client, "log_inputs", losing_the_race)
    run_id = second.start_run(experiment=EXPERIMENT, run_name="b", ctexp_run_id="b", params={}, tags={},
                              dataset=dataset)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (dataset_input,) = client.get_run(run_id).inputs.dataset_inputs
    assert lost == [run_id] and dataset_input.dataset.digest == dataset.digest
    assert client.get_run(run_id).info.status == "RUNNING"


def test_other_refusals_to_log_the_dataset_still_fail_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")

    def refusing(run_id: str, datasets: list) -> None:
        raise MlflowException("dataset schema too large")

    monkeypatch.setattr(tracker._client, "log_inputs", refusing)
    with pytest.raises(TrackingError, match="log the run's dataset"):
        tracker.start_run(experiment=EXPERIMENT, run_name="c", ctexp_run_id="c", params={}, tags={},
                          dataset=store_dataset(build_world(build_config(None, SMALL).world)))


def test_epoch_metrics_have_a_history(store: Store, recorded: Recorded) -> None:
    history = store.client.get_metric_history(recorded.mlflow_run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([e.val_loss for e in recorded.result.epochs])
    for key in ("train_loss", "val_top1", "val_top5", "val_top10", "epoch_seconds"):
        assert len(store.client.get_metric_history(recorded.mlflow_run_id, key)) == 2


def test_artifacts_hold_the_run_directory_and_figures(store: Store, recorded: Recorded, tmp_path: Path) -> None:
    paths = _artifact_paths(store.client, recorded.mlflow_run_id)
    for name in ("config.json", "result.json", "predictions.jsonl", "lens.safetensors", "lens.json"):
        assert f"run/{name}" in paths
    assert set(FIGURES) <= set(paths)
    local = Path(store.client.download_artifacts(recorded.mlflow_run_id, "figures", str(tmp_path)))
    for png in local.iterdir():
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, png
    # Artifacts live next to the database, never in the working directory.
    artifact_uri = store.client.get_run(recorded.mlflow_run_id).info.artifact_uri
    assert artifact_uri.startswith((store.home / "artifacts").resolve().as_uri())


def test_identity_run_still_gets_figures(store: Store, identity: Recorded, tmp_path: Path) -> None:
    assert identity.result.epochs == []
    assert set(FIGURES) <= set(_artifact_paths(store.client, identity.mlflow_run_id))
    assert store.client.get_metric_history(identity.mlflow_run_id, "val_loss") == []
    for path in save_figures(identity.result, tmp_path):
        assert path.read_bytes().startswith(PNG_MAGIC)


def test_parent_and_child(store: Store) -> None:
    parent = store.tracker.start_run(
        experiment=EXPERIMENT, run_name="sweep", ctexp_run_id="sweep-1", params={"search.trials": "2"}, tags={}
    )
    child = store.tracker.start_run(
        experiment=EXPERIMENT, run_name="trial-0", ctexp_run_id="trial-0", params={}, tags={},
        parent_run_id=parent,
    )
    children = store.client.search_runs([_experiment_id(store)], f"tags.mlflow.parentRunId = '{parent}'")
    assert [run.info.run_id for run in children] == [child]
    store.tracker.end_run(child, "KILLED")
    store.tracker.end_run(parent, "FAILED")
    assert store.client.get_run(child).info.status == "KILLED"
    assert store.client.get_run(parent).info.status == "FAILED"
    with pytest.raises(ValueError, match="FAILED or KILLED"):
        store.tracker.end_run(child, "FINISHED")  # type: ignore[arg-type]


def test_many_params_go_in_batches(store: Store) -> None:
    params = {f"p{i:03d}": str(i) for i in range(250)}  # over MLflow's 100 per log_batch
    run_id = store.tracker.start_run(
        experiment=EXPERIMENT, run_name="wide", ctexp_run_id="wide", params=params, tags={}
    )
    assert store.client.get_run(run_id).data.params == params
    store.tracker.end_run(run_id, "KILLED")


def test_delete_run_removes_it_and_its_artifacts(store: Store, recorded: Recorded) -> None:
    run_id = store.tracker.start_run(
        experiment=EXPERIMENT, run_name="doomed", ctexp_run_id="doomed", params={}, tags={}
    )
    store.tracker.finish_run(run_id, recorded.result, recorded.run_dir)
    artifacts = Path(store.client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    assert (artifacts / "run" / "result.json").exists()
    store.tracker.delete_run(run_id)
    assert store.client.get_run(run_id).info.lifecycle_stage == "deleted"
    assert run_id not in [run.info.run_id for run in store.tracker.search(EXPERIMENT)]
    deleted = store.client.search_runs([_experiment_id(store)], run_view_type=ViewType.DELETED_ONLY)
    assert run_id in [run.info.run_id for run in deleted]
    assert not artifacts.parent.exists()
    assert (store.home / "artifacts" / recorded.mlflow_run_id).exists()  # others untouched


def test_log_artifact_later_and_reject_escaping_paths(store: Store, recorded: Recorded, tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    store.tracker.log_artifact(recorded.mlflow_run_id, report, "reports/v1")
    assert "reports/v1/report.md" in _artifact_paths(store.client, recorded.mlflow_run_id)
    for bad in ("../outside", "/etc", "reports/../../x", "C:\\temp", "a\\..\\b"):
        with pytest.raises(TrackingError, match="relative folder inside the run"):
            store.tracker.log_artifact(recorded.mlflow_run_id, report, bad)
    with pytest.raises(TrackingError, match="does not exist"):
        store.tracker.log_artifact(recorded.mlflow_run_id, tmp_path / "missing.md")


def test_safe_artifact_path() -> None:
    assert safe_artifact_path(None) is None
    assert safe_artifact_path(".") is None
    assert safe_artifact_path("reports/./v1") == "reports/v1"
    with pytest.raises(TrackingError):
        safe_artifact_path("..")


def test_mlflow_failures_are_one_tracking_error_line(store: Store) -> None:
    with pytest.raises(TrackingError) as caught:
        store.tracker.log_epoch("0" * 32, _epoch())
    message = str(caught.value)
    assert "\n" not in message and message.startswith("MLflow could not log epoch 1 at sqlite:///")
    assert caught.value.exit_code == 9


def test_a_failing_finish_marks_the_run_failed(
    store: Store, recorded: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = store.tracker.start_run(
        experiment=EXPERIMENT, run_name="broken", ctexp_run_id="broken", params={}, tags={}
    )

    def refuse(*args: object, **kwargs: object) -> None:
        raise MlflowException("artifact store is full")

    monkeypatch.setattr(store.tracker._client, "log_artifacts", refuse)
    with pytest.raises(TrackingError, match="could not log the run directory .*artifact store is full"):
        store.tracker.finish_run(run_id, recorded.result, recorded.run_dir)
    monkeypatch.undo()
    assert store.client.get_run(run_id).info.status == "FAILED"


def test_finish_needs_the_run_directory(store: Store, recorded: Recorded, tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="does not exist"):
        store.tracker.finish_run(recorded.mlflow_run_id, recorded.result, tmp_path / "nope")


def test_warm_up_in_a_thread(store: Store) -> None:
    tracker = Tracker(store.uri)
    thread = threading.Thread(target=tracker.warm_up)
    thread.start()
    run_id = tracker.start_run(experiment=EXPERIMENT, run_name="warm", ctexp_run_id="warm", params={}, tags={})
    thread.join()
    tracker.end_run(run_id, "KILLED")
    assert store.client.get_run(run_id).info.status == "KILLED"


def test_search_unknown_experiment_is_empty(store: Store) -> None:
    assert store.tracker.search("no-such-experiment") == []


def test_builtin_default_experiment_is_refused_locally(store: Store) -> None:
    with pytest.raises(TrackingError, match="working directory"):
        store.tracker.start_run(experiment="Default", run_name="x", ctexp_run_id="x", params={}, tags={})


# --- check(): fast failures before training -------------------------------------------------


def test_check_fails_fast_on_a_closed_port() -> None:
    started = time.perf_counter()
    with pytest.raises(TrackingError, match=r"cannot reach the MLflow tracking server at http://127\.0\.0\.1:9"):
        Tracker("http://127.0.0.1:9").check()
    assert time.perf_counter() - started < 6


def test_check_masks_passwords() -> None:
    with pytest.raises(TrackingError) as caught:
        Tracker("http://user:secret@127.0.0.1:9").check()
    message = str(caught.value)
    assert "secret" not in message and "user:***@127.0.0.1:9" in message
    assert "check --tracking-uri / MLFLOW_TRACKING_URI" in message
    masked = mask_password("see postgresql://a:b@h/db and https://x:y@z")
    assert masked == "see postgresql://a:***@h/db and https://x:***@z"


@pytest.mark.parametrize("uri", ["ftp://host/x", "/bare/path", "mysql://u:pw@h/db", "sqlite://", "sqlite:///:memory:"])
def test_check_refuses_unsupported_uris(uri: str) -> None:
    with pytest.raises(TrackingError) as caught:
        Tracker(uri).check()
    assert "pw" not in str(caught.value)


def test_unsupported_scheme_fails_before_mlflow() -> None:
    with pytest.raises(TrackingError, match="unsupported MLflow tracking URI"):
        Tracker("ftp://host/x").start_run(experiment="e", run_name="r", ctexp_run_id="r", params={}, tags={})


def test_check_local_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Tracker(f"sqlite:///{tmp_path}/deep/er/mlflow.db").check()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TrackingError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        Tracker(f"file://{tmp_path}/mlruns").check()  # MLflow 3.17 refuses file stores by default
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    Tracker(f"file://{tmp_path}/mlruns").check()
    assert list(tmp_path.iterdir()) == []  # checking creates nothing
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TrackingError, match="is not a directory"):
        Tracker(f"sqlite:///{blocker}/mlflow.db").check()
    with pytest.raises(TrackingError, match="is not a directory"):
        Tracker(f"sqlite:///{tmp_path}/db", artifact_root=blocker / "artifacts").check()


class _Handler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # the name http.server dispatches to
        body = b'{"experiments": []}' if self.path.startswith("/api/2.0/mlflow/experiments/search") else b"no"
        status = self.status if body != b"no" else 404
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_check_talks_to_the_rest_api(server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{server.server_address[1]}"
    Tracker(url).check()
    with pytest.raises(TrackingError, match="HTTP 404 .* not an MLflow tracking server"):
        Tracker(f"{url}/prefix").check()
    monkeypatch.setattr(_Handler, "status", 401)
    with pytest.raises(TrackingError, match="HTTP 401, credentials refused"):
        Tracker(url).check()


def test_check_gives_up_on_a_silent_server() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        started = time.perf_counter()
        with pytest.raises(TrackingError, match="no answer within 5 s"):
            Tracker(f"http://127.0.0.1:{silent.getsockname()[1]}").check()
        assert time.perf_counter() - started < 6


# --- pure helpers ---------------------------------------------------------------------------


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://env:5000"
    assert resolve_tracking_uri("http://flag:5000", tmp_path) == "http://flag:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert resolve_tracking_uri("", tmp_path).startswith("sqlite:////")


def test_flatten_config() -> None:
    flat = flatten_config(build_config(None, {}).model_dump(mode="json"))
    assert flat["train.lr"] == "0.001"
    assert flat["world.problems"] == "600"
    assert flat["lens"] == "layer" and flat["split"] == "uniform" and flat["name"] == "null"
    assert flatten_config({"a": {"b": {"c": True}}, "d": [1, 2]}) == {"a.b.c": "true", "d": "1,2"}


def test_final_metrics(recorded: Recorded) -> None:
    result = recorded.result
    metrics = final_metrics(result)
    assert metrics["test/top1"] == result.overall.top1
    low, high = result.overall.ci["top1"]
    assert (metrics["test/top1_low"], metrics["test/top1_high"]) == (low, high)
    assert metrics["identity/top1"] == result.baselines["identity"].overall.top1
    position3 = next(row for row in result.rows("position") if row.position == 3)
    assert metrics["position3/top1"] == position3.top1
    assert metrics["position3/lift_prior"] == position3.lift_prior
    assert metrics["layer2/top1"] == next(row for row in result.rows("layer") if row.layer == 2).top1
    assert "cell/l2_p3/top1" in metrics and "cell/l2_p3/top1_low" not in metrics  # cells: top-1 only
    assert metrics["run/epochs"] == 2
    assert all(isinstance(value, float) for value in metrics.values())
    assert "prior/prior_top1" not in metrics  # None values are left out


def test_mlflow_stays_offline_and_off_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.telemetry.utils import is_telemetry_disabled

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    Tracker("sqlite:///unused.db")
    assert is_telemetry_disabled()
    assert mlflow.environment_variables.MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    quiet_mlflow()  # an explicit choice stands
    assert not mlflow.environment_variables.MLFLOW_DISABLE_TELEMETRY.get()


def _epoch():
    from ctexp.analysis.result import EpochMetrics

    return EpochMetrics(epoch=1, train_loss=1.0, val_loss=1.0, val_top1=0.1, val_top5=0.2, val_top10=0.3, seconds=0.1)
