"""The results database: engine, schema revision, transactions, and the registry's reads and writes.

One ``Registry`` per process (or per command) wraps one engine. The URL is SQLite by default
(``HOME/ctexp.db``, no server) or PostgreSQL for sweeps spread over machines; the same code serves
both. Alembic owns the schema: opening a registry brings a database that is behind up to date, under
a lock so that many workers starting together on a fresh database are safe.

Every write is one transaction; every driver error becomes a one-line ``RegistryError`` that names
the database by its masked URL (never its password).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Row, Select, and_, create_engine, delete, event, func, select, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session

from ctexp.analysis.result import EpochMetrics, GroupMetrics, RunResult
from ctexp.config import ExperimentConfig
from ctexp.errors import RegistryError
from ctexp.locking import file_lock
from ctexp.records import FrozenRecord
from ctexp.registry.models import (
    BASELINES,
    GROUP_KEYS,
    HEADLINE_METRICS,
    HIGHER_IS_BETTER,
    METRICS,
    RESULT_TABLES,
    VERSION_TABLE,
    Epoch,
    Experiment,
    Run,
    RunStatus,
    Sweep,
    SweepStatus,
    metric_column_names,
)

T = TypeVar("T")
Breakdown = Literal["layer", "position", "cell"]

TEST_SPLIT = "test"
SQLITE_BUSY_TIMEOUT_S = 30
POSTGRES_CONNECT_TIMEOUT_S = 5
LOCKED_ATTEMPTS = 5  # a write that still finds SQLite locked after its busy timeout is retried this often
LOCKED_BACKOFF_S = 0.2
# Transaction-scoped PostgreSQL advisory lock that serialises schema upgrades ("ctexp" + 1).
SCHEMA_LOCK_KEY = 0x6374657870_01
WRITE_OPTION = "ctexp_write"  # execution option: the transaction will write (SQLite: BEGIN IMMEDIATE)
MIN_PREFIX = 4
RUN_SORTS = ("started_at", *HEADLINE_METRICS)


# ---------------------------------------------------------------------------------------------------------
# URLs and engines


def resolve_db_url(db_url: str | None, home: Path) -> str:
    """The results database URL: the argument, else ``$CTEXP_DB_URL``, else SQLite at ``HOME/ctexp.db``.

    Nothing is created here; the SQLite file's directory is made when the registry first opens it.

    Args:
        db_url: an explicit URL (``--db-url``), or None.
        home: the ctexp home (``--home`` / ``$CTEXP_HOME``).

    Returns:
        A SQLAlchemy URL; the default one holds an absolute path, so it means the same from any directory.
    """
    if db_url:
        return db_url
    from_env = os.environ.get("CTEXP_DB_URL")
    if from_env:
        return from_env
    return f"sqlite:///{Path(home).expanduser().resolve() / 'ctexp.db'}"


def mask_url(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` query) replaced by ``***``."""
    try:
        parsed = make_url(url)
    except ArgumentError:  # not a URL SQLAlchemy reads: mask what looks like user:password@
        return re.sub(r"(//[^/:@]*:)[^@/]*@", r"\1***@", url)
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True)


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with ctexp's settings (connect timeout; SQLite WAL, busy timeout, foreign keys).

    Raises:
        RegistryError: the URL cannot be parsed, or its driver is not installed.
    """
    masked = mask_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise RegistryError(
            f"{masked!r} is not a database URL; use e.g. sqlite:////abs/path/ctexp.db or "
            "postgresql+psycopg://user@host/db (check --db-url / CTEXP_DB_URL)"
        ) from None
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = {}
    if backend == "postgresql" and parsed.get_driver_name() in ("psycopg", "psycopg2"):
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S  # an unreachable host fails fast
    try:
        engine = create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    except (NoSuchModuleError, ImportError) as error:
        raise RegistryError(
            f"cannot use the results database at {masked}: {_one_line(error)}; install its driver "
            "(e.g. psycopg for PostgreSQL) or check --db-url / CTEXP_DB_URL"
        ) from None
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling starts transactions late and never as BEGIN IMMEDIATE;
    # turning it off lets SQLAlchemy emit BEGIN itself (the recipe in SQLAlchemy's SQLite docs).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")  # first: WAL below may wait
    cursor.execute("PRAGMA foreign_keys = ON")  # off by default in SQLite; cascades need it
    cursor.execute("PRAGMA journal_mode = WAL")  # readers and one writer at a time, without blocking
    cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    # A writer takes the write lock up front: a deferred transaction that reads and then writes fails at
    # once ("database is locked", busy timeout or not) when another process wrote in between.
    immediate = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other backends and in-memory databases."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.database.startswith("file:"):  # a URI filename: no lock file beside it
        return None
    return Path(parsed.database)


def _one_line(error: BaseException) -> str:
    """The first line of an error's message: drivers add hints and SQL on later lines."""
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def migrations_dir() -> Path:
    """Where the Alembic environment lives: ``ctexp/migrations`` in a wheel, else ``migrations/`` of the checkout.

    The repository keeps ``migrations/`` at its root and the wheel ships it as ``ctexp.migrations``
    (see setup.py). Both are found from this module's own file (``ctexp/registry/db.py``) rather than
    ``ctexp.__file__``, which is None when an editable install maps ``ctexp`` as a namespace package.
    The packaged copy is looked at first, so that an unrelated top-level ``migrations`` beside an
    installed ctexp is never taken for ours.

    Raises:
        RegistryError: neither holds ``env.py`` (a broken install).
    """
    package = Path(__file__).resolve().parents[1]
    candidates = (package / "migrations", package.parent / "migrations")
    for path in candidates:
        if (path / "env.py").is_file():
            return path
    raise RegistryError(
        f"ctexp's database migrations are missing (looked in {candidates[0]} and {candidates[1]}); "
        "reinstall ctexp (pip install .) or run it from its repository checkout"
    )


# ---------------------------------------------------------------------------------------------------------
# What reads return: plain typed values, detached from any session


class RunRecord(FrozenRecord):
    """One run as the registry holds it: provenance, status and headline test metrics."""

    id: str
    name: str
    experiment: str
    status: RunStatus
    started_at: datetime
    ended_at: datetime | None
    heartbeat_at: datetime
    lens: str
    adapter: str
    split: str
    target: str
    layers: str
    positions: str
    seed: int
    device: str
    store_hash: str
    store_path: str | None
    code_version: str
    mlflow_run_id: str | None
    sweep_id: int | None
    trial_number: int | None
    error: str | None
    config: dict[str, Any]
    test_top1: float | None
    test_top5: float | None
    test_top10: float | None
    test_loss: float | None
    test_top1_low: float | None
    test_top1_high: float | None
    prior_top1: float | None
    identity_top1: float | None
    best_val_loss: float | None
    best_epoch: int | None
    n_test_problems: int | None
    n_test_states: int | None
    seconds: float | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ISO 8601 datetimes, status as its name)."""
        return self.model_dump(mode="json")


class ResultRow(FrozenRecord):
    """Test metrics of one layer, position or cell of a run, with intervals and baselines."""

    run_id: str
    split: str
    layer: int | None = None
    position: int | None = None
    n: int
    problems: int
    loss: float | None
    top1: float | None
    top5: float | None
    top10: float | None
    loss_low: float | None
    loss_high: float | None
    top1_low: float | None
    top1_high: float | None
    top5_low: float | None
    top5_high: float | None
    top10_low: float | None
    top10_high: float | None
    prior_loss: float | None
    prior_top1: float | None
    prior_top5: float | None
    prior_top10: float | None
    identity_loss: float | None
    identity_top1: float | None
    identity_top5: float | None
    identity_top10: float | None
    lift_prior: float | None
    lift_identity: float | None

    def interval(self, metric: str) -> tuple[float, float] | None:
        """The 95% interval of ``metric`` (loss, top1, top5, top10), or None."""
        low, high = getattr(self, f"{metric}_low"), getattr(self, f"{metric}_high")
        return None if low is None or high is None else (low, high)

    def as_group_metrics(self) -> GroupMetrics:
        """This row in the engine's shape (``RunResult.by_layer`` etc.), e.g. for the run tables."""
        return GroupMetrics(
            layer=self.layer, position=self.position, n=self.n, problems=self.problems, loss=self.loss,
            top1=self.top1, top5=self.top5, top10=self.top10,
            ci={metric: self.interval(metric) for metric in ("loss", "top1", "top5", "top10")},
            prior_top1=self.prior_top1, identity_top1=self.identity_top1, lift_prior=self.lift_prior,
            lift_identity=self.lift_identity,
        )


class BestRow(FrozenRecord):
    """The finished run with the best value of a metric at one layer, position or cell."""

    layer: int | None = None
    position: int | None = None
    metric: str
    value: float
    low: float | None
    high: float | None
    n: int
    run_id: str
    run_name: str
    experiment: str
    lens: str
    adapter: str
    split: str  # the run's split rule
    target: str


class SweepRecord(FrozenRecord):
    """One sweep as the registry holds it, with its trials' runs counted by status."""

    id: int
    name: str
    study_name: str
    storage: str
    experiment: str
    objective: str
    direction: str
    sampler: str
    pruner: str
    n_trials: int
    search_space: dict[str, Any]
    base_config: dict[str, Any]
    mlflow_parent_run_id: str | None
    status: SweepStatus
    created_at: datetime
    ended_at: datetime | None
    best_trial_number: int | None
    best_value: float | None
    runs: dict[str, int]  # ctexp runs of its trials by status (FINISHED, PRUNED, FAILED, ...)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ISO 8601 datetimes, status as its name)."""
        return self.model_dump(mode="json")


# Columns a command may change on an existing sweep (the rest define it and never change).
SWEEP_UPDATABLE = ("status", "n_trials", "sampler", "pruner", "best_trial_number", "best_value")


# ---------------------------------------------------------------------------------------------------------
# The registry


class Registry:
    """Reads and writes ctexp's results database.

    Args:
        url: a SQLAlchemy URL (see ``resolve_db_url``).
        upgrade: bring a database whose schema is behind this ctexp up to date (under a lock);
            when False, such a database is an error that names ``ctexp db upgrade``.
        check_schema: check the schema revision at all; False is for ``ctexp db`` commands that report
            or change the revision themselves.

    Raises:
        RegistryError: the database cannot be reached, is of a newer schema than this ctexp, or is
            behind while ``upgrade`` is False.
    """

    def __init__(self, url: str, upgrade: bool = True, *, check_schema: bool = True) -> None:
        self.masked_url = mask_url(url)
        self._url = url
        self._sqlite_path = _sqlite_path(url)
        self._make_sqlite_dir()
        self._engine = make_engine(url)
        # Shares the pool; only marks transactions as writes (SQLite: BEGIN IMMEDIATE).
        self._writer = self._engine.execution_options(**{WRITE_OPTION: True})
        self._script: ScriptDirectory | None = None
        try:
            if check_schema:
                self._ensure_schema(upgrade)
        except BaseException:
            self._engine.dispose()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self._engine.dispose()

    # -- schema ---------------------------------------------------------------------------------------

    def current_revision(self) -> str | None:
        """The database's ctexp schema revision; None for a database ctexp has never touched."""
        with self._connect() as connection:
            return self._revision_of(connection)

    def head_revision(self) -> str:
        """The newest schema revision this ctexp knows."""
        head = self._scripts().get_current_head()
        assert head is not None, "migrations/versions holds no revision"
        return head

    def upgrade(self) -> None:
        """Bring the schema to this ctexp's head revision, one process at a time.

        Raises:
            RegistryError: the database is at a revision newer than this ctexp, or a migration fails.
        """
        with self._schema_lock() as connection:
            current = self._revision_of(connection)  # again: another process may have upgraded meanwhile
            self._check_known(current)
            if current != self.head_revision():
                config = self._alembic_config(connection)
                self._translating("upgrade the schema", lambda: command.upgrade(config, "head"))
                self._check_sqlite_foreign_keys(connection)
            connection.commit()

    def _ensure_schema(self, upgrade: bool) -> None:
        current, head = self.current_revision(), self.head_revision()
        if current == head:
            return
        self._check_known(current)
        if not upgrade:
            raise RegistryError(
                f"the results database at {self.masked_url} is at schema revision {current or 'none (empty)'}, "
                f"behind this ctexp (head {head}); run `ctexp db upgrade` to bring it up to date"
            )
        self.upgrade()

    def _check_known(self, current: str | None) -> None:
        known = {script.revision for script in self._scripts().walk_revisions()}
        if current is not None and current not in known:
            raise RegistryError(
                f"the results database at {self.masked_url} is at schema revision {current}, newer than "
                f"this ctexp (head {self.head_revision()}); upgrade ctexp"
            )

    def _scripts(self) -> ScriptDirectory:
        if self._script is None:
            self._script = ScriptDirectory.from_config(self._alembic_config())
        return self._script

    @staticmethod
    def _alembic_config(connection: Connection | None = None) -> Config:
        config = Config()
        config.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
        config.set_main_option("path_separator", "os")
        if connection is not None:
            config.attributes["connection"] = connection  # env.py migrates on it, inside our lock
        return config

    @staticmethod
    def _revision_of(connection: Connection) -> str | None:
        return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()

    @contextlib.contextmanager
    def _schema_lock(self) -> Iterator[Connection]:
        """A connection on which this process alone may migrate the schema."""
        with contextlib.ExitStack() as stack:
            if self._sqlite_path is not None:
                stack.enter_context(_file_lock(Path(f"{self._sqlite_path}.lock"), self.masked_url))
            connection = stack.enter_context(self._connect(write=True))
            if self._engine.dialect.name == "sqlite":
                stack.enter_context(_sqlite_foreign_keys_off(connection))
            if self._engine.dialect.name == "postgresql":
                # Held until the transaction (which holds the migration, DDL being transactional) ends.
                connection.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY)))
            yield connection

    def _check_sqlite_foreign_keys(self, connection: Connection) -> None:
        # Batch migrations copy SQLite tables with foreign keys off; make sure they left none dangling.
        if self._engine.dialect.name == "sqlite":
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                connection.rollback()
                raise RegistryError(
                    f"upgrading the results database at {self.masked_url} would leave {len(broken)} rows "
                    f"with dangling references (first in {broken[0][0]}); nothing was changed"
                )

    # -- transactions ---------------------------------------------------------------------------------

    def _make_sqlite_dir(self) -> None:
        if self._sqlite_path is None:
            return
        try:
            self._sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RegistryError(
                f"cannot create the directory of the results database {self.masked_url}: {error.strerror}; "
                "check --db-url / CTEXP_DB_URL / --home"
            ) from None

    @contextlib.contextmanager
    def _connect(self, write: bool = False) -> Iterator[Connection]:
        try:
            connection = (self._writer if write else self._engine).connect()
        except DBAPIError as error:
            raise self._database_error(error, "connect") from error
        with connection:
            yield connection

    def _translating(self, action: str, work: Callable[[], T]) -> T:
        try:
            return work()
        except DBAPIError as error:
            raise self._database_error(error, action) from error

    @contextlib.contextmanager
    def _session(self, action: str, *, write: bool = False) -> Iterator[Session]:
        """One transaction: commits on success, rolls back on any error, driver errors become RegistryError."""
        try:
            with Session(self._writer if write else self._engine, expire_on_commit=False) as session, session.begin():
                yield session
        except DBAPIError as error:
            raise self._database_error(error, action) from error

    def _write(self, action: str, work: Callable[[Session], T]) -> T:
        """Run ``work`` in one write transaction, again if SQLite stays locked past its busy timeout."""
        for attempt in range(1, LOCKED_ATTEMPTS + 1):
            try:
                with self._session(action, write=True) as session:
                    return work(session)
            except _DatabaseLocked:
                if attempt == LOCKED_ATTEMPTS:
                    raise
                time.sleep(LOCKED_BACKOFF_S * attempt)
        raise AssertionError("unreachable")

    def _database_error(self, error: DBAPIError, action: str) -> RegistryError:
        reason = self._scrub(_one_line(error))
        if isinstance(error, OperationalError) and re.search(r"database is (locked|busy)", reason):
            return _DatabaseLocked(
                f"the results database at {self.masked_url} stayed locked by other writers; could not {action}"
            )
        if error.statement is None or error.connection_invalidated:  # failed to connect, or lost it
            return RegistryError(
                f"cannot reach the results database at {self.masked_url}: {reason}; check --db-url / CTEXP_DB_URL"
            )
        if isinstance(error, IntegrityError):
            return RegistryError(f"the results database refused to {action}: {reason}")
        return RegistryError(f"the results database at {self.masked_url} failed to {action}: {reason}")

    def _scrub(self, text: str) -> str:
        """``text`` without the URL's password, should a driver ever echo it."""
        try:
            password = make_url(self._url).password
        except ArgumentError:
            return text
        return text.replace(str(password), "***") if password else text

    # -- writes ---------------------------------------------------------------------------------------

    def start_run(
        self,
        run_id: str,
        name: str,
        config: ExperimentConfig,
        *,
        store_hash: str,
        store_path: str | None,
        device: str,
        code_version: str,
        sweep_id: int | None = None,
        trial_number: int | None = None,
        mlflow_run_id: str | None = None,
    ) -> None:
        """Record a RUNNING run (and its experiment, created on first use), with its heartbeat now.

        Raises:
            RegistryError: the run id is already recorded, or the database fails.
        """
        now = _now()

        def work(session: Session) -> None:
            if session.get(Run, run_id) is not None:
                raise RegistryError(f"run {run_id} is already in the results database; start a run with a new id")
            session.add(Run(
                id=run_id, name=name, experiment_id=_experiment_id(session, config, now),
                status=RunStatus.RUNNING, started_at=now, heartbeat_at=now,
                config_json=config.model_dump(mode="json"), lens=config.lens.value, adapter=config.adapter.value,
                split=str(config.split), target=config.target.value, layers=config.layers,
                positions=config.positions, seed=config.seed, store_hash=store_hash, store_path=store_path,
                code_version=code_version, device=device, mlflow_run_id=mlflow_run_id, sweep_id=sweep_id,
                trial_number=trial_number,
            ))

        self._write(f"record the start of run {run_id}", work)

    def set_mlflow_run_id(self, run_id: str, mlflow_run_id: str) -> None:
        """Link a run to its MLflow run."""
        self._update_run(run_id, f"link run {run_id} to MLflow", mlflow_run_id=mlflow_run_id)

    def heartbeat(self, run_id: str) -> None:
        """Say the run is alive (``mark_stale_runs`` fails runs that stop saying so)."""
        self._update_run(run_id, f"record a heartbeat of run {run_id}", heartbeat_at=_now())

    def record_epoch(self, run_id: str, epoch: EpochMetrics) -> None:
        """Record (or replace) one epoch's metrics, and the run's heartbeat."""
        def work(session: Session) -> None:
            _require_run(session, run_id).heartbeat_at = _now()
            session.merge(_epoch_row(run_id, epoch))

        self._write(f"record epoch {epoch.epoch} of run {run_id}", work)

    def finish_run(self, result: RunResult) -> None:
        """Record a run's results and mark it FINISHED, in one transaction.

        Writes its epochs (replacing those recorded along the way), one row per layer, position and cell
        with intervals and the baselines' values on the same states, and the headline metrics. Finishing
        again replaces the results: it is safe to retry.

        Raises:
            RegistryError: the run was never started, or the database fails.
        """
        def work(session: Session) -> None:
            run = _require_run(session, result.run_id)
            for table in (Epoch, *RESULT_TABLES.values()):
                session.execute(delete(table).where(table.run_id == run.id))
            session.add_all(_epoch_row(run.id, epoch) for epoch in result.epochs)
            for by, table in RESULT_TABLES.items():
                rows = _group_rows(result, by)
                if rows:
                    session.execute(table.__table__.insert(), rows)
            now = _now()
            run.name = result.name
            run.status, run.ended_at, run.heartbeat_at, run.error = RunStatus.FINISHED, now, now, None
            for column, value in _headline(result).items():
                setattr(run, column, value)

        self._write(f"record the results of run {result.run_id}", work)

    def end_run(self, run_id: str, status: RunStatus, error: str | None = None) -> None:
        """End a run that did not finish: FAILED, KILLED or PRUNED, with the reason. Its epochs are kept.

        A FINISHED run stays finished (so an error after ``finish_run`` cannot undo its results).

        Raises:
            ValueError: ``status`` is not FAILED, KILLED or PRUNED.
            RegistryError: the run is unknown, or the database fails.
        """
        status = RunStatus(status)
        if status not in (RunStatus.FAILED, RunStatus.KILLED, RunStatus.PRUNED):
            raise ValueError(
                f"end_run takes FAILED, KILLED or PRUNED, not {status.value}; use finish_run for results"
            )

        def work(session: Session) -> None:
            run = _require_run(session, run_id)
            if run.status is not RunStatus.FINISHED:
                run.status, run.error, run.ended_at = status, error, _now()

        self._write(f"record the end of run {run_id}", work)

    def mark_stale_runs(self, older_than_s: float) -> list[str]:
        """Mark FAILED ("heartbeat lost") the RUNNING runs whose last heartbeat is older than ``older_than_s``.

        Their end time is their last heartbeat, the last time they were known alive.

        Returns:
            The ids of the runs marked.
        """
        cutoff = _now() - timedelta(seconds=older_than_s)
        statement = (
            update(Run)
            .where(Run.status == RunStatus.RUNNING, Run.heartbeat_at < cutoff)
            .values(status=RunStatus.FAILED, error="heartbeat lost", ended_at=Run.heartbeat_at)
            .returning(Run.id)
            .execution_options(synchronize_session=False)
        )
        return sorted(self._write("mark stale runs", lambda session: list(session.scalars(statement))))

    def delete_run(self, run_id: str) -> None:
        """Delete a run; its epochs and results go with it (foreign keys cascade in the database).

        Raises:
            RegistryError: the run is unknown, or the database fails.
        """
        def work(session: Session) -> None:
            deleted = session.execute(delete(Run).where(Run.id == run_id)).rowcount
            if not deleted:
                raise _unknown_run(run_id)

        self._write(f"delete run {run_id}", work)

    def _update_run(self, run_id: str, action: str, **values: Any) -> None:
        def work(session: Session) -> None:
            if not session.execute(update(Run).where(Run.id == run_id).values(**values)).rowcount:
                raise _unknown_run(run_id)

        self._write(action, work)

    # -- reads ----------------------------------------------------------------------------------------

    def resolve(self, ref: str) -> RunRecord:
        """Find one run by a full id, a unique id prefix (4+ characters), a run name (the latest run of
        that name), an MLflow run id, or ``latest``; exact matches win over prefixes.

        Raises:
            RegistryError: nothing matches, or the prefix matches several runs (they are listed).
        """
        ref = ref.strip()
        with self._session(f"find run {ref!r}") as session:
            if ref == "latest":
                row = session.execute(_runs().order_by(Run.started_at.desc(), Run.id.desc()).limit(1)).first()
                if row is None:
                    raise RegistryError(f"the results database at {self.masked_url} holds no runs yet")
                return _record(row)
            for condition in (Run.id == ref.lower(), Run.mlflow_run_id == ref, Run.name == ref):
                row = session.execute(_runs().where(condition).order_by(Run.started_at.desc()).limit(1)).first()
                if row is not None:
                    return _record(row)
            if len(ref) >= MIN_PREFIX and re.fullmatch(r"[0-9a-fA-F]+", ref):
                query = _runs().where(Run.id.startswith(ref.lower(), autoescape=True)).order_by(Run.started_at.desc())
                rows = session.execute(query.limit(6)).all()
                if len(rows) == 1:
                    return _record(rows[0])
                if rows:
                    listed = ", ".join(f"{row.Run.id[:12]} ({row.Run.name})" for row in rows[:5])
                    more = ", ..." if len(rows) > 5 else ""
                    raise RegistryError(f"run id prefix {ref!r} is ambiguous: {listed}{more}; give more of the id")
        raise RegistryError(
            f"no run matches {ref!r}; RUN may be a run id, a unique id prefix of {MIN_PREFIX}+ characters, "
            "a run name, an MLflow run id, or 'latest'"
        )

    def list_runs(
        self,
        *,
        experiment: str | None = None,
        lens: str | None = None,
        split: str | None = None,
        target: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
        sweep_id: int | None = None,
        sort: str = "started_at",
        descending: bool = True,
        limit: int | None = None,
    ) -> list[RunRecord]:
        """Runs matching every filter given, sorted by ``started_at`` or a headline metric (missing last).

        ``split`` is the split rule as written (``uniform``, ``weighted:...``); ``since`` without a
        timezone is taken as UTC.

        Raises:
            RegistryError: an unknown ``sort`` or ``status`` (the choices are listed).
        """
        if sort not in RUN_SORTS:
            raise RegistryError(f"cannot sort runs by {sort!r}; choose one of: {', '.join(RUN_SORTS)}")
        query = _runs().where(*_run_filters(experiment=experiment, lens=lens, split=split, target=target))
        if status is not None:
            query = query.where(Run.status == _status(status))
        if since is not None:
            query = query.where(Run.started_at >= _as_utc(since))
        if sweep_id is not None:
            query = query.where(Run.sweep_id == sweep_id)
        column = getattr(Run, sort)
        query = query.order_by((column.desc() if descending else column.asc()).nulls_last(), Run.id)
        if limit is not None:
            query = query.limit(limit)
        with self._session("list runs") as session:
            return [_record(row) for row in session.execute(query)]

    def epochs(self, run_id: str) -> list[EpochMetrics]:
        """A run's epochs, in order.

        Raises:
            RegistryError: the run is unknown.
        """
        with self._session(f"read the epochs of run {run_id}") as session:
            _require_run(session, run_id)
            epochs = session.scalars(select(Epoch).where(Epoch.run_id == run_id).order_by(Epoch.epoch))
            return [EpochMetrics.model_validate(epoch, from_attributes=True) for epoch in epochs]

    def results(self, run_id: str, by: Breakdown) -> list[ResultRow]:
        """A run's test results by layer, position or cell, ordered by layer then position.

        Raises:
            RegistryError: the run or the breakdown is unknown.
        """
        table = _result_table(by)
        keys = [getattr(table, key) for key in GROUP_KEYS[by]]
        with self._session(f"read the results of run {run_id}") as session:
            _require_run(session, run_id)
            rows = session.scalars(select(table).where(table.run_id == run_id).order_by(table.split, *keys))
            return [ResultRow.model_validate(row, from_attributes=True) for row in rows]

    def best(
        self,
        by: Breakdown,
        metric: str = "top1",
        *,
        experiment: str | None = None,
        lens: str | None = None,
        split: str | None = None,
        target: str | None = None,
        split_name: str = TEST_SPLIT,
    ) -> list[BestRow]:
        """For each layer, position or cell: the finished run with the best ``metric`` there.

        Best is highest for top-k and lowest for loss; ties go to the earlier run. One SQL query: the
        best value per group (``MAX``/``MIN`` with ``GROUP BY``), then a ``ROW_NUMBER()`` window over the
        runs that reach it (the ties only), joined to their results by primary key. A window over every
        (run, group) row was twice as slow: its sort costs by the rows, the aggregate does not sort.

        Args:
            by: the breakdown: ``layer``, ``position`` or ``cell``.
            metric: ``top1``, ``top5``, ``top10`` or ``loss``.
            experiment, lens, split, target: keep only runs of this experiment name, lens kind, split
                rule and target rule.
            split_name: the evaluated data split the results are of.

        Raises:
            RegistryError: an unknown breakdown or metric.
        """
        if metric not in METRICS:
            raise RegistryError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
        table = _result_table(by)
        keys = [getattr(table, key) for key in GROUP_KEYS[by]]
        value = getattr(table, metric)

        def eligible(*columns: Any) -> Select:
            """``columns`` of the results of finished runs that pass the filters."""
            query = (
                select(*columns)
                .join(Run, Run.id == table.run_id)
                .where(table.split == split_name, Run.status == RunStatus.FINISHED, value.is_not(None))
                .where(*_run_filters(lens=lens, split=split, target=target))
            )
            if experiment is not None:
                query = query.join(Experiment, Experiment.id == Run.experiment_id).where(Experiment.name == experiment)
            return query

        best_value = (func.max if HIGHER_IS_BETTER[metric] else func.min)(value)
        bests = eligible(*keys, best_value.label("best")).group_by(*keys).subquery()
        rank = func.row_number().over(partition_by=keys, order_by=(Run.started_at, Run.id))
        reaching = [key == bests.c[name] for key, name in zip(keys, GROUP_KEYS[by], strict=True)]
        ranked = (
            eligible(*keys, Run.id.label("run_id"), rank.label("rank"))
            .join(bests, and_(*reaching, value == bests.c.best))
            .subquery()
        )
        same_group = [getattr(table, key) == ranked.c[key] for key in GROUP_KEYS[by]]
        query = (
            select(
                *(ranked.c[key] for key in GROUP_KEYS[by]), value.label("value"),
                getattr(table, f"{metric}_low").label("low"), getattr(table, f"{metric}_high").label("high"),
                table.n, ranked.c.run_id, Run.name.label("run_name"), Experiment.name.label("experiment"),
                Run.lens, Run.adapter, Run.split.label("split_rule"), Run.target,
            )
            .select_from(ranked)
            .join(table, and_(table.run_id == ranked.c.run_id, table.split == split_name, *same_group))
            .join(Run, Run.id == ranked.c.run_id)
            .join(Experiment, Experiment.id == Run.experiment_id)
            .where(ranked.c.rank == 1)
            .order_by(*(ranked.c[key] for key in GROUP_KEYS[by]))
        )
        with self._session(f"find the best runs by {by}") as session:
            return [
                BestRow(
                    **{key: getattr(row, key) for key in GROUP_KEYS[by]}, metric=metric, value=row.value,
                    low=row.low, high=row.high, n=row.n, run_id=row.run_id, run_name=row.run_name,
                    experiment=row.experiment, lens=row.lens, adapter=row.adapter, split=row.split_rule,
                    target=row.target,
                )
                for row in session.execute(query)
            ]


    # -- sweeps ---------------------------------------------------------------------------------------

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
                created_at=_now(),
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
            values["ended_at"] = None if values["status"] is SweepStatus.RUNNING else _now()

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

    def list_trials(self, sweep_id: int) -> list[RunRecord]:
        """The runs of a sweep's trials, by trial number (a retried trial's runs in start order)."""
        query = _runs().where(Run.sweep_id == sweep_id).order_by(Run.trial_number, Run.started_at, Run.id)
        with self._session(f"list the trials of sweep {sweep_id}") as session:
            return [_record(row) for row in session.execute(query)]


class _DatabaseLocked(RegistryError):
    """SQLite stayed locked past its busy timeout: the write may be retried."""


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _epoch_row(run_id: str, epoch: EpochMetrics) -> Epoch:
    """The SQL row of an epoch (per-position validation top-1 stays in result.json)."""
    return Epoch(run_id=run_id, **epoch.model_dump(exclude={"val_position_top1"}))


def _now() -> datetime:
    return datetime.now(UTC)


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@contextlib.contextmanager
def _file_lock(path: Path, masked_url: str) -> Iterator[None]:
    """An exclusive lock on ``path`` for this process (released on exit, or when the process dies)."""
    try:
        with file_lock(path):
            yield
    except OSError as error:
        raise RegistryError(f"cannot create the schema lock {path} of {masked_url}: {error.strerror}") from None


@contextlib.contextmanager
def _sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    # SQLite's DROP TABLE deletes rows first, and with foreign keys on, that cascades: a batch migration
    # that copies ctexp_runs would empty the results tables. The pragma only takes effect outside a
    # transaction, so it goes to the driver connection before SQLAlchemy begins one.
    driver = connection.connection.dbapi_connection
    assert driver is not None
    driver.execute("PRAGMA foreign_keys = OFF")
    try:
        yield
    finally:
        if connection.in_transaction():
            connection.rollback()
        driver.execute("PRAGMA foreign_keys = ON")


def _experiment_id(session: Session, config: ExperimentConfig, now: datetime) -> int:
    """The id of the experiment ``(config.experiment, config_hash)``, created if new."""
    name, config_hash = config.experiment, config.config_hash()
    query = select(Experiment.id).where(Experiment.name == name, Experiment.config_hash == config_hash)
    found = session.scalar(query)
    if found is not None:
        return found
    experiment = Experiment(
        name=name, config_hash=config_hash, created_at=now,
        config_json=config.model_dump(mode="json", exclude={"name", "device"}),
    )
    try:
        with session.begin_nested():  # a savepoint: losing a race to another writer keeps our transaction
            session.add(experiment)
    except IntegrityError:
        found = session.scalar(query)  # the other writer's row
        assert found is not None
        return found
    return experiment.id


def _require_run(session: Session, run_id: str) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise _unknown_run(run_id)
    return run


def _unknown_run(run_id: str) -> RegistryError:
    return RegistryError(f"run {run_id!r} is not in the results database; give the full id of a recorded run")


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


def _status(text: str) -> RunStatus:
    try:
        return RunStatus(str(text).upper())
    except ValueError:
        raise RegistryError(
            f"unknown run status {text!r}; choose one of: {', '.join(status.value for status in RunStatus)}"
        ) from None


def _result_table(by: str) -> Any:
    if by not in RESULT_TABLES:
        raise RegistryError(f"unknown breakdown {by!r}; choose one of: {', '.join(RESULT_TABLES)}")
    return RESULT_TABLES[by]


def _runs() -> Select[tuple[Run, str]]:
    return select(Run, Experiment.name.label("experiment")).join(Experiment, Experiment.id == Run.experiment_id)


def _run_filters(**equal: str | None) -> list[Any]:
    """Equality filters on runs; ``experiment`` is the experiment's name, the rest are run columns."""
    conditions = []
    for field, value in equal.items():
        if value is None:
            continue
        # str(): a StrEnum (LensKind.LAYER) compares by its value, whatever the driver does with enums.
        column = Experiment.name if field == "experiment" else getattr(Run, field)
        conditions.append(column == str(value))
    return conditions


def _record(row: Row[Any]) -> RunRecord:
    run: Run = row.Run
    values = {name: getattr(run, name) for name in RunRecord.model_fields if name not in ("experiment", "config")}
    return RunRecord(**values, experiment=row.experiment, config=run.config_json)


def _headline(result: RunResult) -> dict[str, Any]:
    """The run row's headline columns: overall test metrics, baselines, training summary."""
    overall = result.overall
    low, high = overall.ci.get("top1") or (None, None)
    best = [epoch.val_loss for epoch in result.epochs if epoch.epoch == result.best_epoch]
    return {
        "test_top1": overall.top1, "test_top5": overall.top5, "test_top10": overall.top10,
        "test_loss": overall.loss, "test_top1_low": low, "test_top1_high": high,
        "prior_top1": overall.prior_top1, "identity_top1": overall.identity_top1,
        "best_val_loss": best[0] if best else min((epoch.val_loss for epoch in result.epochs), default=None),
        "best_epoch": result.best_epoch, "n_test_problems": result.data.problems.get(TEST_SPLIT),
        "n_test_states": overall.n, "seconds": result.seconds,
    }


def _group_key(row: GroupMetrics, by: str) -> tuple[int | None, ...]:
    return tuple(getattr(row, key) for key in GROUP_KEYS[by])


def _group_rows(result: RunResult, by: str) -> list[dict[str, Any]]:
    """One results-table row per group of ``result`` (by layer, position or cell), baselines matched by key."""
    baselines = {
        name: {_group_key(row, by): row for row in getattr(baseline, f"by_{by}")}
        for name, baseline in result.baselines.items()
    }
    rows = []
    for group in getattr(result, f"by_{by}"):
        key = _group_key(group, by)
        values: dict[str, Any] = {"run_id": result.run_id, "split": TEST_SPLIT}
        values |= dict(zip(GROUP_KEYS[by], key, strict=True))
        values |= {"n": group.n, "problems": group.problems, "lift_prior": group.lift_prior,
                   "lift_identity": group.lift_identity}
        for metric in METRICS:
            values[metric] = getattr(group, metric)
            values[f"{metric}_low"], values[f"{metric}_high"] = group.ci.get(metric) or (None, None)
        for name in BASELINES:
            baseline = baselines.get(name, {}).get(key)
            for metric in METRICS:
                values[f"{name}_{metric}"] = None if baseline is None else getattr(baseline, metric)
        assert set(values) == {"run_id", "split", *GROUP_KEYS[by], *metric_column_names()}
        rows.append(values)
    return rows
