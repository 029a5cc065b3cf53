"""Benchmark of the terminal: how long a user waits for ``ctexp --help``, ``runs``, ``show``, ``best``,
``report --no-figures``, and how much a default ``ctexp run`` costs beyond its own work.

Builds a results database of 1,000 synthetic finished runs (rows inserted in bulk, as
``bench/registry.py`` does), then runs each command ``--repeats`` times (default 5) as a whole fresh
process, after one untimed warm-up, and reports its median wall time and its ratio to the median of
``python -c pass`` measured in the same run (the interpreter's own start-up, the floor). The
processes run with Python's default of caching bytecode (``PYTHONDONTWRITEBYTECODE`` is dropped from
their environment), as an installed ctexp does.

Then it runs a default ``ctexp run --json`` (the embedded world) twice in a fresh home: the first
creates both databases (MLflow's takes seconds), the second finds them. For each it reports the whole
command's wall time, the training and evaluation time the run reports itself (``seconds``), and their
ratio (goal <= 1.5). The load average is printed before and after: the machine's other work moves
every figure.

    python bench/cli_latency.py [--runs 1000] [--repeats 5] [--no-run]
    load_before=...
    setup_1000_runs_s=...
    python_pass_ms=...
    help_ms=... ratio=...
    ...
    run1_wall_s=... run1_reported_s=... run1_ratio=...  (fresh home)
    run2_wall_s=... run2_reported_s=... run2_ratio=...
    load_after=...
    pass_ms=... help_ms=... help_ratio=... runs_ms=... ... run1_ratio=... run2_ratio=...

The last line is the summary, as ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from registry import SMALL, synthetic_runs  # bench/registry.py, beside this file

from ctexp.config import build_config
from ctexp.registry.db import Registry

# The console script's own two lines, so the interpreter is the one running this bench.
CTEXP = [sys.executable, "-c", "from ctexp.cli import main; main()"]
COMMANDS = {
    "help": ["--help"],
    "runs": ["runs"],
    "show": ["show", "bench-0"],
    "best": ["best"],
    "report": ["report", "bench-0", "--no-figures", "--out", "{scratch}/report.md"],
}


def median_ms(command: list[str], env: dict[str, str], repeats: int) -> float:
    """Median wall milliseconds of ``command`` as a fresh process (which must succeed), after one warm-up."""
    subprocess.run(command, capture_output=True, env=env, check=True)  # the disk cache, not the command
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, env=env, check=True)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (``/proc/loadavg``), or ``?`` where there is none."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def default_run(home: Path, env: dict[str, str]) -> tuple[float, float]:
    """Whole-command wall seconds of a default ``ctexp run --json`` in ``home``, and the seconds it reports."""
    started = time.perf_counter()
    done = subprocess.run([*CTEXP, "run", "--json", "--home", str(home)], capture_output=True, env=env, check=True)
    wall = time.perf_counter() - started
    return wall, float(json.loads(done.stdout)["seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000, help="synthetic runs in the registry (default 1000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed processes per command (default 5)")
    parser.add_argument("--no-run", action="store_true", help="skip the two default ctexp run processes")
    args = parser.parse_args(argv)
    print(f"load_before={load_average().replace(' ', ',')}")

    with tempfile.TemporaryDirectory(prefix="ctexp-bench-cli-") as scratch:
        home = Path(scratch)
        url = f"sqlite:///{home / 'ctexp.db'}"
        started = time.perf_counter()
        Registry(url).close()  # the schema, by the migrations
        synthetic_runs(url, build_config(None, SMALL), args.runs)
        print(f"setup_{args.runs}_runs_s={time.perf_counter() - started:.1f}")
        env = {**os.environ, "CTEXP_HOME": str(home), "COLUMNS": "200"}
        env.pop("CTEXP_DB_URL", None)
        # As a user's install runs: bytecode cached (the warm-up writes it), not compiled from source each time.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        floor = median_ms([sys.executable, "-c", "pass"], env, args.repeats)
        print(f"python_pass_ms={floor:.1f}")
        summary = [f"pass_ms={floor:.1f}"]
        for name, command in COMMANDS.items():
            command = [part.format(scratch=scratch) for part in command]
            ms = median_ms([*CTEXP, *command], env, args.repeats)
            print(f"{name}_ms={ms:.1f} ratio={ms / floor:.1f}  (ctexp {' '.join(command)})")
            summary += [f"{name}_ms={ms:.1f}", f"{name}_ratio={ms / floor:.1f}"]
        if not args.no_run:
            fresh = home / "fresh-home"
            for index, note in ((1, "  (fresh home: both databases created)"), (2, "")):
                wall, reported = default_run(fresh, env)
                print(f"run{index}_wall_s={wall:.2f} run{index}_reported_s={reported:.2f} "
                      f"run{index}_ratio={wall / reported:.2f}{note}")
                summary += [f"run{index}_ratio={wall / reported:.2f}"]
    print(f"load_after={load_average().replace(' ', ',')}")
    print(" ".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
