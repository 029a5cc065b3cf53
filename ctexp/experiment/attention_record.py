"""Recording ``ctexp attention`` in both stores, like ``ctexp intervene``: a registry row of kind ``attention``,
an MLflow run, and the run directory ``HOME/runs/RUN_ID/`` with ``result.json`` (the report).

The life cycle is :mod:`ctexp.experiment.intervene_record`'s, with the recorder's helpers: RUNNING in both
stores from the start, with a heartbeat; FINISHED, or KILLED on Ctrl-C (exit 130) or SIGTERM (exit 143),
or FAILED on any error, in both. Nothing is half-written: the run directory is written atomically once the
report is computed and removed again if the run does not finish; the report's rows land in one
transaction with the FINISHED status, after MLflow is finished (the SQL row is the commit point).

With a lens run the row and the MLflow run join that run's experiment (``Registry.start_attention``);
without one, the experiment ``attention``. The MLflow run is tagged ``ctexp.kind=attention`` (and
``ctexp.lens_run``), with the settings as parameters, the metrics of ``attention_metrics``, the run
directory under ``run/`` and the heatmap under ``figures/``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path

from ctexp.analysis.attention import AttentionReport, save_attention_figure
from ctexp.data.store import atomic_directory
from ctexp.errors import Interrupted
from ctexp.experiment.attention import AttentionPlan
from ctexp.experiment.intervene_record import RESULT_FILE
from ctexp.experiment.provenance import code_version
from ctexp.experiment.recorder import HEARTBEAT_SECONDS, Recorder, Terminated, _end, _Heartbeat, sigterm_as_interrupt
from ctexp.registry.db import Registry
from ctexp.registry.models import RunKind, RunStatus
from ctexp.registry.runs import ATTENTION_EXPERIMENT
from ctexp.registry.tracking.describe import NOTE_TAG, describe, describe_unfinished
from ctexp.registry.tracking.names import attention_metrics, flatten_config
from ctexp.registry.tracking.tracker import RUN_ARTIFACTS, Tracker


def record_attention(plan: AttentionPlan, recorder: Recorder) -> AttentionReport:
    """Compute a planned attention analysis and record it in the results database, MLflow and its run directory.

    Open the ``Recorder`` (it checks both stores) before planning, so that an unreachable store fails
    before the attention file is read.

    Raises:
        Interrupted: Ctrl-C or SIGTERM; the run is KILLED in both stores (exit code 130 or 143).
        RegistryError, TrackingError: a store cannot be reached or refuses a write.
        Any error of the analysis itself, after the run is marked FAILED.
    """
    return _run_and_record(plan, recorder.locations.home, recorder.registry, recorder.tracker)


def _run_and_record(plan: AttentionPlan, home: Path, registry: Registry, tracker: Tracker) -> AttentionReport:
    run_id = uuid.uuid4().hex
    name = f"attention-{run_id[:6]}"
    version = code_version()
    settings = plan.settings()
    lens = plan.lens_run[0] if plan.lens_run else None
    registry.start_attention(
        run_id, name, lens_run_id=lens.id if lens else None, store_hash=plan.store.meta.content_hash,
        store_path=str(plan.store.path), layers=plan.request.layers, positions=plan.request.positions,
        config=settings, seed=plan.request.seed, code_version=version,
    )
    run_dir = home / "runs" / run_id
    started = time.monotonic()
    mlflow_run_id: str | None = None
    try:
        with sigterm_as_interrupt():
            mlflow_run_id = tracker.start_run(
                experiment=lens.experiment if lens else ATTENTION_EXPERIMENT, run_name=name, ctexp_run_id=run_id,
                params=flatten_config(settings), tags=_tags(plan, version),
                description=describe_unfinished("RUNNING", settings),
            )
            registry.set_mlflow_run_id(run_id, mlflow_run_id)
            with _Heartbeat(registry, run_id, HEARTBEAT_SECONDS):
                report = plan.run(run_id)
            write_attention_dir(run_dir, report)
            _finish_in_mlflow(tracker, mlflow_run_id, report, run_dir)
            registry.finish_attention(report, time.monotonic() - started)
            return report
    except KeyboardInterrupt as stop:
        shutil.rmtree(run_dir, ignore_errors=True)
        terminated = isinstance(stop, Terminated)
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        _end(registry, tracker, run_id, mlflow_run_id, RunStatus.KILLED, how, settings)
        raise Interrupted(f"{how}: attention analysis {run_id[:12]} recorded as KILLED",
                          143 if terminated else 130) from None
    except BaseException as error:
        shutil.rmtree(run_dir, ignore_errors=True)
        _end(registry, tracker, run_id, mlflow_run_id, RunStatus.FAILED, f"{type(error).__name__}: {error}", settings)
        raise


def write_attention_dir(run_dir: Path, report: AttentionReport) -> None:
    """Write ``run_dir/result.json`` (the report, as ``--json`` prints it) in one rename.

    Raises:
        StoreError: the directory cannot be written.
    """
    with atomic_directory(run_dir, "run directory") as staging:
        (staging / RESULT_FILE).write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")


def _tags(plan: AttentionPlan, version: str) -> dict[str, str]:
    return {
        "ctexp.kind": RunKind.ATTENTION.value,
        **({"ctexp.lens_run": plan.lens_run[0].id} if plan.lens_run else {}),
        "ctexp.store_hash": plan.store.meta.content_hash,
        "ctexp.code_version": version,
        **({"mlflow.source.git.commit": version.split("+")[0]} if not version.startswith("ctexp") else {}),
    }


def _finish_in_mlflow(tracker: Tracker, mlflow_run_id: str, report: AttentionReport, run_dir: Path) -> None:
    """Log the metrics, the run directory and the heatmap, then mark the MLflow run FINISHED."""
    tracker.log_metrics(mlflow_run_id, attention_metrics(report))
    tracker.log_artifact(mlflow_run_id, run_dir, RUN_ARTIFACTS)
    with tempfile.TemporaryDirectory(prefix="ctexp-figures-") as scratch:
        tracker.log_figures(mlflow_run_id, [save_attention_figure(report, Path(scratch))])
    tracker.set_tags(mlflow_run_id, {NOTE_TAG: describe(report)})
    tracker.set_status(mlflow_run_id, "FINISHED")

