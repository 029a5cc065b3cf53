"""Phase timings (``CTEXP_TIMINGS``): a whole ``ctexp run`` reports its phases; unset, nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctexp.timings import PHASES, TIMINGS_ENV, phase, read_timings
from tests.conftest import SMALL_WORLD


def test_a_run_reports_its_phases(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    timings = tmp_path / "timings.jsonl"
    monkeypatch.setenv(TIMINGS_ENV, str(timings))
    out = cli.json("run", *SMALL_WORLD)
    seconds = read_timings(timings)
    assert set(seconds) == {"imports", "store load", "MLflow setup", "training", "evaluation", "results recording",
                            "figures"}
    assert list(seconds) == [name for name in PHASES if name in seconds]  # in the phases' order
    assert all(value >= 0 for value in seconds.values())
    assert seconds["training"] <= out["seconds"]  # the run's own time includes its training


def test_nothing_is_written_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(TIMINGS_ENV, raising=False)
    with phase("training"):
        pass
    assert read_timings(tmp_path / "absent.jsonl") == {}
    target = tmp_path / "t.jsonl"
    monkeypatch.setenv(TIMINGS_ENV, str(target))
    for _ in range(2):
        with phase("training"):
            pass
    assert len(target.read_text().splitlines()) == 2 and set(read_timings(target)) == {"training"}
