"""Reading recorded runs back for analysis: a run's record and its files, from the run directory or MLflow;
and interventions' results, from the results database.

Loading is the registry's business, analysing is not: ``load_compared_runs`` hands ``compare`` typed,
loaded runs (``ComparedRun``), so that ``ctexp.analysis`` never reads the registry itself. ``run_file``
finds any file of a run's directory, locally or as an MLflow artifact (``ctexp compare`` and the
notebook API read runs through it).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ctexp.analysis.comparison import ComparedRun, read_states
from ctexp.analysis.intervention import InterventionResult
from ctexp.errors import RegistryError
from ctexp.registry.locations import Locations
from ctexp.registry.records import RunRecord
from ctexp.registry.tracking.tracker import RUN_ARTIFACTS, Tracker

PREDICTIONS_FILE = "predictions.jsonl"
RESULT_FILE = "result.json"
FileSource = Literal["run directory", "mlflow"]


def load_compared_runs(locations: Locations, refs: Sequence[str]) -> list[ComparedRun]:
    """The runs ``refs`` name, each with its test states, in the order given (a run named twice is loaded once).

    Args:
        locations: where runs live (``Locations.resolve(home, db_url, tracking_uri)``).
        refs: run ids, unique id prefixes, run names, MLflow run ids or ``latest``.

    Raises:
        RegistryError: a run is unknown, not finished, or has no per-state predictions (neither in its run
            directory nor as the MLflow artifact ``run/predictions.jsonl``).
        TrackingError: MLflow had to be asked for predictions and could not be reached.
    """
    with locations.registry() as registry:
        records = [registry.resolve(ref) for ref in refs]
    loaded: dict[str, ComparedRun] = {}
    with tempfile.TemporaryDirectory(prefix="ctexp-compare-") as scratch:
        for record in records:
            if record.id not in loaded:
                loaded[record.id] = _load_run(locations, record, Path(scratch))
    return [loaded[record.id] for record in records]


def run_file(
    locations: Locations, record: RunRecord, name: str, directory: Path, tracker: Tracker | None = None
) -> tuple[Path, FileSource] | None:
    """A file of a run's directory (``result.json``, ``predictions.jsonl``, ``lens.json``, ...): the local
    copy in ``HOME/runs/RUN_ID/``, else the MLflow artifact ``run/NAME`` downloaded under ``directory``.

    Args:
        locations: where runs live.
        record: the run.
        name: the file's name in the run directory.
        directory: where to download it (files of one run land side by side, in ``directory/run/``).
        tracker: the MLflow tracker to ask (default: one for ``locations``, opened only if needed).

    Returns:
        The file's path and where it came from, or None when neither holds it.

    Raises:
        TrackingError: MLflow had to be asked and could not be reached.
    """
    local = locations.home / "runs" / record.id / name
    if local.is_file():
        return local, "run directory"
    if not record.mlflow_run_id:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    downloaded = (tracker or locations.tracker()).download_artifact(
        record.mlflow_run_id, f"{RUN_ARTIFACTS}/{name}", directory
    )
    return None if downloaded is None else (downloaded, "mlflow")


def resolve_runs(locations: Locations, refs: Sequence[str]) -> list[RunRecord]:
    """The records of the runs ``refs`` name, in the order given.

    Raises:
        RegistryError: a run is unknown or its reference ambiguous.
    """
    with locations.registry() as registry:
        return [registry.resolve(ref) for ref in refs]


def load_interventions(locations: Locations, refs: Sequence[str]) -> list[InterventionResult]:
    """The results of the finished interventions ``refs`` name, with every answer, in the order given.

    Raises:
        RegistryError: a run is unknown, not an intervention, or not finished.
    """
    with locations.registry() as registry:
        return [registry.intervention(registry.resolve(ref).id) for ref in refs]


def _load_run(locations: Locations, record: RunRecord, scratch: Path) -> ComparedRun:
    """Read a run's predictions (and test problem ids) from its run directory, else from MLflow."""
    if record.status.value != "FINISHED":
        raise RegistryError(
            f"run {record.id[:12]} ({record.name}) is {record.status.value}; only finished runs can be compared"
        )
    tracker = locations.tracker()  # opens MLflow only if a file has to be downloaded
    found = run_file(locations, record, PREDICTIONS_FILE, scratch / record.id, tracker)
    if found is None:
        where = f" nor in MLflow run {record.mlflow_run_id} ({RUN_ARTIFACTS}/{PREDICTIONS_FILE})" if (
            record.mlflow_run_id) else " and the run has no MLflow run"
        raise RegistryError(
            f"run {record.id[:12]} ({record.name}) has no per-state predictions: "
            f"not in {locations.home / 'runs' / record.id / PREDICTIONS_FILE}{where}"
        )
    predictions, source = found
    result = locations.home / "runs" / record.id / RESULT_FILE
    if source == "mlflow" and not result.is_file():
        result = (run_file(locations, record, RESULT_FILE, scratch / record.id, tracker) or (result,))[0]
    return ComparedRun(record, read_states(predictions, result if result.is_file() else None, record.id), source)
