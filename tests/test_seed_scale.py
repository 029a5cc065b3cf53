"""``bench/seed_scale.py --small``: the whole study as commands, with a line per phase (no timing is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_small_seed_scale_reports_every_phase(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "seed_scale.py"), "--small", "--device", "cpu", "--problems", "40",
         "--work", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    phases = {tuple(re.split(r"\s{2,}", line.strip())[:2]) for line in lines if line.endswith(" s")}
    for name in ("imports", "model load and LoRA merge", "extraction", "whole command"):
        assert ("extract", name) in phases, name
    for name in ("imports", "store load", "MLflow setup", "training", "evaluation", "results recording", "figures",
                 "whole command"):
        assert ("run", name) in phases, name
    last = dict(item.split("=") for item in lines[-1].split())
    assert set(last) == {"seed_scale_seconds", "extract_seconds", "run_seconds", "training_seconds"}
    both = float(last["extract_seconds"]) + float(last["run_seconds"])
    assert abs(float(last["seed_scale_seconds"]) - both) < 0.02
    assert (tmp_path / "store" / "meta.json").exists()
