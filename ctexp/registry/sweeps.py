"""The registry's sweeps: a row per Optuna study, with its trials' runs counted by status."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ctexp.errors import RegistryError
from ctexp.registry.database import Database, now
from ctexp.registry.models import Run, RunStatus, Sweep, SweepStatus
from ctexp.registry.records import SweepRecord

# Columns a command may change on an existing sweep (the rest define it and never change).
SWEEP_UPDATABLE = ("status", "n_trials", "sampler", "pruner", "best_trial_number", "best_value")


class SweepStore(Database):
    """The reads and writes of sweeps (a part of ``Registry``)."""

    def open_sweep(
        self,
        *,
        name: str,
        study_name: str,
        storage: str,
        experiment: str,
        objective: str,
        direction: str,
        sampler: str,
        pruner: str,
        n_trials: int,
        search_space: dict[str, Any],
        base_config: dict[str, Any],
    ) -> tuple[SweepRecord, bool]:
        """The sweep named ``name``, created RUNNING if it is new (safe when many workers race to create it).

        An existing sweep is returned as it is: comparing its definition with the caller's is the
        caller's business. ``storage`` must already be masked.

        Returns:
            The sweep, and whether this call created it.
        """
        def work(session: Session) -> tuple[int, bool]:
            found = session.scalar(select(Sweep.id).where(Sweep.name == name))
            if found is not None:
                return found, False
            sweep = Sweep(
                name=name, study_name=study_name, storage=storage, experiment=experiment, objective=objective,
                direction=direction, sampler=sampler, pruner=pruner, n_trials=n_trials,
                search_space_json=search_space, base_config_json=base_config, status=SweepStatus.RUNNING,
                created_at=now(),
            )
            try:
                with session.begin_nested():  # losing the race to another worker keeps our transaction
                    session.add(sweep)
            except IntegrityError:
                winner = session.scalar(select(Sweep.id).where(Sweep.name == name))
                assert winner is not None
                return winner, False
            return sweep.id, True

        sweep_id, created = self._write(f"open sweep {name!r}", work)
        return self.sweep(str(sweep_id)), created

    def set_sweep_parent(self, sweep_id: int, mlflow_run_id: str) -> str:
        """Record the sweep's parent MLflow run unless another process recorded one first.

        Returns:
            The parent run id the sweep has now (``mlflow_run_id``, or the one recorded first).
        """
        def work(session: Session) -> str:
            session.execute(
                update(Sweep).where(Sweep.id == sweep_id, Sweep.mlflow_parent_run_id.is_(None))
                .values(mlflow_parent_run_id=mlflow_run_id)
            )
            current = session.scalar(select(Sweep.mlflow_parent_run_id).where(Sweep.id == sweep_id))
            if current is None:
                raise _unknown_sweep(str(sweep_id))
            return current

        return self._write(f"link sweep {sweep_id} to MLflow", work)

    def update_sweep(self, sweep_id: int, **values: Any) -> SweepRecord:
        """Change a sweep's status, budget, sampler, pruner or best trial (``SWEEP_UPDATABLE``).

        A status other than RUNNING sets ``ended_at`` to now; RUNNING clears it (a resumed sweep).

        Raises:
            ValueError: a column that defines the sweep.
            RegistryError: the sweep is unknown.
        """
        unknown = set(values) - set(SWEEP_UPDATABLE)
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)} of a sweep; updatable: {', '.join(SWEEP_UPDATABLE)}")
        if "status" in values:
            values["status"] = SweepStatus(values["status"])
            values["ended_at"] = None if values["status"] is SweepStatus.RUNNING else now()

        def work(session: Session) -> None:
            if not session.execute(update(Sweep).where(Sweep.id == sweep_id).values(**values)).rowcount:
                raise _unknown_sweep(str(sweep_id))

        self._write(f"update sweep {sweep_id}", work)
        return self.sweep(str(sweep_id))

    def sweep(self, ref: str) -> SweepRecord:
        """A sweep by name, or by id.

        Raises:
            RegistryError: no sweep has that name or id.
        """
        with self._session(f"find sweep {ref!r}") as session:
            sweep = session.scalar(select(Sweep).where(Sweep.name == ref))
            if sweep is None and ref.isdigit():
                sweep = session.get(Sweep, int(ref))
            if sweep is None:
                raise _unknown_sweep(ref)
            return _sweep_record(sweep, _run_counts(session, [sweep.id]).get(sweep.id, {}))

    def list_sweeps(self, *, experiment: str | None = None, limit: int | None = None) -> list[SweepRecord]:
        """Sweeps, newest first, each with its trials' runs counted by status."""
        query = select(Sweep).order_by(Sweep.created_at.desc(), Sweep.id.desc())
        if experiment is not None:
            query = query.where(Sweep.experiment == experiment)
        if limit is not None:
            query = query.limit(limit)
        with self._session("list sweeps") as session:
            sweeps = list(session.scalars(query))
            counts = _run_counts(session, [sweep.id for sweep in sweeps])
            return [_sweep_record(sweep, counts.get(sweep.id, {})) for sweep in sweeps]


def _unknown_sweep(ref: str) -> RegistryError:
    return RegistryError(f"no sweep named {ref!r} in the results database; `ctexp sweeps` lists them")


def _run_counts(session: Session, sweep_ids: list[int]) -> dict[int, dict[str, int]]:
    """Runs per sweep and status, for the given sweeps."""
    if not sweep_ids:
        return {}
    rows = session.execute(
        select(Run.sweep_id, Run.status, func.count()).where(Run.sweep_id.in_(sweep_ids))
        .group_by(Run.sweep_id, Run.status)
    )
    counts: dict[int, dict[str, int]] = {}
    for sweep_id, status, count in rows:
        counts.setdefault(sweep_id, {})[RunStatus(status).value] = count
    return counts


def _sweep_record(sweep: Sweep, runs: dict[str, int]) -> SweepRecord:
    values = {name: getattr(sweep, name) for name in SweepRecord.model_fields
              if name not in ("search_space", "base_config", "runs")}
    return SweepRecord(**values, search_space=sweep.search_space_json, base_config=sweep.base_config_json,
                       runs=runs)
