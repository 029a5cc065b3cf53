"""Commands import only what they use: each ``ctexp`` command runs in a fresh process that prints, at exit,
which heavy libraries and which command modules it loaded. ``--help`` loads none of the libraries (nor
SQLAlchemy); a command loads its own command module alone; the commands that read the registry
(``runs``, ``show``, ``best``, ``compare``, ``report --no-figures``) load neither torch nor MLflow, and
``runs``, ``show`` and ``best`` not even numpy. Behaviour, not timing.

``report`` without ``--no-figures`` draws the run's figures (matplotlib) and logs the report to the run's
MLflow run, so MLflow is part of its work.
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
# Run the CLI as the console script does, and print the heavy top-level packages and the command modules
# loaded, as JSON on stderr's last line.
PROBE = (
    "import atexit, json, sys\n"
    f"heavy = {(*HEAVY, *SQL)!r}\n"
    "atexit.register(lambda: print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))"
    " + sorted(m for m in sys.modules if m.startswith('ctexp.cli.'))), file=sys.stderr))\n"
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
    """The heavy packages and command modules a ``ctexp ARGS`` process had loaded when it exited (which must
    succeed)."""
    env = {**os.environ, "CTEXP_HOME": str(home), "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("CTEXP_DB_URL", None)
    done = subprocess.run([sys.executable, "-c", PROBE, *args], check=False, capture_output=True, text=True, env=env,
                          cwd=home, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


def test_help_loads_no_heavy_library(home: Path) -> None:
    assert not loaded(home, "--help") & {*HEAVY, *SQL}


@pytest.mark.parametrize(("args", "light"), [
    (("runs",), HEAVY),
    (("show", "first"), HEAVY),
    (("best", "--by", "layer"), HEAVY),
    (("compare", "first", "second", "--resamples", "100"), ("torch", "transformers", "mlflow", "optuna")),
    (("report", "first", "--no-figures"), ("torch", "transformers", "mlflow", "optuna", "matplotlib")),
])
def test_registry_reads_load_neither_torch_nor_mlflow(home: Path, args: tuple[str, ...], light: tuple[str, ...]) -> None:
    heavy = loaded(home, *args)
    assert not heavy & set(light), heavy


@pytest.mark.parametrize(("args", "module"), [
    (("runs",), "ctexp.cli.registry"),
    (("best",), "ctexp.cli.registry"),
    (("sweeps",), "ctexp.cli.sweep"),
    (("run", "--dry-run"), "ctexp.cli.run"),
])
def test_a_command_loads_its_own_command_module_alone(home: Path, args: tuple[str, ...], module: str) -> None:
    """Shared helpers (``app``, ``options``, ``render``) aside, no other command's module is imported."""
    commands = {name for name in loaded(home, *args) if name.startswith("ctexp.cli.")} - {
        "ctexp.cli.app", "ctexp.cli.options", "ctexp.cli.render"}
    assert commands == {module}


def test_the_probe_sees_heavy_libraries(home: Path) -> None:
    """The check can fail: ``report`` draws figures and logs to MLflow, and the probe reports both."""
    assert {"matplotlib", "mlflow"} <= loaded(home, "report", "first", "--out", str(home / "report.md"))
