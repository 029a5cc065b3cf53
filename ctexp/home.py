"""The ctexp home: where run directories, the results database and the MLflow store live by default."""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    """``$CTEXP_HOME`` or ``./mlruns`` (the design card's default local store)."""
    return Path(os.environ.get("CTEXP_HOME", "mlruns"))
