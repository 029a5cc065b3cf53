"""Benchmark of the terminal: how long a user waits for ``ctexp --help``, ``runs``, ``show`` and ``best``.

Builds a results database of 1,000 synthetic finished runs (rows inserted in bulk, as
``bench/registry.py`` does), then runs each command ``--repeats`` times (default 5) as a whole fresh
process, after one untimed warm-up, and reports its median wall time and its ratio to the median of
``python -c pass`` measured in the same run (the interpreter's own start-up, the floor).

    python bench/cli_latency.py [--runs 1000] [--repeats 5]
    setup_1000_runs_s=...
    python_pass_ms=...
    help_ms=... ratio=...
    ...
    pass_ms=... help_ms=... help_ratio=... runs_ms=... runs_ratio=... show_ms=... show_ratio=... best_ms=... best_ratio=...

The last line is the summary, as ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000, help="synthetic runs in the registry (default 1000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed processes per command (default 5)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ctexp-bench-cli-") as scratch:
        home = Path(scratch)
        url = f"sqlite:///{home / 'ctexp.db'}"
        started = time.perf_counter()
        Registry(url).close()  # the schema, by the migrations
        synthetic_runs(url, build_config(None, SMALL), args.runs)
        print(f"setup_{args.runs}_runs_s={time.perf_counter() - started:.1f}")
        env = {**os.environ, "CTEXP_HOME": str(home), "COLUMNS": "200"}
        env.pop("CTEXP_DB_URL", None)
        floor = median_ms([sys.executable, "-c", "pass"], env, args.repeats)
        print(f"python_pass_ms={floor:.1f}")
        summary = [f"pass_ms={floor:.1f}"]
        for name, command in COMMANDS.items():
            ms = median_ms([*CTEXP, *command], env, args.repeats)
            print(f"{name}_ms={ms:.1f} ratio={ms / floor:.1f}  (ctexp {' '.join(command)})")
            summary += [f"{name}_ms={ms:.1f}", f"{name}_ratio={ms / floor:.1f}"]
    print(" ".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
