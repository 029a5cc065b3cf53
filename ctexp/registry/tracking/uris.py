"""MLflow's locations and failures: tracking URIs, masked passwords, artifact paths, error messages.

Free of MLflow imports at module level (importing mlflow takes over a second); ``Tracker`` uses these.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import unquote, urlparse

from ctexp.errors import TrackingError

# user:password@ in any URI inside a message; the password part may hold anything but '@' and spaces.
_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@\s]*@")


def resolve_tracking_uri(uri: str | None, home: Path) -> str:
    """The tracking URI to use: the argument, else ``$MLFLOW_TRACKING_URI``, else ``HOME/mlflow.db``.

    Args:
        uri: ``--tracking-uri`` (None or empty when not given).
        home: the ctexp home; its SQLite database is the default store.

    Returns:
        A tracking URI, e.g. ``sqlite:////abs/home/mlflow.db``.
    """
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{home.resolve()}/mlflow.db"


def quiet_mlflow() -> None:
    """Keep MLflow off the network and off stdout, unless the user explicitly asked otherwise.

    MLflow 3 (a) posts a usage event for every created run and logged batch to mlflow-telemetry.io,
    and (b) writes "View run ... at: URL" lines to stdout whenever a run on a server ends, which
    would corrupt ``ctexp run --json``. ctexp must never phone home and owns its stdout. MLflow has
    no per-client switch for either: only environment variables, which it reads at every event and
    every ``set_terminated``, so setting them before the first run suffices even when ``mlflow`` is
    already imported. ``setdefault`` keeps a user's explicit ``...=false``.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow's default of 7 retries with backoff blocks a call for ~4 minutes when a server goes away
    # mid-run; a few short tries are enough to ride out a blip and still end the run promptly.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def mask_password(text: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host`` anywhere in ``text``."""
    return _CREDENTIALS.sub(r"\g<head>:***@", text)



def safe_artifact_path(artifact_path: str | None) -> str | None:
    """Check that an artifact folder stays inside the run's artifacts; return it normalised.

    Raises:
        TrackingError: an absolute path, a drive, a backslash or a ``..`` component.
    """
    if artifact_path is None:
        return None
    posix = PurePosixPath(artifact_path)
    if posix.is_absolute() or ".." in posix.parts or "\\" in artifact_path or PureWindowsPath(artifact_path).drive:
        raise TrackingError(
            f"artifact path {artifact_path!r} must be a relative folder inside the run (no '..', no leading '/')"
        )
    normalised = posix.as_posix()
    return None if normalised == "." else normalised


def file_uri_path(uri: str) -> Path:
    """The local path of a ``file:`` URI."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.netloc + parsed.path if parsed.netloc not in ("", "localhost") else parsed.path))


def check_writable(directory: Path, what: str) -> None:
    """``directory`` exists and is writable, or its nearest existing ancestor is (so it can be made)."""
    existing = directory.resolve()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TrackingError(f"cannot create the {what} directory {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrackingError(f"the {what} directory {existing} is not writable; check its permissions")



def remove_run_artifacts(artifacts: Path, mlflow_run_id: str) -> None:
    # Local layout: <experiment location>/<run id>/artifacts; remove the run's folder only when it
    # is named after the run, so that an odd artifact URI can never widen the deletion.
    target = artifacts.parent if artifacts.name == "artifacts" and artifacts.parent.name == mlflow_run_id else artifacts
    shutil.rmtree(target, ignore_errors=True)



def tracking_failures() -> tuple[type[BaseException], ...]:
    """The exception classes of MLflow, its HTTP client, its database and the disk (imported lazily)."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException
    from sqlalchemy.exc import SQLAlchemyError

    return (MlflowException, RequestException, SQLAlchemyError, OSError)


def failure_reason(error: BaseException, timeout: str = "timed out waiting for an answer") -> str:
    """Say why in a few words: a timeout, the root OS error of a failed connection, or the first line."""
    chain = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    # requests, urllib3 and socket each have their own timeout class; all of them say "Timeout".
    if any(isinstance(link, TimeoutError) or "Timeout" in type(link).__name__ for link in chain):
        return timeout
    root = chain[-1]
    if root is not error and isinstance(root, OSError) and root.strerror:
        return root.strerror.lower()  # "connection refused", "name or service not known"
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
