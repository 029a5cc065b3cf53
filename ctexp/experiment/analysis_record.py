"""The one life cycle of a recorded model analysis (``ctexp intervene``, ``ctexp attention``).

Like ``ctexp run`` (``recorder._run_and_record``, whose helpers it uses): the registry row, already made
RUNNING by the caller, gets an MLflow run with the settings as parameters, tags and a "running"
description; a heartbeat runs while the analysis computes; then the run directory ``HOME/runs/RUN_ID/``
(``result.json``) is written atomically, MLflow gets the metrics, the run directory under ``run/``, the
figure under ``figures/`` and the finished description, and last the registry writes the result's rows
with the FINISHED status in one transaction (the SQL row is the commit point). Ctrl-C ends the run
KILLED (exit 130), SIGTERM KILLED (143), any error FAILED, in both stores; the run directory is removed
again, so nothing is half-written.

A kind of analysis says what is its own in an ``AnalysisRecording``: how to compute the result, its
JSON, metrics and figure, and how the registry stores its rows.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from ctexp.data.store import atomic_directory
from ctexp.errors import Interrupted
from ctexp.experiment.recorder import HEARTBEAT_SECONDS, Terminated, _end, _Heartbeat, sigterm_as_interrupt
from ctexp.registry.db import Registry
from ctexp.registry.models import RunKind, RunStatus
from ctexp.registry.readback import RESULT_FILE
from ctexp.registry.tracking.describe import NOTE_TAG, describe, describe_unfinished
from ctexp.registry.tracking.names import flatten_config
from ctexp.registry.tracking.tracker import RUN_ARTIFACTS, Tracker

R = TypeVar("R")


@dataclass(frozen=True)
class AnalysisRecording(Generic[R]):
    """What one kind of model analysis brings to the shared life cycle.

    Attributes:
        kind: the run kind (``ctexp.kind`` tag).
        noun: how messages name such a run ("intervention", "attention analysis").
        experiment: the MLflow experiment the run joins.
        settings: the resolved settings (MLflow parameters; the description of an unfinished run).
        tags: the kind's own MLflow tags (``ctexp.lens_run``, the store hash, ...).
        compute: computes the result (the model pass or the analysis); runs under the heartbeat.
        result_json: the text of ``result.json``.
        metrics: the final MLflow metrics of a result.
        figure: draws the result's figure into a directory and returns its path.
        finish: writes the result's rows and the FINISHED status to the registry (seconds taken given).
    """

    kind: RunKind
    noun: str
    experiment: str
    settings: dict[str, Any]
    tags: Mapping[str, str]
    compute: Callable[[], R]
    result_json: Callable[[R], str]
    metrics: Callable[[R], dict[str, float]]
    figure: Callable[[R, Path], Path]
    finish: Callable[[R, float], None]


def record_analysis(
    recording: AnalysisRecording[R], run_id: str, name: str, version: str, home: Path, registry: Registry,
    tracker: Tracker,
) -> R:
    """Compute and record one analysis whose registry row ``run_id`` the caller has started (RUNNING).

    Raises:
        Interrupted: Ctrl-C or SIGTERM; the run is KILLED in both stores (exit code 130 or 143).
        RegistryError, TrackingError: a store cannot be reached or refuses a write.
        Any error of the analysis itself, after the run is marked FAILED.
    """
    run_dir = home / "runs" / run_id
    settings = recording.settings
    started = time.monotonic()
    mlflow_run_id: str | None = None
    try:
        with sigterm_as_interrupt():
            mlflow_run_id = tracker.start_run(
                experiment=recording.experiment, run_name=name, ctexp_run_id=run_id,
                params=flatten_config(settings), tags=_tags(recording, version),
                description=describe_unfinished("RUNNING", settings),
            )
            registry.set_mlflow_run_id(run_id, mlflow_run_id)
            with _Heartbeat(registry, run_id, HEARTBEAT_SECONDS):
                result = recording.compute()
            with atomic_directory(run_dir, "run directory") as staging:
                (staging / RESULT_FILE).write_text(recording.result_json(result) + "\n", encoding="utf-8")
            _finish_in_mlflow(recording, tracker, mlflow_run_id, result, run_dir)
            recording.finish(result, time.monotonic() - started)
            return result
    except KeyboardInterrupt as stop:
        shutil.rmtree(run_dir, ignore_errors=True)
        terminated = isinstance(stop, Terminated)
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        _end(registry, tracker, run_id, mlflow_run_id, RunStatus.KILLED, how, settings)
        raise Interrupted(f"{how}: {recording.noun} {run_id[:12]} recorded as KILLED",
                          143 if terminated else 130) from None
    except BaseException as error:
        shutil.rmtree(run_dir, ignore_errors=True)
        _end(registry, tracker, run_id, mlflow_run_id, RunStatus.FAILED, f"{type(error).__name__}: {error}", settings)
        raise


def _tags(recording: AnalysisRecording[Any], version: str) -> dict[str, str]:
    return {
        "ctexp.kind": recording.kind.value,
        **recording.tags,
        "ctexp.code_version": version,
        **({"mlflow.source.git.commit": version.split("+")[0]} if not version.startswith("ctexp") else {}),
    }


def _finish_in_mlflow(
    recording: AnalysisRecording[R], tracker: Tracker, mlflow_run_id: str, result: R, run_dir: Path
) -> None:
    """Log the metrics, the run directory and the figure, describe the result, and mark the run FINISHED."""
    tracker.log_metrics(mlflow_run_id, recording.metrics(result))
    tracker.log_artifact(mlflow_run_id, run_dir, RUN_ARTIFACTS)
    with tempfile.TemporaryDirectory(prefix="ctexp-figures-") as scratch:
        tracker.log_figures(mlflow_run_id, [recording.figure(result, Path(scratch))])
    tracker.set_tags(mlflow_run_id, {NOTE_TAG: describe(result)})
    tracker.set_status(mlflow_run_id, "FINISHED")
