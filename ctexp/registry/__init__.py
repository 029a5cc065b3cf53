"""The SQL results registry: every run's provenance, status, epochs and results, queryable across runs.

``Registry`` (in ``db``) is the one entry point; ``models`` holds the tables that Alembic migrates.
"""

from __future__ import annotations
