"""ctexp leaves nothing behind: its child processes go down with it, and third-party log lines stay off
the terminal unless ``--debug``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ctexp.processes import descendants

SMALL = ["--world-problems", "60", "--world-layers", "2", "--world-hidden", "8", "--epochs", "1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ui_takes_its_server_down_with_it(tmp_path: Path, signum: int) -> None:
    port = _free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "ctexp.cli", "ui", "--port", str(port), "--home", str(tmp_path / "home")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # up once the server answers over HTTP
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert ui.poll() is None, ui.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        else:
            pytest.fail("the MLflow UI did not answer within 90 s")
        tree = descendants(ui.pid)
        assert tree, "the server runs as a child of ctexp ui"
        ui.send_signal(signum)  # to ctexp alone, as a terminal's hangup or a service manager would
        code = ui.wait(timeout=60)
        assert code == (0 if signum == signal.SIGINT else 128 + signum)
        assert "Traceback" not in ui.stderr.read().decode()
        survivors = {pid for pid in tree if _alive(pid)}
        assert survivors == set(), f"orphaned server processes: {survivors}"
    finally:
        for pid in tree | ({ui.pid} if ui.poll() is None else set()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _first_run(home: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctexp.cli", *flags, "run", *SMALL, "--home", str(home)],
        capture_output=True, text=True, timeout=300, check=False,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"},
    )


def test_a_first_run_prints_only_ctexps_own_output(tmp_path: Path) -> None:
    quiet = _first_run(tmp_path / "fresh")
    assert quiet.returncode == 0, quiet.stderr
    lines = (quiet.stdout + quiet.stderr).splitlines()
    noise = [line for line in lines if " INFO " in line or "mlflow" in line.lower() and "ctexp" not in line
             or "alembic" in line.lower()]
    assert noise == []
    assert [line.split()[0] for line in quiet.stderr.splitlines()] == ["training"]  # the progress bar alone
    assert "Training progress (validation)" in quiet.stdout
    # The same first run with --debug shows MLflow's own lines: the check above can fail.
    loud = _first_run(tmp_path / "fresh-debug", "--debug")
    assert loud.returncode == 0, loud.stderr
    assert "Creating initial MLflow database tables" in loud.stderr
