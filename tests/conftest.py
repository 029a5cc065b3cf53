"""Shared fixtures: a CLI invoker that asserts the one-line error contract, and small worlds."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctexp.cli import app

# A world small enough that a run takes about a second: for option coverage, not for science.
SMALL_WORLD = ["--world-problems", "120", "--world-layers", "2", "--world-hidden", "16", "--epochs", "2"]


def assert_one_line_error(result, exit_code: int, *fragments: str) -> str:
    """The CLI's error contract: one ``Error: `` line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


class Cli:
    """Runs ``ctexp`` in-process with a temporary home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int = 0):
        result = self.runner.invoke(app, list(args), env={"CTEXP_HOME": str(self.home), "COLUMNS": "200"})
        if code != 0:
            assert_one_line_error(result, code)
        assert result.exit_code == code, (result.exit_code, result.output, result.exception)
        return result

    def json(self, *args: str) -> dict:
        return json.loads(self(*args, "--json").stdout)

    def run_dirs(self) -> list[Path]:
        runs = self.home / "runs"
        return sorted(runs.iterdir()) if runs.exists() else []


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "home")


@pytest.fixture(scope="session")
def default_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict]:
    """Full default-world runs by lens kind, computed once per session (they take ~10 s each)."""
    cache: dict[str, dict] = {}
    cli = Cli(tmp_path_factory.mktemp("science-home"))

    def get(lens: str) -> dict:
        if lens not in cache:
            cache[lens] = cli.json("run", "--lens", lens)
        return cache[lens]

    return get
