"""Where a result came from: the code version that computed it."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

import ctexp


@cache
def code_version() -> str:
    """The git commit of the ctexp source (with ``+dirty`` when modified), else the package version."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", str(source)], cwd=source, capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"ctexp {ctexp.__version__}"
    return f"{commit}{'+dirty' if dirty else ''}" if commit else f"ctexp {ctexp.__version__}"
