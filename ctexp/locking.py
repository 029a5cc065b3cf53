"""An inter-process lock on a file, for one-time work that several processes may race to do
(creating a database schema on first use)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block.

    The kernel releases it if the process dies, so a crash never leaves it held.

    Raises:
        OSError: the lock file cannot be created.
    """
    import fcntl  # POSIX only; imported here so that importing ctexp works everywhere

    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
