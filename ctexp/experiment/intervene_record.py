"""Recording ``ctexp intervene`` in both stores, like ``ctexp run``: a registry row of kind ``intervention``,
an MLflow run, and the run directory ``HOME/runs/RUN_ID/`` with ``result.json`` (every answer).

The life cycle is the one of every recorded analysis (:mod:`ctexp.experiment.analysis_record`): the
rows and answers land in one transaction with the FINISHED status.

The row joins the lens run's experiment and carries its lens columns (``Registry.start_intervention``);
the MLflow run lives in that experiment with the tags ``ctexp.kind=intervention`` and
``ctexp.lens_run``, the resolved settings as parameters, the metrics of ``intervention_metrics``,
the run directory under ``run/`` and the figure under ``figures/``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

from ctexp.analysis.intervention import InterventionResult
from ctexp.experiment.analysis_record import AnalysisRecording, record_analysis
from ctexp.experiment.intervene import InterveneProgress, InterventionPlan
from ctexp.experiment.provenance import code_version
from ctexp.experiment.recorder import Recorder
from ctexp.registry.models import RunKind
from ctexp.registry.tracking.names import intervention_metrics


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
    registry = recorder.registry
    run_id, version, settings = uuid.uuid4().hex, code_version(), plan.resolved_config()
    name = intervention_name(plan, run_id)
    registry.start_intervention(
        run_id, name, lens_run_id=plan.lens_run.id, config=settings, seed=plan.config.seed,
        device=str(plan.device), code_version=version,
    )
    recording = AnalysisRecording(
        kind=RunKind.INTERVENTION,
        noun="intervention",
        experiment=plan.lens_run.experiment,
        settings=settings,
        tags={"ctexp.lens_run": plan.lens_run.id, "ctexp.store_hash": plan.store.meta.content_hash},
        compute=lambda: plan.run(progress, run_id=run_id),
        result_json=lambda result: json.dumps(result.to_json(answers=True), indent=2),  # every row's answers
        metrics=intervention_metrics,
        figure=_figure,
        finish=registry.finish_intervention,
    )
    return record_analysis(recording, run_id, name, version, recorder.locations.home, registry, recorder.tracker)


def _figure(result: InterventionResult, directory: Path) -> Path:
    from ctexp.analysis.figures import save_intervention_figure  # matplotlib: only a recorded run pays its import

    return save_intervention_figure(result, directory)
