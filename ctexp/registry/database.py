"""The results database's transactions and schema: one ``Database`` per process (or per command).

Alembic owns the schema: opening a database brings one that is behind up to date, under a lock so
that many workers starting together on a fresh database are safe. Every write is one transaction;
every driver error becomes a one-line ``RegistryError`` that names the database by its masked URL
(never its password).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Self, TypeVar

from sqlalchemy import func, inspect, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from ctexp.errors import RegistryError
from ctexp.registry.engine import (
    WRITE_OPTION,
    make_engine,
    mask_url,
    migrations_dir,
    one_line,
    schema_file_lock,
    sqlite_foreign_keys_off,
    sqlite_path,
)
from ctexp.registry.models import HEAD_REVISION, VERSION_TABLE, Run

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

T = TypeVar("T")

LOCKED_ATTEMPTS = 5  # a write that still finds SQLite locked after its busy timeout is retried this often
LOCKED_BACKOFF_S = 0.2
# Transaction-scoped PostgreSQL advisory lock that serialises schema upgrades ("ctexp" + 1).
SCHEMA_LOCK_KEY = 0x6374657870_01


class Database:
    """An open results database: its engine, its schema revision and its transactions.

    ``Registry`` adds the reads and writes (``runs``, ``queries``, ``sweeps``) on top.

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
        self._sqlite_path = sqlite_path(url)
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
        """The newest schema revision this ctexp knows (``models.HEAD_REVISION``, checked against Alembic's
        scripts by a test): a constant, so that opening an up-to-date database never reads the scripts."""
        return HEAD_REVISION

    def upgrade(self) -> None:
        """Bring the schema to this ctexp's head revision, one process at a time.

        Raises:
            RegistryError: the database is at a revision newer than this ctexp, or a migration fails.
        """
        with self._schema_lock() as connection:
            current = self._revision_of(connection)  # again: another process may have upgraded meanwhile
            self._check_known(current)
            if current != self.head_revision():
                from alembic import command  # Alembic only to migrate: the read path compares revisions itself

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
        from alembic.script import ScriptDirectory

        if self._script is None:
            self._script = ScriptDirectory.from_config(self._alembic_config())
        return self._script

    @staticmethod
    def _alembic_config(connection: Connection | None = None) -> Config:
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
        config.set_main_option("path_separator", "os")
        if connection is not None:
            config.attributes["connection"] = connection  # env.py migrates on it, inside our lock
        return config

    def _revision_of(self, connection: Connection) -> str | None:
        """The revision in ctexp's version table, read with one query rather than through Alembic (whose
        import alone costs a read-only command a tenth of a second); None when the table is absent or empty."""
        if not inspect(connection).has_table(VERSION_TABLE):
            return None
        revisions = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
        if len(revisions) > 1:  # ctexp's migrations are one line: several heads mean someone else's edits
            raise RegistryError(f"the results database at {self.masked_url} holds several schema revisions "
                                f"({', '.join(sorted(revisions))}) in {VERSION_TABLE}")
        return revisions[0] if revisions else None

    @contextlib.contextmanager
    def _schema_lock(self) -> Iterator[Connection]:
        """A connection on which this process alone may migrate the schema."""
        with contextlib.ExitStack() as stack:
            if self._sqlite_path is not None:
                stack.enter_context(schema_file_lock(Path(f"{self._sqlite_path}.lock"), self.masked_url))
            connection = stack.enter_context(self._connect(write=True))
            if self._engine.dialect.name == "sqlite":
                stack.enter_context(sqlite_foreign_keys_off(connection))
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
        reason = self._scrub(one_line(error))
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


class _DatabaseLocked(RegistryError):
    """SQLite stayed locked past its busy timeout: the write may be retried."""


def now() -> datetime:
    """The current time, UTC-aware (the database stores it naive, see ``models.UTCDateTime``)."""
    return datetime.now(UTC)


def require_run(session: Session, run_id: str) -> Run:
    """The run ``run_id``, or the error that says it is unknown."""
    run = session.get(Run, run_id)
    if run is None:
        raise unknown_run(run_id)
    return run


def unknown_run(run_id: str) -> RegistryError:
    """The error for a run id the database does not hold."""
    return RegistryError(f"run {run_id!r} is not in the results database; give the full id of a recorded run")
