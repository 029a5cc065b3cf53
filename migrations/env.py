"""Alembic environment for ctexp's results database.

ctexp runs migrations itself and hands over its own connection (``config.attributes["connection"]``),
already holding the schema lock; the alembic CLI instead opens ``$CTEXP_DB_URL`` or ``sqlalchemy.url``
from alembic.ini. Either way only ``ctexp_`` tables are considered, and the version lives in
``ctexp_alembic_version``: the database may be shared with Optuna and MLflow, whose tables (and
``alembic_version``) must never be touched.
"""

from __future__ import annotations

import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from ctexp.registry.models import TABLE_PREFIX, VERSION_TABLE, Base

config = context.config


def include_name(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
    """Reflect only ctexp's tables (and whatever belongs to them) when autogenerating."""
    if type_ == "table":
        return name is not None and name.startswith(TABLE_PREFIX) and name != VERSION_TABLE
    return True


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Never propose to create, alter or drop another tool's table."""
    if type_ == "table":
        return name is not None and name.startswith(TABLE_PREFIX) and name != VERSION_TABLE
    return True


OPTIONS: dict[str, Any] = {
    "target_metadata": Base.metadata,
    "version_table": VERSION_TABLE,
    "include_name": include_name,
    "include_object": include_object,
    "render_as_batch": True,  # SQLite cannot ALTER most things: later revisions copy-and-move tables
    "compare_type": True,
}


def cli_url() -> str:
    url = os.environ.get("CTEXP_DB_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set CTEXP_DB_URL (or sqlalchemy.url in alembic.ini) to the results database URL")
    return url


def run_offline() -> None:
    """``alembic upgrade head --sql``: print the DDL instead of running it."""
    context.configure(url=cli_url(), literal_binds=True, dialect_opts={"paramstyle": "named"}, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # ctexp's own call: it commits and releases its lock afterwards
        run_on(connection)
        return
    from ctexp.registry.engine import make_engine  # the same engine settings as ctexp (SQLite pragmas)

    engine = make_engine(cli_url())
    try:
        with engine.connect() as connection:
            run_on(connection)
            connection.commit()
    finally:
        engine.dispose()


# Only the alembic CLI configures logging; ctexp's own calls leave the application's logging alone.
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name)

if context.is_offline_mode():
    run_offline()
else:
    run_online()
