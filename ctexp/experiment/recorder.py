"""Recording a run in both stores: the results database (SQL) and MLflow.

``tracked_run`` is what ``ctexp run`` and every sweep trial call. The run is RUNNING in both stores
from its start, its epochs land as they finish, and it ends FINISHED, FAILED or KILLED in both (or
PRUNED, when a sweep's pruner stops it: PRUNED in SQL, KILLED with the tag ``ctexp.pruned=true`` in
MLflow, whose run statuses have no such state): an interrupted or crashed run is never left RUNNING,
and keeps its epoch history. A heartbeat thread keeps ``heartbeat_at`` fresh so that a run whose
process was killed outright (``kill -9``) can be told apart and marked FAILED by the next command that
opens the registry.

The SQL row is the commit point: MLflow is finished first, so a FINISHED row always has its MLflow
run and artifacts.
"""

from __future__ import annotations

import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Self

from ctexp.analysis.result import EpochMetrics, RunResult
from ctexp.config import ExperimentConfig
from ctexp.errors import CtexpError, Interrupted
from ctexp.experiment.pipeline import RunPlan, plan_run, run_experiment, run_name
from ctexp.experiment.provenance import code_version
from ctexp.registry.db import Registry
from ctexp.registry.locations import Locations
from ctexp.registry.models import RunStatus
from ctexp.registry.tracking.datasets import store_dataset
from ctexp.registry.tracking.describe import NOTE_TAG, describe_unfinished
from ctexp.registry.tracking.names import flatten_config
from ctexp.registry.tracking.tracker import Tracker
from ctexp.timings import phase, timed

HEARTBEAT_SECONDS = 30.0


class RunPruned(Exception):
    """Raised by an epoch callback to stop a run for good: it ends PRUNED, keeping its epochs, untested.

    Unlike ``train.StopTraining`` (which ends training and goes on to the test split), this propagates
    out of ``Recorder.run`` after the run is marked, so that a sweep can tell its study.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a run ends KILLED like on Ctrl-C."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs (main thread only): SIGTERM raises ``Terminated``, and SIGINT raises
    ``KeyboardInterrupt`` even where the process was started with SIGINT ignored (a background job)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous_term = signal.signal(signal.SIGTERM, handler)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


class _Heartbeat:
    """Refreshes a run's heartbeat from a daemon thread until stopped."""

    def __init__(self, registry: Registry, run_id: str, interval: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(registry, run_id, interval), daemon=True)

    def _beat(self, registry: Registry, run_id: str, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                registry.heartbeat(run_id)
            except CtexpError:
                pass  # a missed beat is harmless; the next one or the run's end will land

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Recorder:
    """Opens both stores once (checking them before any training) and records runs into them.

    A sweep worker keeps one recorder for all its trials.
    """

    def __init__(self, locations: Locations) -> None:
        self.locations = locations
        with phase("MLflow setup"):  # the results database and the tracker, opened and checked
            self.registry = locations.registry()
            try:
                self.tracker = locations.tracker()
                self.tracker.check()
            except BaseException:
                self.registry.close()
                raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.registry.close()

    def run(
        self,
        config: ExperimentConfig,
        *,
        plan: RunPlan | None = None,
        on_epoch: Callable[[EpochMetrics], None] | None = None,
        parent_mlflow_run_id: str | None = None,
        sweep_id: int | None = None,
        trial_number: int | None = None,
        extra_tags: dict[str, str] | None = None,
        run_id: str | None = None,
        on_tracked: Callable[[str], None] | None = None,
    ) -> RunResult:
        """Run one experiment and record it in the results database and MLflow.

        On Ctrl-C or SIGTERM the run ends KILLED and ``Interrupted`` is raised (exit code 130 or 143);
        when ``on_epoch`` raises ``RunPruned`` it ends PRUNED and ``RunPruned`` propagates; on any other
        error it ends FAILED and the error propagates.

        ``run_id`` fixes the run's id (default: a new random one), so that a sweep can note it in its
        trial before the run starts; ``on_tracked`` is called with the MLflow run id once that run exists
        (a sweep notes it in its trial too).
        """
        plan = plan or plan_run(config)
        run_id = run_id or uuid.uuid4().hex
        name = run_name(config, run_id)
        store = plan.prepared.store
        version = code_version()
        self.registry.start_run(
            run_id, name, config, store_hash=store.meta.content_hash, store_path=str(store.path or "") or None,
            device=str(plan.device), code_version=version, sweep_id=sweep_id, trial_number=trial_number,
        )
        return _run_and_record(
            config, self.locations, plan, self.registry, self.tracker, run_id, name, version, on_epoch,
            parent_mlflow_run_id, extra_tags or {}, on_tracked,
        )


def tracked_run(config: ExperimentConfig, locations: Locations, **options: object) -> RunResult:
    """Record one run with a recorder of its own (see ``Recorder.run`` for the options)."""
    with Recorder(locations) as recorder:
        return recorder.run(config, **options)  # type: ignore[arg-type]


def _run_and_record(
    config: ExperimentConfig, locations: Locations, plan: RunPlan, registry: Registry, tracker: Tracker,
    run_id: str, name: str, version: str, on_epoch: Callable[[EpochMetrics], None] | None,
    parent_mlflow_run_id: str | None, extra_tags: dict[str, str], on_tracked: Callable[[str], None] | None,
) -> RunResult:
    mlflow_run_id: str | None = None
    settings = config.model_dump(mode="json")
    try:
        with sigterm_as_interrupt():
            mlflow_run_id = timed("MLflow setup", tracker.start_run)(  # its store too, the first time
                experiment=config.experiment, run_name=name, ctexp_run_id=run_id,
                params=flatten_config(settings),
                tags={
                    "ctexp.store_hash": plan.prepared.store.meta.content_hash,
                    "ctexp.code_version": version,
                    "ctexp.config_hash": config.config_hash(),
                    **({"mlflow.source.git.commit": version.split("+")[0]} if not version.startswith("ctexp") else {}),
                    **extra_tags,
                },
                parent_run_id=parent_mlflow_run_id,
                dataset=store_dataset(plan.prepared.store),
                description=describe_unfinished("RUNNING", settings),
            )
            registry.set_mlflow_run_id(run_id, mlflow_run_id)
            if on_tracked is not None:
                on_tracked(mlflow_run_id)

            def record_epoch(epoch: EpochMetrics) -> None:
                registry.record_epoch(run_id, epoch)
                tracker.log_epoch(mlflow_run_id, epoch)
                if on_epoch is not None:
                    on_epoch(epoch)

            with _Heartbeat(registry, run_id, HEARTBEAT_SECONDS):
                result = run_experiment(config, home=locations.home, on_epoch=record_epoch, plan=plan, run_id=run_id)
            _finish_in_mlflow(tracker, mlflow_run_id, result, locations.home / "runs" / run_id)
            with phase("results recording"):
                registry.finish_run(result)
            return result
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        _end(registry, tracker, run_id, mlflow_run_id, RunStatus.KILLED, how, settings)
        raise Interrupted(f"{how}: run {run_id[:12]} recorded as KILLED", 143 if terminated else 130) from None
    except RunPruned as pruned:
        _end(registry, tracker, run_id, mlflow_run_id, RunStatus.PRUNED, str(pruned) or "pruned", settings)
        raise
    except BaseException as error:
        _end(registry, tracker, run_id, mlflow_run_id, RunStatus.FAILED, f"{type(error).__name__}: {error}", settings)
        raise


def _finish_in_mlflow(tracker: Tracker, mlflow_run_id: str, result: RunResult, run_dir: Path) -> None:
    """Render the run's figures and finish its MLflow run with them (the tracker stores, it does not draw)."""
    from ctexp.analysis.figures import save_figures  # matplotlib: only a recorded run pays its import

    with tempfile.TemporaryDirectory(prefix="ctexp-figures-") as scratch:
        with phase("figures"):
            figures = save_figures(result, Path(scratch))
        with phase("results recording"):
            tracker.finish_run(mlflow_run_id, result, run_dir, figures)


def _end(
    registry: Registry, tracker: Tracker, run_id: str, mlflow_run_id: str | None, status: RunStatus, error: str,
    settings: dict[str, Any],
) -> None:
    """Mark a run ended in both stores, as far as each can be reached (the original error wins).

    MLflow has no PRUNED status: a pruned run is KILLED there, tagged ``ctexp.pruned=true``. Its
    description says how it ended.
    """
    try:
        registry.end_run(run_id, status, error[:2000])
    except CtexpError:
        pass
    if mlflow_run_id is not None:
        try:
            tags = {NOTE_TAG: describe_unfinished(status.value, settings, error[:2000])}
            if status is RunStatus.PRUNED:
                tags.update({"ctexp.pruned": "true", "ctexp.pruned_reason": error[:500]})
            tracker.set_tags(mlflow_run_id, tags)
            tracker.end_run(mlflow_run_id, "KILLED" if status is RunStatus.PRUNED else status.value)  # type: ignore[arg-type]
        except CtexpError:
            pass
