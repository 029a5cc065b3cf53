"""Commands import only what they use: each ``ctexp`` command runs in a fresh process that prints, at exit,
which heavy libraries it loaded. ``--help`` loads none of them; the commands that read the registry
(``runs``, ``show``, ``best``, ``compare``) load neither torch nor MLflow. ``--help`` loads no SQLAlchemy either. Behaviour, not timing.

``report`` is not among them: it always draws the run's figures (matplotlib) and logs the report to the
run's MLflow run, so MLflow is part of its work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMALL_WORLD, Cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "mlflow", "optuna", "matplotlib", "pandas", "numpy")
SQL = ("sqlalchemy", "alembic")  # the registry commands need them to run, but listing the commands does not
# Run the CLI as the console script does, and print the heavy top-level packages loaded, as JSON on stderr's last line.
PROBE = (
    "import atexit, json, sys\n"
    f"heavy = {(*HEAVY, *SQL)!r}\n"
    "atexit.register(lambda: print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))),"
    " file=sys.stderr))\n"
    "from ctexp.cli import main\n"
    "sys.argv = ['ctexp', *sys.argv[1:]]\n"
    "main()\n"
)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with two finished lens runs."""
    home = tmp_path_factory.mktemp("imports-home")
    cli = Cli(home)
    cli("run", *SMALL_WORLD, "--lens", "layer", "--name", "first")
    cli("run", *SMALL_WORLD, "--lens", "layer-position", "--name", "second")
    return home


def loaded(home: Path, *args: str) -> set[str]:
    """The heavy packages a ``ctexp ARGS`` process had loaded when it exited (which must succeed)."""
    env = {**os.environ, "CTEXP_HOME": str(home), "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("CTEXP_DB_URL", None)
    done = subprocess.run([sys.executable, "-c", PROBE, *args], check=False, capture_output=True, text=True, env=env,
                          cwd=home, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


def test_help_loads_no_heavy_library(home: Path) -> None:
    assert loaded(home, "--help") == set()


@pytest.mark.parametrize("args", [
    ("runs",),
    ("show", "first"),
    ("best", "--by", "layer"),
    ("compare", "first", "second", "--resamples", "100"),
])
def test_registry_reads_load_neither_torch_nor_mlflow(home: Path, args: tuple[str, ...]) -> None:
    heavy = loaded(home, *args)
    assert not heavy & {"torch", "transformers", "mlflow", "optuna"}, heavy


def test_the_probe_sees_heavy_libraries(home: Path) -> None:
    """The check can fail: ``report`` draws figures and logs to MLflow, and the probe reports both."""
    assert {"matplotlib", "mlflow"} <= loaded(home, "report", "first", "--out", str(home / "report.md"))
