"""Phase timings of a whole command, for benches: where ``ctexp run`` or ``ctexp extract`` spends its time.

With ``CTEXP_TIMINGS=FILE`` in the environment, each phase a command passes through (``phase(name)``)
appends one JSON line ``{"phase": name, "seconds": s, "pid": p}`` to FILE; ``read_timings`` sums them
by phase. Unset (the usual case), nothing is measured or written. ``bench/seed_scale.py`` sets it for
the commands it runs and prints one line per phase. The phases (``PHASES``): imports, model load and
LoRA merge, extraction, store load, MLflow setup, training, evaluation, results recording, figures.
A phase inside another (none is, today) would be counted twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

TIMINGS_ENV = "CTEXP_TIMINGS"
PHASES = (
    "imports", "model load and LoRA merge", "extraction", "store load", "MLflow setup", "training", "evaluation",
    "results recording", "figures",
)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as phase ``name`` where ``CTEXP_TIMINGS`` names a file (else do nothing)."""
    target = os.environ.get(TIMINGS_ENV)
    if not target:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        line = json.dumps({"phase": name, "seconds": round(time.perf_counter() - started, 6), "pid": os.getpid()})
        with Path(target).open("a", encoding="utf-8") as out:
            out.write(line + "\n")


def timed(name: str, function: Callable[P, R]) -> Callable[P, R]:
    """``function`` run as phase ``name`` (for a call that a ``with`` block would re-indent)."""

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with phase(name):
            return function(*args, **kwargs)

    return run


def read_timings(path: Path) -> dict[str, float]:
    """Seconds by phase, summed over the lines of ``path`` (in ``PHASES`` order, others after)."""
    totals: dict[str, float] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                totals[entry["phase"]] = totals.get(entry["phase"], 0.0) + float(entry["seconds"])
    order = {name: i for i, name in enumerate(PHASES)}
    return dict(sorted(totals.items(), key=lambda item: order.get(item[0], len(order))))
