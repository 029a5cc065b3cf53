"""Recording ``ctexp intervene`` in both stores, like ``ctexp run``: a registry row of kind ``intervention``,
an MLflow run, and the run directory ``HOME/runs/RUN_ID/`` with ``result.json`` (every answer).

The life cycle is ``recorder._run_and_record``'s, with its helpers: the run is RUNNING in both stores
from its start, with a heartbeat; it ends FINISHED, or KILLED on Ctrl-C (exit 130) or SIGTERM (exit
143), or FAILED on any error, in both. Nothing is half-written: the run directory is written atomically
once the model has run and removed again if the run does not finish; the rows and answers land in one
transaction with the FINISHED status, after MLflow is finished (the SQL row is the commit point).

The row joins the lens run's experiment and carries its lens columns (``Registry.start_intervention``);
the MLflow run lives in that experiment with the tags ``ctexp.kind=intervention`` and
``ctexp.lens_run``, the resolved settings as parameters, the metrics of ``intervention_metrics``,
the run directory under ``run/`` and the figure under ``figures/``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ctexp.analysis.intervention import InterventionResult
from ctexp.data.store import atomic_directory
from ctexp.errors import Interrupted
from ctexp.experiment.intervene import InterveneProgress, InterventionPlan
from ctexp.experiment.provenance import code_version
from ctexp.experiment.recorder import HEARTBEAT_SECONDS, Recorder, Terminated, _end, _Heartbeat, sigterm_as_interrupt
from ctexp.registry.db import Registry
from ctexp.registry.models import RunKind, RunStatus
from ctexp.registry.tracking.describe import NOTE_TAG, describe, describe_unfinished
from ctexp.registry.tracking.names import flatten_config, intervention_metrics
from ctexp.registry.tracking.tracker import RUN_ARTIFACTS, Tracker

RESULT_FILE = "result.json"


def intervention_name(plan: InterventionPlan, run_id: str) -> str:
    """The configured name, or ``intervene-<site>-<id prefix>``."""
    return plan.config.name or f"intervene-{plan.config.site.value}-{run_id[:6]}"


def record_intervention(
    plan: InterventionPlan,
    recorder: Recorder,
    progress: Callable[[InterveneProgress], None] | None = None,
) -> InterventionResult:
    """Run a planned intervention and record it in the results database, MLflow and its run directory.

    Open the ``Recorder`` (it checks both stores) before planning, so that an unreachable store fails
    before the model is loaded.

    Raises:
        Interrupted: Ctrl-C or SIGTERM; the run is KILLED in both stores (exit code 130 or 143).
        RegistryError, TrackingError: a store cannot be reached or refuses a write.
        Any error of the intervention itself, after the run is marked FAILED.
    """
    return _run_and_record(plan, recorder.locations.home, recorder.registry, recorder.tracker, progress)


def _run_and_record(
    plan: InterventionPlan, home: Path, registry: Registry, tracker: Tracker,
    progress: Callable[[InterveneProgress], None] | None,
) -> InterventionResult:
    run_id = uuid.uuid4().hex
    name = intervention_name(plan, run_id)
    version = code_version()
    settings = plan.resolved_config()
    registry.start_intervention(
        run_id, name, lens_run_id=plan.lens_run.id, config=settings, seed=plan.config.seed,
        device=str(plan.device), code_version=version,
    )
    run_dir = home / "runs" / run_id
    started = time.monotonic()
    mlflow_run_id: str | None = None
    try:
        with sigterm_as_interrupt():
            mlflow_run_id = tracker.start_run(
                experiment=plan.lens_run.experiment, run_name=name, ctexp_run_id=run_id,
                params=flatten_config(settings), tags=_tags(plan, version),
                description=describe_unfinished("RUNNING", settings),
            )
            registry.set_mlflow_run_id(run_id, mlflow_run_id)
            with _Heartbeat(registry, run_id, HEARTBEAT_SECONDS):
                result = plan.run(progress, run_id=run_id)
            write_intervention_dir(run_dir, result)
            _finish_in_mlflow(tracker, mlflow_run_id, result, run_dir)
            registry.finish_intervention(result, time.monotonic() - started)
            return result
    except KeyboardInterrupt as stop:
        shutil.rmtree(run_dir, ignore_errors=True)
        terminated = isinstance(stop, Terminated)
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        _end(registry, tracker, run_id, mlflow_run_id, RunStatus.KILLED, how, settings)
        raise Interrupted(f"{how}: intervention {run_id[:12]} recorded as KILLED", 143 if terminated else 130) from None
    except BaseException as error:
        shutil.rmtree(run_dir, ignore_errors=True)
        _end(registry, tracker, run_id, mlflow_run_id, RunStatus.FAILED, f"{type(error).__name__}: {error}", settings)
        raise


def write_intervention_dir(run_dir: Path, result: InterventionResult) -> None:
    """Write ``run_dir/result.json`` (the whole result, every row's answers) in one rename.

    Raises:
        StoreError: the directory cannot be written.
    """
    with atomic_directory(run_dir, "run directory") as staging:
        text = json.dumps(result.to_json(answers=True), indent=2)
        (staging / RESULT_FILE).write_text(text + "\n", encoding="utf-8")


def _tags(plan: InterventionPlan, version: str) -> dict[str, str]:
    return {
        "ctexp.kind": RunKind.INTERVENTION.value,
        "ctexp.lens_run": plan.lens_run.id,
        "ctexp.store_hash": plan.store.meta.content_hash,
        "ctexp.code_version": version,
        **({"mlflow.source.git.commit": version.split("+")[0]} if not version.startswith("ctexp") else {}),
    }


def _finish_in_mlflow(tracker: Tracker, mlflow_run_id: str, result: InterventionResult, run_dir: Path) -> None:
    """Log the metrics, the run directory and the figure, then mark the MLflow run FINISHED."""
    from ctexp.analysis.figures import save_intervention_figure  # matplotlib: only a recorded run pays its import

    tracker.log_metrics(mlflow_run_id, intervention_metrics(result))
    tracker.log_artifact(mlflow_run_id, run_dir, RUN_ARTIFACTS)
    with tempfile.TemporaryDirectory(prefix="ctexp-figures-") as scratch:
        tracker.log_figures(mlflow_run_id, [save_intervention_figure(result, Path(scratch))])
    tracker.set_tags(mlflow_run_id, {NOTE_TAG: describe(result)})
    tracker.set_status(mlflow_run_id, "FINISHED")
