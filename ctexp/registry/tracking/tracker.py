"""Recording runs in MLflow: parameters, per-epoch metrics, final metrics, artifacts and figures.

The figures arrive as files (the recorder renders them): the registry stores, it does not draw.

Only ``MlflowClient`` is used, bound to one tracking URI per ``Tracker``: no fluent ``mlflow.start_run``,
no active run, no ``mlflow.set_tracking_uri``, so concurrent trackers (sweep workers, tests) never
share state. ``mlflow`` is imported lazily because importing it takes over a second, which a run
without tracking must not pay.

Every failure of MLflow, of its database or of the network is raised as one ``TrackingError`` line,
with passwords in URIs masked.

Costs (2-core machine): importing mlflow 1-2 s, opening an existing SQLite store 0.5-0.8 s (creating
one 2-7 s); then each recorded run ~0.15-0.25 s of metrics and artifacts (rendering its three figures,
the recorder's part, adds ~0.3-0.45 s; ``python bench/registry.py`` measures both).
``Tracker.warm_up`` pays the fixed part ahead. A recorded run makes all its calls from the recorder's
background writer (``experiment.recorder.MlflowWriter``), so that these costs overlap its training.

Long because: ``Tracker`` is one class, the whole surface of MLflow as ctexp uses it (runs, metrics,
artifacts, the store and server checks), each method behind the same error translation.
"""

from __future__ import annotations

import getpass
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal, NoReturn, TypeVar
from urllib.parse import unquote, urlparse

from ctexp.analysis.result import EpochMetrics, RunResult
from ctexp.errors import TrackingError
from ctexp.locking import file_lock
from ctexp.registry.tracking.datasets import StoreDataset
from ctexp.registry.tracking.describe import NOTE_TAG, describe
from ctexp.registry.tracking.names import final_metrics
from ctexp.registry.tracking.uris import (
    check_writable,
    failure_reason,
    file_uri_path,
    mask_password,
    quiet_mlflow,
    remove_run_artifacts,
    safe_artifact_path,
    tracking_failures,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

CHECK_TIMEOUT_S = 2.5  # per phase (connect, read): at most 5 s in all before training starts
PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
METRICS_PER_BATCH = 1000
REMOTE_SCHEMES = ("http", "https")
LOCAL_SCHEMES = ("sqlite", "file")
RUN_ARTIFACTS = "run"
FIGURE_ARTIFACTS = "figures"
DEFAULT_EXPERIMENT_ID = "0"
# MLflow 3's UI reads this tag to open an experiment on the view of its kind (the runs table, not the GenAI
# overview of traces and token usage). 3.17 reads it only with its "GenAI / Model training" switch off, so
# `ctexp ui` also prints a URL that turns the switch to model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# How SQLite, PostgreSQL and MySQL word a uniqueness violation, as MLflow passes it on.
DUPLICATE_ROW_MESSAGES = ("unique constraint failed", "duplicate key value", "duplicate entry")

T = TypeVar("T")


class Tracker:
    """Records ctexp runs in one MLflow tracking store (a SQLite file, a file store or a server).

    Args:
        tracking_uri: ``sqlite:///PATH``, ``file:///PATH`` or ``http(s)://HOST[:PORT]``.
        artifact_root: where experiments that this tracker creates keep their artifacts, for local
            stores only (a server decides for itself). Default for SQLite: ``artifacts/`` next to the
            database, so that artifacts never land in the working directory; for a file store: inside
            the store.
    """

    def __init__(self, tracking_uri: str, artifact_root: Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.scheme = urlparse(tracking_uri).scheme.lower()
        self._artifact_root = artifact_root
        self._opened: MlflowClient | None = None
        self._opening = threading.Lock()  # warm_up may open the client in another thread
        quiet_mlflow()

    @property
    def display_uri(self) -> str:
        """The tracking URI with its password masked, for messages."""
        return mask_password(self.tracking_uri)

    @property
    def is_local(self) -> bool:
        """Whether the store (and its default artifact location) is on this machine."""
        return self.scheme in LOCAL_SCHEMES

    @property
    def artifact_location(self) -> str | None:
        """The ``file://`` URI given to experiments this tracker creates (None: MLflow's default)."""
        if self.scheme == "sqlite":
            root = self._artifact_root or self._local_store_path().resolve().parent / "artifacts"
        elif self.scheme == "file" and self._artifact_root is not None:
            root = self._artifact_root
        else:
            return None
        return root.resolve().as_uri()

    def check(self) -> None:
        """Fail fast, before training, if runs cannot be recorded.

        A server gets one GET of its REST API (no retries, at most ~5 s); a local store needs its
        directory to exist, or be creatable, and be writable, and a file store needs
        ``MLFLOW_ALLOW_FILE_STORE=true`` (MLflow 3.17 refuses it otherwise). Nothing is created.

        Raises:
            TrackingError: unreachable server, refused credentials, unwritable directory, or an
                unsupported URI scheme.
        """
        if self.scheme in REMOTE_SCHEMES:
            self._check_server()
        elif self.scheme in LOCAL_SCHEMES:
            if self.scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
                raise TrackingError(
                    f"MLflow 3 refuses file stores such as {self.display_uri} unless MLFLOW_ALLOW_FILE_STORE=true; "
                    "use sqlite:///PATH/mlflow.db instead (check --tracking-uri / MLFLOW_TRACKING_URI)"
                )
            store = self._local_store_path()
            check_writable(store.parent if self.scheme == "sqlite" else store, "MLflow store")
            if self.scheme == "sqlite" and store.exists() and not os.access(store, os.R_OK | os.W_OK):
                raise TrackingError(f"the MLflow database {store} is not writable; check its permissions")
            if self.artifact_location is not None:
                check_writable(file_uri_path(self.artifact_location), "MLflow artifact")
        else:
            self._unsupported_scheme()

    def start_run(
        self,
        *,
        experiment: str,
        run_name: str,
        ctexp_run_id: str,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
        dataset: StoreDataset | None = None,
        description: str | None = None,
    ) -> str:
        """Create an MLflow run (and its experiment if new), with tags, parameters and its input dataset.

        The experiment is marked as a model-training one (``mlflow.experimentKind``), so that MLflow's
        UI opens it on its runs table.

        Args:
            experiment: MLflow experiment name; created on first use.
            run_name: the run's display name.
            ctexp_run_id: ctexp's run id, stored as the tag ``ctexp.run_id``.
            params: parameters (e.g. ``flatten_config(config)``), logged in batches of 100.
            tags: further tags (``ctexp.store_hash``, ``ctexp.code_version``,
                ``mlflow.source.git.commit``, ...); they cannot override ``ctexp.run_id``.
            parent_run_id: the MLflow run this one nests under (a sweep's parent run).
            dataset: the activation store the run decodes (``datasets.store_dataset``), logged as the
                run's dataset input.
            description: Markdown for the run's description (the run note) until ``log_results``
                writes the result's own.

        Returns:
            The MLflow run id.

        Raises:
            TrackingError: MLflow refused or could not be reached.
        """
        from mlflow.entities import Param

        all_tags = {"mlflow.user": _user(), **tags, "ctexp.run_id": ctexp_run_id}
        if parent_run_id is not None:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if description is not None:
            all_tags[NOTE_TAG] = description
        with self._errors(f"start a run in experiment {experiment!r}"):
            experiment_id = self._experiment_id(experiment)
            run = self._client.create_run(
                experiment_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=run_name
            )
        run_id = run.info.run_id
        with self._failing_run(run_id), self._errors("log the run's parameters"):
            for chunk in _chunks(sorted(params.items()), PARAMS_PER_BATCH):
                self._client.log_batch(run_id, params=[Param(k, str(v)) for k, v in chunk], synchronous=True)
        if dataset is not None:
            with self._failing_run(run_id), self._errors("log the run's dataset"):
                self._log_dataset(run_id, dataset)
        return run_id

    def _log_dataset(self, run_id: str, dataset: StoreDataset) -> None:
        """``log_inputs``, once more where another worker inserted the same dataset first.

        MLflow looks a dataset up by (experiment, name, digest) and inserts it when missing, in two
        steps: two sweep workers starting runs on one store at once can both miss it, and the second
        insert then fails on the table's uniqueness. Retried, the lookup finds the first worker's row.
        """
        from mlflow.exceptions import MlflowException

        try:
            self._client.log_inputs(run_id, [dataset.to_mlflow()])
        except MlflowException as error:
            if not _is_duplicate_row(error):
                raise
            self._client.log_inputs(run_id, [dataset.to_mlflow()])

    def log_epoch(self, mlflow_run_id: str, epoch: EpochMetrics) -> None:
        """Log one epoch's training metrics at ``step = epoch.epoch``, in one call.

        Raises:
            TrackingError: MLflow refused or could not be reached.
        """
        values = {
            "train_loss": epoch.train_loss,
            "val_loss": epoch.val_loss,
            "val_top1": epoch.val_top1,
            "val_top5": epoch.val_top5,
            "val_top10": epoch.val_top10,
            "epoch_seconds": epoch.seconds,
        }
        with self._errors(f"log epoch {epoch.epoch}"):
            self._client.log_batch(mlflow_run_id, metrics=_metrics(values, step=epoch.epoch), synchronous=True)

    def finish_run(
        self, mlflow_run_id: str, result: RunResult, run_dir: Path, figures: Sequence[Path] = ()
    ) -> None:
        """Log the final metrics, the run directory and the figures; then mark the run FINISHED.

        ``log_results`` then ``log_figures``, then the status. On failure the run is marked FAILED
        (best effort) before the error is raised.

        Args:
            mlflow_run_id: from ``start_run``.
            result: the finished run.
            run_dir: ``HOME/runs/RUN_ID`` (config.json, result.json, predictions.jsonl, lens files).
            figures: the run's rendered figures (``ctexp.analysis.figures.save_figures``).

        Raises:
            TrackingError: MLflow refused or could not be reached, or ``run_dir`` is not a directory.
        """
        with self._failing_run(mlflow_run_id):
            self.log_results(mlflow_run_id, result, run_dir)
            self.log_figures(mlflow_run_id, figures)
            with self._errors("mark the run finished"):
                self._client.set_terminated(mlflow_run_id, "FINISHED")

    def log_results(self, mlflow_run_id: str, result: RunResult, run_dir: Path) -> None:
        """Log the final metrics (``final_metrics``), the description (``describe``, as the run note) and
        the run directory under the artifact folder ``run/``.

        Raises:
            TrackingError: MLflow refused or could not be reached, or ``run_dir`` is not a directory.
        """
        if not run_dir.is_dir():
            raise TrackingError(f"run directory {run_dir} does not exist; cannot log its artifacts")
        with self._errors("log the final metrics"):
            for chunk in _chunks(sorted(final_metrics(result).items()), METRICS_PER_BATCH):
                self._client.log_batch(mlflow_run_id, metrics=_metrics(dict(chunk), step=0), synchronous=True)
        self.set_tags(mlflow_run_id, {NOTE_TAG: describe(result)})
        with self._errors("log the run directory"):
            self._client.log_artifacts(mlflow_run_id, str(run_dir), RUN_ARTIFACTS)

    def log_figures(self, mlflow_run_id: str, figures: Sequence[Path]) -> None:
        """Log a run's figures (PNG files, rendered by the caller) under ``figures/``.

        Raises:
            TrackingError: MLflow refused or could not be reached, or a figure is missing.
        """
        with self._errors("log the figures"):
            for figure in figures:
                self._client.log_artifact(mlflow_run_id, str(figure), FIGURE_ARTIFACTS)

    def end_run(self, mlflow_run_id: str, status: Literal["FAILED", "KILLED"]) -> None:
        """Mark a run that did not finish: FAILED (an error) or KILLED (interrupted, pruned).

        Raises:
            ValueError: another status.
            TrackingError: MLflow refused or could not be reached.
        """
        if status not in ("FAILED", "KILLED"):
            raise ValueError(f"end_run takes FAILED or KILLED, not {status!r}; finish_run finishes a run")
        with self._errors(f"mark the run {status}"):
            self._client.set_terminated(mlflow_run_id, status)

    def set_tags(self, mlflow_run_id: str, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags of a run, e.g. ``ctexp.pruned`` or a sweep's best trial.

        Raises:
            TrackingError: MLflow refused or could not be reached.
        """
        from mlflow.entities import RunTag

        with self._errors("set the run's tags"):
            self._client.log_batch(mlflow_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_metrics(self, mlflow_run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log metrics of a run at ``step`` in one call (a sweep's parent run: best value, trial counts).

        Raises:
            TrackingError: MLflow refused or could not be reached.
        """
        with self._errors("log metrics"):
            self._client.log_batch(mlflow_run_id, metrics=_metrics(metrics, step=step), synchronous=True)

    def set_status(self, mlflow_run_id: str, status: Literal["RUNNING", "FINISHED", "FAILED", "KILLED"]) -> None:
        """Set the status of a run that is not a ctexp run of its own (a sweep's parent run).

        RUNNING reopens it (a resumed sweep); the other statuses end it now.

        Raises:
            ValueError: another status.
            TrackingError: MLflow refused or could not be reached.
        """
        if status not in ("RUNNING", "FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"unknown MLflow run status {status!r}")
        with self._errors(f"mark the run {status}"):
            if status == "RUNNING":
                self._client.update_run(mlflow_run_id, status="RUNNING")
            else:
                self._client.set_terminated(mlflow_run_id, status)

    def log_artifact(self, mlflow_run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Attach a file (or a directory's files) to a run, e.g. a report written later.

        Args:
            mlflow_run_id: the run.
            path: a local file or directory.
            artifact_path: a relative folder inside the run's artifacts (no ``..``, not absolute).

        Raises:
            TrackingError: a missing ``path``, an escaping ``artifact_path``, or an MLflow failure.
        """
        folder = safe_artifact_path(artifact_path)
        if not path.exists():
            raise TrackingError(f"cannot log {path} to MLflow: it does not exist")
        with self._errors(f"log the artifact {path.name}"):
            if path.is_dir():
                self._client.log_artifacts(mlflow_run_id, str(path), folder)
            else:
                self._client.log_artifact(mlflow_run_id, str(path), folder)

    def download_artifact(self, mlflow_run_id: str, artifact_path: str, directory: Path) -> Path | None:
        """Download one artifact file of a run (e.g. ``run/predictions.jsonl``) into ``directory``.

        Args:
            mlflow_run_id: the run.
            artifact_path: the file's path inside the run's artifacts (no ``..``, not absolute).
            directory: an existing local directory to download into.

        Returns:
            The local path of the downloaded file, or None when the run has no such artifact.

        Raises:
            TrackingError: an escaping ``artifact_path``, or MLflow refused or could not be reached.
        """
        path = safe_artifact_path(artifact_path)
        if path is None:
            raise TrackingError("download_artifact needs a file path inside the run's artifacts, not '.'")
        parent = str(PurePosixPath(path).parent)
        with self._errors(f"download the artifact {path}"):
            listed = {entry.path for entry in self._client.list_artifacts(mlflow_run_id, None if parent == "." else parent)
                      if not entry.is_dir}
            if path not in listed:
                return None
            return Path(self._client.download_artifacts(mlflow_run_id, path, str(directory)))

    def delete_run(self, mlflow_run_id: str) -> None:
        """Delete a run (MLflow keeps it, marked deleted, until ``mlflow gc``) and its local artifacts.

        Raises:
            TrackingError: MLflow refused or could not be reached.
        """
        with self._errors("delete the run"):
            artifact_uri = self._client.get_run(mlflow_run_id).info.artifact_uri
            self._client.delete_run(mlflow_run_id)
        if artifact_uri and artifact_uri.startswith("file:"):
            remove_run_artifacts(file_uri_path(artifact_uri), mlflow_run_id)

    def search(self, experiment: str, filter_string: str = "") -> list[Run]:
        """The active runs of an experiment, newest first (all pages); [] for an unknown experiment.

        Raises:
            TrackingError: MLflow refused or could not be reached.
        """
        with self._errors(f"search experiment {experiment!r}"):
            found = self._client.get_experiment_by_name(experiment)
            if found is None:
                return []
            runs: list[Run] = []
            token = None
            while True:
                page = self._client.search_runs(
                    [found.experiment_id], filter_string, order_by=["attributes.start_time DESC"],
                    page_token=token,
                )
                runs.extend(page)
                token = page.token
                if not token:
                    return runs

    def warm_up(self) -> None:
        """Pay the fixed costs now: import MLflow, open the store (create its schema).

        These take seconds (see the module docstring); benchmarks call this first so that they time
        the per-run cost only. Safe to call from another thread alongside the other methods.

        Raises:
            TrackingError: the store cannot be opened.
        """
        self._client  # noqa: B018 - opening the client is the point

    @property
    def _client(self) -> MlflowClient:
        # Opened on first use: for SQLite this creates or migrates the schema (seconds on a new file).
        with self._opening:
            if self._opened is None:
                self._opened = self._open()
            return self._opened

    def _open(self) -> MlflowClient:
        if self.scheme not in REMOTE_SCHEMES + LOCAL_SCHEMES:
            self._unsupported_scheme()
        with self._errors("open the tracking store"):
            from mlflow import MlflowClient

            if self.scheme != "sqlite":
                return MlflowClient(tracking_uri=self.tracking_uri)
            # Opening a new SQLite store creates MLflow's schema; processes starting together must not race.
            store = self._local_store_path()
            store.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(store.with_name(store.name + ".lock")):
                return MlflowClient(tracking_uri=self.tracking_uri)

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self._client.create_experiment(
                    name, artifact_location=self.artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # Another worker of a sweep created it between our lookup and our create.
                experiment = self._client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {name!r} is deleted at {self.display_uri}; restore it "
                "(mlflow experiments restore) or choose another experiment name"
            )
        if self.is_local and experiment.experiment_id == DEFAULT_EXPERIMENT_ID:
            # MLflow's built-in experiment keeps artifacts in ./mlruns of wherever the store was created.
            raise TrackingError(
                f"MLflow's built-in experiment {name!r} would put artifacts in the working directory; "
                "choose another experiment name"
            )
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # created by an older ctexp, or by hand: mark it once
            self._client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id

    def _check_server(self) -> None:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        endpoint = "/api/2.0/mlflow/experiments/search"
        try:
            response = http_request(
                get_default_host_creds(self.tracking_uri), endpoint, "GET", max_retries=0,
                timeout=(CHECK_TIMEOUT_S, CHECK_TIMEOUT_S), raise_on_status=False, params={"max_results": 1},
            )
        except Exception as error:  # requests, urllib3 and MLflow each raise their own kinds
            reason = failure_reason(error, timeout=f"no answer within {2 * CHECK_TIMEOUT_S:g} s")
            raise TrackingError(self._unreachable(reason)) from error
        if response.status_code in (401, 403):
            raise TrackingError(self._unreachable(
                f"HTTP {response.status_code}, credentials refused (set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)"
            ))
        if response.status_code != 200:
            raise TrackingError(self._unreachable(
                f"HTTP {response.status_code} from {endpoint}, not an MLflow tracking server"
            ))

    def _unreachable(self, reason: str) -> str:
        return (
            f"cannot reach the MLflow tracking server at {self.display_uri}: {mask_password(reason)}; "
            "check --tracking-uri / MLFLOW_TRACKING_URI"
        )

    def _unsupported_scheme(self) -> NoReturn:
        raise TrackingError(
            f"unsupported MLflow tracking URI {self.display_uri!r}; use sqlite:///PATH, file:///PATH "
            "or http(s)://HOST:PORT (check --tracking-uri / MLFLOW_TRACKING_URI)"
        )

    def _local_store_path(self) -> Path:
        """The SQLite database file, or the file store's directory, of a local tracking URI."""
        if self.scheme == "file":
            return file_uri_path(self.tracking_uri)
        # sqlite:///relative.db and sqlite:////absolute.db; a query (?timeout=...) is not part of it.
        path = self.tracking_uri.split(":", 1)[1].removeprefix("///").split("?", 1)[0]
        if path in ("", ":memory:") or not self.tracking_uri.lower().startswith("sqlite:///"):
            raise TrackingError(
                f"MLflow tracking URI {self.display_uri!r} names no database file; use sqlite:///PATH/mlflow.db"
            )
        return Path(unquote(path))

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn MLflow, database, network and file errors into one ``TrackingError`` line."""
        try:
            yield
        except TrackingError:
            raise
        except tracking_failures() as error:
            raise TrackingError(
                f"MLflow could not {action} at {self.display_uri}: {mask_password(failure_reason(error))}"
            ) from error

    @contextmanager
    def _failing_run(self, mlflow_run_id: str) -> Iterator[None]:
        """Mark the run FAILED if the block fails, so that no run stays RUNNING forever."""
        try:
            yield
        except TrackingError:
            try:
                self._client.set_terminated(mlflow_run_id, "FAILED")
            except Exception:  # noqa: BLE001, S110 - the store is failing; the first error is the one to report
                pass
            raise


def _metrics(values: Mapping[str, float], step: int) -> list:
    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    return [Metric(key, float(value), timestamp, step) for key, value in values.items()]


def _is_duplicate_row(error: Exception) -> bool:
    """Whether a database refused a row as a duplicate (SQLite, PostgreSQL and MySQL say it each their way)."""
    message = str(error).lower()
    return any(words in message for words in DUPLICATE_ROW_MESSAGES)


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _user() -> str:
    # MLflow records "unknown" unless told; getpass fails in containers without a passwd entry.
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"
