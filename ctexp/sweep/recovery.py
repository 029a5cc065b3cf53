"""Dead workers: whether a trial's worker still runs, and failing and retrying the trials of those that died.

A worker notes itself (``WorkerId``: machine, pid, process start time) on each trial it runs. A
RUNNING trial is dead when its worker, on this machine, is gone, or when its ctexp run is no longer
RUNNING (the registry fails runs whose heartbeat stopped, on any machine). ``recover`` fails such a
trial, retries it with the same parameters as a WAITING trial, and ends its run FAILED in both stores.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from ctexp.errors import CtexpError
from ctexp.records import FrozenRecord
from ctexp.registry.locations import STALE_AFTER_SECONDS
from ctexp.sweep.storage import MAX_RETRIES, quiet_optuna

if TYPE_CHECKING:
    import optuna

    from ctexp.registry.db import Registry
    from ctexp.registry.records import RunRecord
    from ctexp.registry.tracking.tracker import Tracker

# Trial user attributes written by ctexp (shown by optuna-dashboard, too): the worker, the trial's run
# (ctexp's run id, and its MLflow run id once that run exists).
WORKER_ATTR, RUN_ATTR, MLFLOW_RUN_ATTR = "ctexp_worker", "ctexp_run_id", "ctexp_mlflow_run_id"


class WorkerId(FrozenRecord):
    """A worker process: its machine (hostname and boot id), pid and start time (pids are reused)."""

    host: str
    boot: str
    pid: int
    start: str

    @classmethod
    def current(cls) -> WorkerId:
        return cls(host=socket.gethostname(), boot=_boot_id(), pid=os.getpid(), start=_start_time(os.getpid()) or "")

    def same_machine(self, other: WorkerId) -> bool:
        return self.host == other.host and self.boot == other.boot

    def alive(self) -> bool:
        """Whether this process still runs (on this machine; a zombie counts as dead)."""
        stat = _proc_stat(self.pid)
        if stat is None:
            if Path("/proc/self/stat").exists():
                return False
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        state, start = stat
        return state not in ("Z", "X") and (not self.start or start == self.start)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, starttime field 22
    return fields[0], fields[19]


def _start_time(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def recover(study: optuna.Study, registry: Registry, tracker: Tracker | None, sweep_id: int, me: WorkerId) -> list[int]:
    """Fail and retry RUNNING trials whose worker died; end the ctexp runs of such trials FAILED.

    Call it under the sweep lock: a RUNNING trial without a worker attribute then belongs to a process
    that died between asking for it and noting itself (which it does under the same lock).

    Returns:
        The numbers of the trials failed here.
    """
    import optuna
    from optuna.trial import TrialState

    from ctexp.registry.models import RunStatus

    registry.mark_stale_runs(STALE_AFTER_SECONDS)
    # The trials are read before the runs: a worker finishes its run before it tells Optuna, so a trial
    # read as finished has a run that reads as ended. (Read the other way round, a run read RUNNING just
    # before its worker finished it and then its trial read COMPLETE looked stuck, and was failed in MLflow.)
    trials = study.get_trials(deepcopy=True)
    runs = {record.id: record for record in registry.list_trials(sweep_id)}
    failed: list[int] = []
    for trial in trials:
        run = runs.get(trial.user_attrs.get(RUN_ATTR, ""))
        if trial.state is TrialState.RUNNING and _is_dead(trial, run, me):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            frozen = study.get_trials(deepcopy=True)[trial.number]
            if frozen.state is TrialState.FAIL:
                with quiet_optuna():
                    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, frozen)
                failed.append(trial.number)
        if run is not None and run.status is RunStatus.RUNNING and (trial.state.is_finished() or trial.number in failed):
            _end_dead_run(registry, tracker, run, trial.number)
    return failed


def _is_dead(trial: optuna.trial.FrozenTrial, run: RunRecord | None, me: WorkerId) -> bool:
    from ctexp.registry.models import RunStatus

    tag = trial.user_attrs.get(WORKER_ATTR)
    if tag is None:
        return True  # its worker died under the lock, before noting itself
    worker = WorkerId.model_validate(tag)
    if worker.same_machine(me):
        return not worker.alive()
    return run is not None and run.status is not RunStatus.RUNNING


def _end_dead_run(registry: Registry, tracker: Tracker | None, run: RunRecord, number: int) -> None:
    from ctexp.registry.models import RunStatus

    with contextlib.suppress(CtexpError):
        registry.end_run(run.id, RunStatus.FAILED, f"worker died (trial {number}); the trial is retried")
        if registry.resolve(run.id).status is RunStatus.FINISHED:  # its worker finished it after all
            return
    if tracker is not None and run.mlflow_run_id:
        with contextlib.suppress(CtexpError):
            tracker.end_run(run.mlflow_run_id, "FAILED")
