"""``ctexp codi eval``: answer accuracy on a checkpoint's held-out problems, by number of CoT steps.

Three readers of the same problems, each with a 95% Wilson interval:

* ``latent``: the student with its T latent steps (CODI's loop as ``ctexp extract`` runs it);
* ``direct``: the 0-latent model of the same size and budget (``DIR/direct``), answering at once;
* ``teacher``: the student's weights with explicit CoT (no latents: it writes the steps, then the answer).

Both models are loaded from the checkpoint files, exactly as ``ctexp extract`` loads them.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from ctexp.analysis.statistics import wilson
from ctexp.errors import ModelError
from ctexp.model.answers import answers_match, parse_answer
from ctexp.model.checkpoint import resolve_files
from ctexp.model.codi import CodiModel, load_codi, load_hf_tokenizer
from ctexp.records import FrozenRecord
from ctexp.tinycodi.checkpoint import DATA, DIRECT, read_summary
from ctexp.tinycodi.settings import TinyCodiSettings
from ctexp.tinycodi.task import TaskProblem, read_aug
from ctexp.tinycodi.vocab import TOKENS, question_ids

BATCH = 250
READERS = ("latent", "direct", "teacher")


class Accuracy(FrozenRecord):
    accuracy: float
    ci: tuple[float, float]
    correct: int


class StepsRow(FrozenRecord):
    """Accuracy of each reader on the problems of one length."""

    steps: int
    n: int
    latent: Accuracy
    direct: Accuracy
    teacher: Accuracy


class EvalReport(FrozenRecord):
    model: str
    split: str
    latents: int
    by_steps: list[StepsRow]


def load_model(directory: Path) -> CodiModel:
    """A checkpoint directory's model in float32 on the CPU, loaded as ``ctexp extract`` loads it."""
    files = resolve_files(directory)
    return load_codi(files, load_hf_tokenizer(files.tokenizer), torch.device("cpu"), torch.float32)


def correct_answers(model: CodiModel, problems: list[TaskProblem], latents: int, max_tokens: int) -> list[bool]:
    """Whether each problem's greedy answer after ``latents`` latent steps is right (the last number it writes)."""
    found: list[bool] = []
    for start in range(0, len(problems), BATCH):
        chunk = problems[start : start + BATCH]
        thoughts = model.think([question_ids(p.question) for p in chunk], latents, max_tokens)
        for problem, ids in zip(chunk, thoughts.answers, strict=True):
            text = "".join(TOKENS[i] for i in ids)
            found.append(answers_match(parse_answer(text), problem.answer))
    return found


def _accuracy(flags: list[bool]) -> Accuracy:
    low, high = wilson(sum(flags), len(flags)) or (0.0, 0.0)
    return Accuracy(accuracy=sum(flags) / len(flags), ci=(low, high), correct=sum(flags))


def evaluate(model: Path, split: str = "test", limit: int | None = None) -> EvalReport:
    """Accuracy by number of steps of the latent student, the direct model and the teacher.

    Args:
        model: A directory written by ``ctexp codi train``.
        split: ``test`` or ``validation``.
        limit: At most this many problems of each length (default: all).

    Raises:
        ModelError: The directory is not a complete tiny-CODI checkpoint.
    """
    settings = TinyCodiSettings.model_validate(read_summary(model)["settings"])
    path = model.expanduser() / DATA / f"{split}.jsonl"
    if not path.is_file():
        raise ModelError(f"{model} lacks {DATA}/{split}.jsonl; pass a directory written by ctexp codi train")
    by_length: dict[int, list[TaskProblem]] = defaultdict(list)
    for problem in read_aug(path):
        if limit is None or len(by_length[problem.n_steps]) < limit:
            by_length[problem.n_steps].append(problem)
    problems = [p for k in sorted(by_length) for p in by_length[k]]
    student, direct = load_model(model), load_model(model.expanduser() / DIRECT)
    cot_tokens = max(len(" ".join([*p.steps, p.answer])) for p in problems) + 2
    flags = {
        "latent": correct_answers(student, problems, settings.latents, 8),
        "direct": correct_answers(direct, problems, 0, 8),
        "teacher": correct_answers(student, problems, 0, cot_tokens),
    }
    rows, start = [], 0
    for steps in sorted(by_length):
        n = len(by_length[steps])
        row = {reader: _accuracy(flags[reader][start : start + n]) for reader in READERS}
        rows.append(StepsRow(steps=steps, n=n, **row))
        start += n
    return EvalReport(model=str(model), split=split, latents=settings.latents, by_steps=rows)
