"""Child processes that never outlive ctexp: a server started by ``ctexp ui`` goes down with it.

``mlflow server`` starts a web server and job workers of its own. Killing only the direct child on
SIGTERM, or dying by the default SIGTERM/SIGHUP action without killing anything, would leave those
running, orphaned. So the child starts a session of its own (one process group for the whole tree),
and SIGINT, SIGTERM and SIGHUP to ctexp take down that group and every descendant found in /proc
(in case one started a session of its own), politely first, then with SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_SECONDS = 10.0


class Stopped(Exception):
    """ctexp received ``signum`` while its child ran; the child's whole tree is gone."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_child(command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` until it exits, and return its exit code.

    Raises:
        Stopped: a stop signal arrived; the child and all its descendants have been ended.
        OSError: the command cannot be started.
    """
    process = subprocess.Popen(list(command), env=dict(env) if env is not None else None, start_new_session=True)
    try:
        with _signals_raise() as received:
            try:
                return process.wait()
            except _Signal:
                pass
        terminate_tree(process)
        raise Stopped(received[0])
    finally:
        if process.poll() is None:  # any other way out (an exception of ours): still no orphans
            terminate_tree(process)


def terminate_tree(process: subprocess.Popen, grace: float = GRACE_SECONDS) -> None:
    """End ``process``, its process group and every descendant: SIGTERM, then SIGKILL after ``grace``."""
    tree = descendants(process.pid)
    _signal_all(process.pid, tree, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        tree |= descendants(process.pid)
        if process.poll() is not None and not any(_alive(pid) for pid in tree):
            return
        time.sleep(0.05)
    _signal_all(process.pid, tree | descendants(process.pid), signal.SIGKILL)
    process.wait()


def descendants(pid: int) -> set[int]:
    """The pids of all live descendants of ``pid`` (Linux /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (field 2) may hold spaces and parentheses: parse after its last ')'.
            fields = entry.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


class _Signal(Exception):
    """Raised inside ``process.wait()`` by the handler, to stop waiting."""


@contextlib.contextmanager
def _signals_raise() -> Iterator[list[int]]:
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if not received:
            received.append(signum)
            raise _Signal

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _signal_all(leader: int, pids: set[int], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, signum)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent (gone with the tree) would reap it
