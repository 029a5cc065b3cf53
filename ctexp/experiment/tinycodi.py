"""Recording ``ctexp codi train`` like every run: a registry row of kind ``tinycodi``, an MLflow run, and the
run directory ``HOME/runs/RUN_ID/`` with ``result.json`` (the settings and the training summary).

The life cycle is the one of every recorded analysis (:mod:`ctexp.experiment.analysis_record`): RUNNING
with a heartbeat while both models train, FINISHED once the checkpoint is written; KILLED on Ctrl-C or
SIGTERM and FAILED on an error, with no checkpoint left behind. The MLflow run joins the experiment
``tinycodi``, tagged ``ctexp.kind=tinycodi``, with the settings as parameters, each model's final losses
and training seconds as metrics (``codi/latent/student_loss``, ``codi/direct/seconds``, ...), and the loss
curves as ``figures/tinycodi_losses.png``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ctexp.experiment.analysis_record import AnalysisRecording, record_analysis
from ctexp.experiment.provenance import code_version
from ctexp.experiment.recorder import Recorder
from ctexp.registry.models import RunKind
from ctexp.registry.runs import TINYCODI_EXPERIMENT
from ctexp.registry.tracking.describe import describe
from ctexp.tinycodi.pipeline import TrainingResult, train_tinycodi
from ctexp.tinycodi.settings import TinyCodiSettings
from ctexp.tinycodi.train import Progress, Trained

FIGURE_FILE = "tinycodi_losses.png"
LOSSES = ("teacher", "student", "distill", "reembed")


def summary(result: TrainingResult) -> dict[str, Any]:
    """What the registry and ``result.json`` keep of a training: where it went, how long, the losses."""
    def one(trained: Trained) -> dict[str, Any]:
        return {"latents": trained.latents, "seconds": round(trained.seconds, 2), "final": trained.history[-1],
                "history": trained.history}

    return {"out": str(result.out), "latent": one(result.latent), "direct": one(result.direct)}


def metrics(result: TrainingResult) -> dict[str, float]:
    """Each model's final losses and training seconds, e.g. ``codi/latent/student_loss``."""
    found: dict[str, float] = {}
    for name, trained in (("latent", result.latent), ("direct", result.direct)):
        found[f"codi/{name}/seconds"] = trained.seconds
        for loss in LOSSES:
            found[f"codi/{name}/{loss}_loss"] = float(trained.history[-1][loss])
    return found


def loss_figure(result: TrainingResult, directory: Path) -> Path:
    """The teacher's and the student's CE by step, both models, as ``tinycodi_losses.png`` in ``directory``."""
    figure = Figure(figsize=(8.0, 3.4))
    axes = figure.subplots(1, 2, sharey=True)
    for ax, (name, trained) in zip(axes, (("latent", result.latent), ("direct", result.direct)), strict=True):
        steps = [point["step"] for point in trained.history]
        for loss in ("teacher", "student"):
            ax.plot(steps, [point[loss] for point in trained.history], label=loss)
        ax.set_title(f"{name} ({trained.latents} latents)")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0].set_ylabel("cross-entropy")
    axes[0].legend()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FIGURE_FILE
    figure.savefig(path, dpi=100, format="png")
    return path


@describe.register
def _describe_training(result: TrainingResult) -> str:
    head = (f"**Tiny CODI** written to `{result.out}` (T = {result.settings.latents} latents, "
            f"{result.settings.total_steps} steps per model); `ctexp codi eval --model {result.out}` measures it.")
    lines = [head, ""]
    for name, trained in (("latent", result.latent), ("direct", result.direct)):
        final = trained.history[-1]
        lines.append(f"- {name}: teacher CE {final['teacher']:.3f}, student CE {final['student']:.3f}, "
                     f"{trained.seconds:.0f} s")
    return "\n".join(lines)


def record_training(
    settings: TinyCodiSettings, out: Path, recorder: Recorder, force: bool = False,
    progress: Callable[[Progress], None] | None = None, parallel_threads: int | None = None,
) -> TrainingResult:
    """Train a tiny CODI (``train_tinycodi``) and record it in the results database, MLflow and its run directory.

    Raises:
        Interrupted: Ctrl-C or SIGTERM; the run is KILLED in both stores (exit code 130 or 143).
        RegistryError, TrackingError: a store cannot be reached or refuses a write.
        Any error of the training itself, after the run is marked FAILED.
    """
    registry = recorder.registry
    run_id, version = uuid.uuid4().hex, code_version()
    values = settings.model_dump(mode="json")
    settings_hash = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    name = f"tinycodi-{run_id[:6]}"
    registry.start_tinycodi(run_id, name, settings=values, settings_hash=settings_hash, out=str(out),
                            seed=settings.seed, code_version=version)
    recording = AnalysisRecording(
        kind=RunKind.TINYCODI,
        noun="tiny-CODI training",
        experiment=TINYCODI_EXPERIMENT,
        settings={**values, "out": str(out)},
        tags={"ctexp.settings_hash": settings_hash},
        compute=lambda: train_tinycodi(settings, out, force=force, progress=progress, parallel_threads=parallel_threads),
        result_json=lambda result: json.dumps({"settings": values, **summary(result)}, indent=2),
        metrics=metrics,
        figure=loss_figure,
        finish=lambda result, seconds: registry.finish_tinycodi(run_id, summary(result), seconds),
    )
    return record_analysis(recording, run_id, name, version, recorder.locations.home, registry, recorder.tracker)
