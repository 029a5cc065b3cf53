"""Where runs live: the home directory, the results database and the MLflow tracking store.

Kept free of heavy imports (torch, MLflow, Alembic load lazily) so that commands start fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ctexp.home import default_home

if TYPE_CHECKING:
    from ctexp.registry.db import Registry
    from ctexp.registry.tracking.tracker import Tracker

STALE_AFTER_SECONDS = 300.0  # a RUNNING run whose heartbeat is this old lost its process


@dataclass(frozen=True)
class Locations:
    home: Path
    db_url: str
    tracking_uri: str

    @classmethod
    def resolve(cls, home: Path | None = None, db_url: str | None = None, tracking_uri: str | None = None) -> Locations:
        """Flags win, then ``CTEXP_HOME`` / ``CTEXP_DB_URL`` / ``MLFLOW_TRACKING_URI``, then ``./mlruns``."""
        from ctexp.registry.engine import resolve_db_url
        from ctexp.registry.tracking.uris import resolve_tracking_uri

        home = (home or default_home()).resolve()
        return cls(home, resolve_db_url(db_url, home), resolve_tracking_uri(tracking_uri, home))

    def registry(self) -> Registry:
        """Open the results database (upgrading its schema if behind) and fail runs whose heartbeat stopped."""
        from ctexp.registry.db import Registry

        registry = Registry(self.db_url)
        registry.mark_stale_runs(STALE_AFTER_SECONDS)
        return registry

    def tracker(self) -> Tracker:
        from ctexp.registry.tracking.tracker import Tracker

        return Tracker(self.tracking_uri, self.home / "artifacts")
