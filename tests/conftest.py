"""Shared fixtures: a CLI invoker that asserts the one-line error contract, and small worlds."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctexp.cli import app


def app_command(name: str):
    """The click command ``ctexp NAME``, through click's lookup (the app loads command modules on demand)."""
    import typer

    group = typer.main.get_command(app)
    return group.get_command(typer.Context(group), name)  # type: ignore[attr-defined]


# The PostgreSQL tests run wherever a server answers: CTEXP_TEST_POSTGRES_URL, else the local one (trust auth).
LOCAL_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
POSTGRES_URL = os.environ.get("CTEXP_TEST_POSTGRES_URL") or LOCAL_POSTGRES_URL
POSTGRES_PROBE_TIMEOUT_S = 3


@functools.cache
def postgres_unavailable() -> str | None:
    """Why the PostgreSQL tests cannot run (no server answers at ``POSTGRES_URL``), or None when one does."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    engine = create_engine(POSTGRES_URL, poolclass=NullPool, connect_args={"connect_timeout": POSTGRES_PROBE_TIMEOUT_S})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        reason = " ".join(str(error.orig or error).split())[:200] or type(error).__name__
        masked = make_url(POSTGRES_URL).render_as_string(hide_password=True)
        return (f"no PostgreSQL answers at {masked} ({reason}); start one, or set CTEXP_TEST_POSTGRES_URL "
                "to a PostgreSQL database URL")
    finally:
        engine.dispose()
    return None


needs_postgres = pytest.mark.skipif(postgres_unavailable() is not None, reason=postgres_unavailable() or "")

# A world small enough that a run takes about a second: for option coverage, not for science.
SMALL_WORLD = ["--world-problems", "120", "--world-layers", "2", "--world-hidden", "16", "--epochs", "2"]


def assert_one_line_error(result, exit_code: int, *fragments: str) -> str:
    """The CLI's error contract: one ``Error: `` line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_hf_dataset(directory: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as ``datasets``' ``Dataset.save_to_disk`` would: Arrow stream batches and ``state.json``."""
    pa = pytest.importorskip("pyarrow")
    directory.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with (
        pa.OSFile(str(directory / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        writer.write_table(table, max_chunksize=5)
    (directory / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": directory.name})
    )
    (directory / "dataset_info.json").write_text("{}")
    return directory


@functools.cache
def _template_home() -> Path:
    """A home whose results database and MLflow store already have their schemas.

    Creating MLflow's SQLite schema takes seconds of CPU; a test that needs a fresh home gets a copy
    of this one instead. (Schema creation itself is tested on truly fresh homes elsewhere.)
    """
    from ctexp.registry.db import Registry
    from ctexp.registry.tracking.tracker import Tracker

    home = Path(tempfile.mkdtemp(prefix="ctexp-template-home-"))
    Registry(f"sqlite:///{home}/ctexp.db").close()
    Tracker(f"sqlite:///{home}/mlflow.db").search("default")
    return home


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database through SQLite's backup API.

    Never copy a live database's files with plain reads: closing any descriptor of a file drops this
    process's POSIX locks on it, so a connection this process still holds (a pooled engine) loses its
    WAL lock; another process then resets the -shm file under it and every later connection of this
    process fails with "disk I/O error".
    """
    with contextlib.closing(sqlite3.connect(source)) as reader, contextlib.closing(sqlite3.connect(target)) as writer:
        reader.backup(writer)


def copy_home(source: Path, target: Path) -> Path:
    """A copy of a ctexp home: its databases through ``copy_database``, every other file as it is."""
    databases = ("*.db", "*.db-wal", "*.db-shm", "*.db-journal")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*databases))
    for database in source.rglob("*.db"):
        copy_database(database, target / database.relative_to(source))
    return target


def seed_home(home: Path) -> None:
    """Give an empty home the template's databases."""
    if (home / "ctexp.db").exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    for name in ("ctexp.db", "mlflow.db"):
        copy_database(_template_home() / name, home / name)


class Cli:
    """Runs ``ctexp`` in-process with a temporary home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.runner = CliRunner()
        seed_home(home)

    def __call__(self, *args: str, code: int = 0):
        result = self.runner.invoke(app, list(args), env={"CTEXP_HOME": str(self.home), "COLUMNS": "200"})
        if code != 0:
            assert_one_line_error(result, code)
        assert result.exit_code == code, (result.exit_code, result.output, result.exception)
        return result

    def json(self, *args: str) -> dict:
        return json.loads(self(*args, "--json").stdout)

    def run_dirs(self) -> list[Path]:
        runs = self.home / "runs"
        return sorted(runs.iterdir()) if runs.exists() else []


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "home")


@pytest.fixture(scope="session")
def science_cli(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """The home that ``default_runs`` records its runs in (for commands that read them back)."""
    return Cli(tmp_path_factory.mktemp("science-home"))


@pytest.fixture(scope="session")
def default_runs(science_cli: Cli) -> Callable[[str], dict]:
    """Full default-world runs by lens kind, computed once per session (they take ~10 s each)."""
    cache: dict[str, dict] = {}
    cli = science_cli

    def get(lens: str) -> dict:
        if lens not in cache:
            cache[lens] = cli.json("run", "--lens", lens)
        return cache[lens]

    return get


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL of a fresh, uniquely named PostgreSQL database, dropped (with its connections) after the test.

    Where the role may not create databases, a fresh schema (set as the connections' ``search_path``) in
    ``POSTGRES_URL``'s database stands in, dropped with everything in it after.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ProgrammingError

    name = f"ctexp_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        try:
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        except ProgrammingError:  # no CREATEDB privilege: a schema it is
            with admin.connect() as connection:
                connection.execute(text(f'CREATE SCHEMA "{name}"'))
            try:
                yield make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(
                    hide_password=False)
            finally:
                with admin.connect() as connection:
                    connection.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
            return
        try:
            yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                # Sweep workers or a leaked pool may still hold connections: end them, then drop.
                connection.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name AND pid <> "
                         "pg_backend_pid()"), {"name": name},
                )
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()
