"""Recording ``ctexp attention`` in both stores, like ``ctexp intervene``: a registry row of kind ``attention``,
an MLflow run, and the run directory ``HOME/runs/RUN_ID/`` with ``result.json`` (the report).

The life cycle is the one of every recorded analysis (:mod:`ctexp.experiment.analysis_record`): the
report's rows land in one transaction with the FINISHED status.

With a lens run the row and the MLflow run join that run's experiment (``Registry.start_attention``);
without one, the experiment ``attention``. The MLflow run is tagged ``ctexp.kind=attention`` (and
``ctexp.lens_run``), with the settings as parameters, the metrics of ``attention_metrics``, the run
directory under ``run/`` and the heatmap under ``figures/``.
"""

from __future__ import annotations

import uuid

from ctexp.analysis.attention import AttentionReport, save_attention_figure
from ctexp.experiment.analysis_record import AnalysisRecording, record_analysis
from ctexp.experiment.attention import AttentionPlan
from ctexp.experiment.provenance import code_version
from ctexp.experiment.recorder import Recorder
from ctexp.registry.models import RunKind
from ctexp.registry.runs import ATTENTION_EXPERIMENT
from ctexp.registry.tracking.names import attention_metrics


def record_attention(plan: AttentionPlan, recorder: Recorder) -> AttentionReport:
    """Compute a planned attention analysis and record it in the results database, MLflow and its run directory.

    Open the ``Recorder`` (it checks both stores) before planning, so that an unreachable store fails
    before the attention file is read.

    Raises:
        Interrupted: Ctrl-C or SIGTERM; the run is KILLED in both stores (exit code 130 or 143).
        RegistryError, TrackingError: a store cannot be reached or refuses a write.
        Any error of the analysis itself, after the run is marked FAILED.
    """
    registry = recorder.registry
    run_id, version, settings = uuid.uuid4().hex, code_version(), plan.settings()
    name = f"attention-{run_id[:6]}"
    lens = plan.lens_run[0] if plan.lens_run else None
    registry.start_attention(
        run_id, name, lens_run_id=lens.id if lens else None, store_hash=plan.store.meta.content_hash,
        store_path=str(plan.store.path), layers=plan.request.layers, positions=plan.request.positions,
        config=settings, seed=plan.request.seed, code_version=version,
    )
    recording = AnalysisRecording(
        kind=RunKind.ATTENTION,
        noun="attention analysis",
        experiment=lens.experiment if lens else ATTENTION_EXPERIMENT,
        settings=settings,
        tags={**({"ctexp.lens_run": lens.id} if lens else {}), "ctexp.store_hash": plan.store.meta.content_hash},
        compute=lambda: plan.run(run_id),
        result_json=lambda report: report.model_dump_json(indent=2),  # the report, as --json prints it
        metrics=attention_metrics,
        figure=save_attention_figure,
        finish=registry.finish_attention,
    )
    return record_analysis(recording, run_id, name, version, recorder.locations.home, registry, recorder.tracker)
