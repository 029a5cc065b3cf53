"""``ctexp codi train`` as one call: held-out problems, both models trained, the checkpoint written."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctexp.tinycodi.checkpoint import SPLITS, check_out, write_checkpoint
from ctexp.tinycodi.pair import train_pair
from ctexp.tinycodi.settings import TinyCodiSettings
from ctexp.tinycodi.task import TaskProblem, held_out
from ctexp.tinycodi.train import Progress, Trained

HELD_OUT_SEED = 1_000_003  # held-out problems depend on the seed, but not on the training stream


@dataclass(frozen=True)
class TrainingResult:
    out: Path
    settings: TinyCodiSettings
    latent: Trained
    direct: Trained
    held: dict[str, list[TaskProblem]]


def held_out_problems(settings: TinyCodiSettings) -> dict[str, list[TaskProblem]]:
    """Validation and test problems of every length, distinct from each other."""
    rng, taken = random.Random(HELD_OUT_SEED + settings.seed), set[str]()
    sizes = {"validation": settings.validation, "test": settings.test}
    return {split: held_out(rng, settings.lengths, sizes[split], taken, settings.task) for split in SPLITS}


def train_tinycodi(
    settings: TinyCodiSettings, out: Path, force: bool = False, progress: Callable[[Progress], None] | None = None,
    parallel_threads: int | None = None,
) -> TrainingResult:
    """Train the latent student and the direct model and write them to ``out`` (CODI's layout).

    ``parallel_threads``: train the direct model at the same time in a second process on this many
    threads (``train_pair``); the models are the same either way, for the same thread count.

    Raises:
        ConfigError: ``out`` exists without ``force``, or its parent does not (``TinyCodiSettings``
            already refused step ranges too small for the held-out splits).
        TrainingDiverged: A loss went non-finite.
    """
    check_out(out, force)
    held = held_out_problems(settings)
    questions = {p.question for split in held.values() for p in split}
    latent, direct = train_pair(settings, questions, progress, parallel_threads)
    write_checkpoint(out, settings, latent, direct, held, force)
    return TrainingResult(out, settings, latent, direct, held)
