"""The results database: ``Registry``, the one entry point to its reads and writes.

One ``Registry`` per process (or per command) wraps one engine. Its parts live by concern:
``engine`` (URLs, engines, migrations), ``database`` (schema revision and transactions), ``runs`` (a
run's writes), ``queries`` (reads and ``best``), ``sweeps``; ``records`` holds what reads return and
``models`` the tables that Alembic migrates.
"""

from __future__ import annotations

from ctexp.registry.queries import RunQueries
from ctexp.registry.runs import RunWrites
from ctexp.registry.sweeps import SweepStore


class Registry(RunWrites, RunQueries, SweepStore):
    """Reads and writes ctexp's results database.

    Args:
        url: a SQLAlchemy URL (see ``engine.resolve_db_url``).
        upgrade: bring a database whose schema is behind this ctexp up to date (under a lock);
            when False, such a database is an error that names ``ctexp db upgrade``.
        check_schema: check the schema revision at all; False is for ``ctexp db`` commands that report
            or change the revision themselves.

    Raises:
        RegistryError: the database cannot be reached, is of a newer schema than this ctexp, or is
            behind while ``upgrade`` is False.
    """
