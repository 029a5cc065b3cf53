"""The results database's URLs, engines and migrations: everything before a transaction.

The URL is SQLite by default (``HOME/ctexp.db``, no server) or PostgreSQL for sweeps spread over
machines; the same engine settings serve both. Alembic's environment lives in ``migrations/``
(``migrations_dir``); ``database.Database`` runs it under the helpers here.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from ctexp.errors import RegistryError
from ctexp.locking import file_lock

SQLITE_BUSY_TIMEOUT_S = 30
POSTGRES_CONNECT_TIMEOUT_S = 5
WRITE_OPTION = "ctexp_write"  # execution option: the transaction will write (SQLite: BEGIN IMMEDIATE)


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
            f"cannot use the results database at {masked}: {one_line(error)}; install its driver "
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
    enable_wal(cursor)  # readers and one writer at a time, without blocking
    cursor.close()


def enable_wal(cursor: Any, timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> None:
    """Put the SQLite database of ``cursor`` in WAL mode, retrying while other connections hold it.

    WAL is kept in the file, so only the first connections to a new database change it. Changing it
    needs the database to itself, and when several connections try at once SQLite answers "database
    is locked" at once, busy timeout or not (it will not wait where waiting could deadlock): eight
    processes meeting a new database at once failed so in 47 of 1,600 connections here. So this reads
    the mode first, and retries the change with a growing pause for up to ``timeout_s``.
    """
    deadline, pause = time.monotonic() + timeout_s, 0.005
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL").fetchone()  # an in-memory database stays "memory"
            return
        except sqlite3.OperationalError as error:
            if ("locked" not in str(error) and "busy" not in str(error)) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(0.25, 2 * pause)


def _sqlite_on_begin(connection: Connection) -> None:
    # A writer takes the write lock up front: a deferred transaction that reads and then writes fails at
    # once ("database is locked", busy timeout or not) when another process wrote in between.
    immediate = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def sqlite_path(url: str) -> Path | None:
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


def one_line(error: BaseException) -> str:
    """The first line of an error's message: drivers add hints and SQL on later lines."""
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def migrations_dir() -> Path:
    """Where the Alembic environment lives: ``ctexp/migrations`` in a wheel, else ``migrations/`` of the checkout.

    The repository keeps ``migrations/`` at its root and the wheel ships it as ``ctexp.migrations``
    (see setup.py). Both are found from this module's own file (``ctexp/registry/engine.py``) rather than
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


@contextlib.contextmanager
def schema_file_lock(path: Path, masked_url: str) -> Iterator[None]:
    """An exclusive lock on ``path`` for this process (released on exit, or when the process dies)."""
    try:
        with file_lock(path):
            yield
    except OSError as error:
        raise RegistryError(f"cannot create the schema lock {path} of {masked_url}: {error.strerror}") from None


@contextlib.contextmanager
def sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
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
