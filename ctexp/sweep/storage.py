"""Where a sweep's Optuna study lives, and the lock that every worker of the study shares.

A study lives in a journal file (the default, ``HOME/optuna.journal``), a SQLite database or a
PostgreSQL database; the RDB storages get Optuna's heartbeats, so that a trial whose worker died is
failed and retried. ``SweepLock`` serialises counting and asking for trials across processes and
machines, so that a sweep never runs more than its number of trials.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctexp.errors import ConfigError, RegistryError

if TYPE_CHECKING:
    import optuna

HEARTBEAT_S = 30  # Optuna's RDB heartbeat ...
GRACE_S = 120  # ... and how long a trial may miss it before it is failed and retried
MAX_RETRIES = 2  # a trial whose worker died is retried this often


def resolve_storage(storage: str | None, home: Path) -> str:
    """The Optuna storage: a journal file path (default ``HOME/optuna.journal``) or a database URL."""
    if not storage:
        return str((home / "optuna.journal").resolve())
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def storage_kind(storage: str) -> str:
    """``journal`` (a file path), ``sqlite`` or ``postgresql``.

    Raises:
        ConfigError: another kind of URL.
    """
    if "://" not in storage:
        return "journal"
    scheme = storage.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme in ("sqlite", "postgresql"):
        return scheme
    raise ConfigError(
        f"unsupported --storage {mask_storage(storage)!r}; use a journal file path (default HOME/optuna.journal), "
        "sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
    )


def mask_storage(storage: str) -> str:
    from ctexp.registry.engine import mask_url

    return mask_url(storage) if "://" in storage else storage


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    """An Optuna storage: JournalStorage on a file, or RDBStorage (with heartbeats and retries).

    Raises:
        RegistryError: the storage cannot be opened or reached.
    """
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    kind = storage_kind(storage)
    masked = mask_storage(storage)
    try:
        with quiet_optuna():
            if kind == "journal":
                path = Path(storage)
                path.parent.mkdir(parents=True, exist_ok=True)
                return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
            engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if kind == "postgresql":
                engine_kwargs["connect_args"] = {"connect_timeout": 5}
            return optuna.storages.RDBStorage(
                storage, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
            )
    except (SQLAlchemyError, OSError, ImportError, ValueError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RegistryError(f"cannot open the Optuna storage {masked}: {reason}; check --storage") from None


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's experimental-feature warnings off (heartbeats, constant liar, retry callback)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class SweepLock:
    """The lock every worker of a study takes to recover dead trials, count and ask (held briefly).

    A file lock (``flock``) beside a journal or SQLite storage; a PostgreSQL advisory lock otherwise.
    A process that dies releases it (the kernel drops its lock; PostgreSQL ends its session).
    """

    def __init__(self, storage: str, study_name: str) -> None:
        self._held = False
        self._handle: Any = None
        self._connection: Any = None
        self._engine: Any = None
        kind = storage_kind(storage)
        if kind == "postgresql":
            from sqlalchemy import create_engine
            from sqlalchemy.pool import NullPool

            digest = hashlib.sha256(f"ctexp-sweep:{study_name}".encode()).digest()
            self._key = int.from_bytes(digest[:8], "big", signed=True)
            self._engine = create_engine(storage, poolclass=NullPool, connect_args={"connect_timeout": 5})
            self._connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        else:
            path = Path(storage) if kind == "journal" else Path(storage.split("///", 1)[1].split("?", 1)[0])
            self._path = path.with_name(path.name + ".ctexp-lock")
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self._path.open("a")

    def acquire(self) -> None:
        if self._held:
            return
        if self._connection is not None:
            from sqlalchemy import text

            self._connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
        else:
            import fcntl

            fcntl.flock(self._handle, fcntl.LOCK_EX)
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._connection is not None:
            from sqlalchemy import text

            self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
        else:
            import fcntl

            fcntl.flock(self._handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def held(self) -> Iterator[SweepLock]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def close(self) -> None:
        self.release()
        if self._connection is not None:
            self._connection.close()
            self._engine.dispose()
        if self._handle is not None:
            self._handle.close()
