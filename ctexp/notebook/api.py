"""The notebook API: recorded runs as pandas DataFrames and typed objects, read as the CLI reads them.

Every read goes through the registry (``Registry.list_runs``, ``resolve``, ``epochs``, ``results``,
``best``, ``list_sweeps``) and ``registry.readback.run_file``: the DataFrames hold exactly what
``ctexp runs --json`` and ``ctexp show --json`` print, one row per typed record, and the typed objects
(``RunRecord``, ``RunResult``, ``Lens``) are the CLI's own. A run's files (``result.json``,
``predictions.jsonl``, the lens) come from its run directory, or from MLflow where the directory is
not on this machine.

Each call opens the results database and closes it again, as a CLI command does, so a ``Home`` holds
no connection and can live in a notebook for days.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydantic import BaseModel

from ctexp.analysis.groupings import AXES, BREAKDOWNS, grouping
from ctexp.analysis.result import RunResult
from ctexp.errors import RegistryError
from ctexp.registry.locations import Locations
from ctexp.registry.queries import parse_since
from ctexp.registry.readback import PREDICTIONS_FILE, RESULT_FILE, run_file
from ctexp.registry.records import BestRow, ResultRow, RunRecord, SweepRecord

if TYPE_CHECKING:
    import torch

    from ctexp.lens.kinds import Lens
    from ctexp.lens.saved import LensSpec

BASELINES = ("prior", "identity")
METHOD_METRICS = ("loss", "top1", "top5", "top10")
LENS_FILES = ("lens.json", "lens.safetensors")


def open_home(
    where: str | Path | None = None, *, db_url: str | None = None, tracking_uri: str | None = None
) -> Home:
    """Open where runs live, as the CLI's ``--home`` / ``--db-url`` / ``--tracking-uri`` would.

    Args:
        where: a ctexp home directory (default: ``$CTEXP_HOME``, else ``./mlruns``), or a results
            database URL (``postgresql+psycopg://me@db/ctexp``, ``sqlite:///PATH``), told apart by its ``://``.
        db_url: the results database, when ``where`` is a home (default: ``HOME/ctexp.db`` or ``CTEXP_DB_URL``).
        tracking_uri: the MLflow store (default: ``HOME/mlflow.db`` or ``MLFLOW_TRACKING_URI``), asked
            for a run's files when its run directory is not under this home.

    Raises:
        ConfigError: both ``where`` as a URL and ``db_url`` were given.
    """
    from ctexp.errors import ConfigError

    home: Path | None = None
    if where is not None and "://" in str(where):
        if db_url is not None:
            raise ConfigError("give the results database once: as `where` or as db_url, not both")
        db_url = str(where)
    elif where is not None:
        home = Path(where).expanduser()
    return Home(Locations.resolve(home, db_url, tracking_uri))


@dataclass(frozen=True)
class Home:
    """Where runs live (``open_home``): runs, sweeps and the best run per group, as DataFrames."""

    locations: Locations

    def runs(
        self,
        *,
        experiment: str | None = None,
        lens: str | None = None,
        split: str | None = None,
        target: str | None = None,
        status: str | None = None,
        since: str | datetime | None = None,
        sweep: int | None = None,
        sort: str = "started_at",
        ascending: bool = False,
        limit: int | None = 50,
    ) -> pd.DataFrame:
        """Runs as ``ctexp runs`` lists them, one row per run (the fields of ``ctexp runs --json``).

        Args:
            experiment, lens, split, target: keep runs of this experiment name, lens kind, split rule
                (as written: ``uniform``, ``weighted:...``) and target rule.
            status: ``RUNNING``, ``FINISHED``, ``FAILED``, ``KILLED`` or ``PRUNED``.
            since: a datetime, ``2026-11-30``, ``2026-11-30T08:00``, ``90m``, ``12h`` or ``7d``.
            sweep: only the trials of this sweep id.
            sort: ``started_at`` or a headline metric (``test_top1``, ``test_loss``, ...).
            ascending: sort ascending (default: descending, newest or highest first).
            limit: at most this many runs (None: all).

        Returns:
            One row per run: ``id``, ``name``, ``experiment``, ``status``, the rules, provenance, the
            headline metrics, and ``config`` (a dict; ``pd.json_normalize(df.config)`` spreads it).

        Raises:
            RegistryError: the database cannot be read, or an unknown ``sort`` or ``status``.
            ConfigError: ``since`` is no date.
        """
        moment = parse_since(since) if isinstance(since, str) else since
        with self.locations.registry() as registry:
            records = registry.list_runs(
                experiment=experiment, lens=lens, split=split, target=target,
                status=status.upper() if status else None, since=moment, sweep_id=sweep, sort=sort,
                descending=not ascending, limit=limit,
            )
        return _frame(records, RunRecord)

    def run(self, ref: str = "latest") -> RecordedRun:
        """One run, by id, unique id prefix (4+ characters), run name, MLflow run id or ``latest``.

        Raises:
            RegistryError: nothing matches, or the prefix is ambiguous.
        """
        with self.locations.registry() as registry:
            return RecordedRun(self.locations, registry.resolve(ref))

    def best(
        self,
        by: str = "position",
        metric: str = "top1",
        *,
        experiment: str | None = None,
        lens: str | None = None,
        split: str | None = None,
        target: str | None = None,
    ) -> pd.DataFrame:
        """The finished run with the best ``metric`` in each group, as ``ctexp best --json`` gives it.

        Args:
            by: ``layer``, ``position`` or ``cell``.
            metric: ``top1``, ``top5``, ``top10`` or ``loss`` (lowest is best).
            experiment, lens, split, target: keep only such runs, as in ``runs``.

        Raises:
            RegistryError: an unknown grouping or metric.
        """
        with self.locations.registry() as registry:
            rows = registry.best(by, metric, experiment=experiment, lens=lens, split=split, target=target)
        return _drop_other_axes(_frame(rows, BestRow), by)

    def sweeps(self, *, experiment: str | None = None, limit: int | None = 50) -> pd.DataFrame:
        """Sweeps as ``ctexp sweeps --json`` lists them, newest first (their trials: ``runs(sweep=ID)``)."""
        with self.locations.registry() as registry:
            return _frame(registry.list_sweeps(experiment=experiment, limit=limit), SweepRecord)


@dataclass(frozen=True)
class RecordedRun:
    """One recorded run (``Home.run``): its typed record, its tables as DataFrames, its result, lens and
    predictions."""

    locations: Locations
    record: RunRecord

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def config(self) -> dict[str, Any]:
        """The resolved experiment configuration."""
        return self.record.config

    def epochs(self) -> pd.DataFrame:
        """Training progress by epoch (validation metrics), as ``ctexp show --json`` gives it under ``epochs``."""
        with self.locations.registry() as registry:
            epochs = registry.epochs(self.id)
        return pd.DataFrame([epoch.model_dump() for epoch in epochs])

    def results(self, by: str) -> pd.DataFrame:
        """The test results of one grouping, a row per group, with intervals, both baselines and lifts.

        Args:
            by: ``layer``, ``position`` or ``cell`` (``ctexp show --json``'s ``by_layer``, ``by_position``,
                ``by_cell``).

        Returns:
            One row per group, ordered by its keys: the key columns (``layer`` and/or ``position``), ``n``
            states, ``problems``, ``loss``/``top1``/``top5``/``top10`` with ``*_low``/``*_high`` 95%
            interval ends, ``prior_*`` and ``identity_*`` (the baselines on the same states), and
            ``lift_prior``/``lift_identity`` (top-1 minus theirs).

        Raises:
            RegistryError: an unknown grouping.
        """
        with self.locations.registry() as registry:
            rows = registry.results(self.id, by)
        return _drop_other_axes(_frame(rows, ResultRow), by)

    def by_layer(self) -> pd.DataFrame:
        """``results("layer")``."""
        return self.results("layer")

    def by_position(self) -> pd.DataFrame:
        """``results("position")``."""
        return self.results("position")

    def by_cell(self) -> pd.DataFrame:
        """``results("cell")``."""
        return self.results("cell")

    def baselines(self, by: str) -> pd.DataFrame:
        """The lens beside both baselines, long-form (one row per group and method), for plotting.

        Returns:
            Columns: the grouping's keys, ``method`` (``lens``, ``prior``, ``identity``), ``n``, and
            ``loss``, ``top1``, ``top5``, ``top10`` of that method on the group's states.
        """
        wide = self.results(by)
        keys = [*grouping(by, BREAKDOWNS).keys, "n"]
        parts = [wide[keys + list(METHOD_METRICS)].assign(method="lens")]
        for name in BASELINES:
            renamed = {f"{name}_{metric}": metric for metric in METHOD_METRICS}
            parts.append(wide[keys + list(renamed)].rename(columns=renamed).assign(method=name))
        return pd.concat(parts, ignore_index=True)[[*keys, "method", *METHOD_METRICS]]

    def grid(self, metric: str = "top1") -> pd.DataFrame:
        """``metric`` by (layer, position) cell as a grid: layers down, positions across (the heatmap)."""
        return self.by_cell().pivot(index="layer", columns="position", values=metric)

    def result(self) -> RunResult:
        """The run's full typed result (``result.json``: what ``ctexp run --json`` printed, samples included).

        Raises:
            RegistryError: the run has no result file (it did not finish, or its files are gone).
        """
        with tempfile.TemporaryDirectory(prefix="ctexp-notebook-") as scratch:
            path = self._file(RESULT_FILE, Path(scratch))
            return RunResult.model_validate_json(path.read_text(encoding="utf-8"))

    def predictions(self) -> pd.DataFrame:
        """One row per test state (``predictions.jsonl``): ``problem_id``, ``position``, ``layer``,
        ``targets``, ``top5_ids``, ``top5_probs``, ``loss``, ``hit1``, ``hit5``, ``hit10``.

        Raises:
            RegistryError: the run has no predictions file.
        """
        with tempfile.TemporaryDirectory(prefix="ctexp-notebook-") as scratch:
            path = self._file(PREDICTIONS_FILE, Path(scratch))
            with path.open(encoding="utf-8") as handle:
                return pd.DataFrame.from_records([json.loads(line) for line in handle if line.strip()])

    def lens(self, device: str | torch.device = "cpu") -> tuple[Lens, LensSpec]:
        """The trained lens (``Lens.load``), on ``device`` in eval mode, and its spec (kind, layers, config).

        Raises:
            RegistryError: the run has no lens files.
            StoreError: the lens files are damaged.
        """
        from ctexp.lens.kinds import Lens

        with tempfile.TemporaryDirectory(prefix="ctexp-notebook-") as scratch:
            paths = [self._file(name, Path(scratch)) for name in LENS_FILES]
            return Lens.load(paths[0].parent, device)

    def _file(self, name: str, scratch: Path) -> Path:
        found = run_file(self.locations, self.record, name, scratch)
        if found is None:
            raise RegistryError(
                f"run {self.id[:12]} ({self.record.name}, {self.record.status.value}) has no {name}: not in "
                f"{self.locations.home / 'runs' / self.id} nor in its MLflow run"
            )
        return found[0]


def _frame(records: Sequence[BaseModel], model: type[BaseModel]) -> pd.DataFrame:
    """One row per record, its fields as columns (enums as their values); the model's columns when empty."""
    if not records:
        return pd.DataFrame(columns=list(model.model_fields))
    rows = []
    for record in records:
        row = record.model_dump()
        rows.append({key: getattr(value, "value", value) if key == "status" else value for key, value in row.items()})
    return pd.DataFrame(rows)


def _drop_other_axes(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """Without the axis columns the grouping does not key on (``position`` in a by-layer table)."""
    keys = grouping(by, BREAKDOWNS).keys
    return frame.drop(columns=[axis for axis in AXES if axis not in keys and axis in frame.columns])
