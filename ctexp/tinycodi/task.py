"""Generated multi-step problems whose CoT steps ``ctexp align`` reads (``2*3=6``, GSM8K-Aug's form).

``mod10r``: a chain of operations mod 10 that only uses bijections (``+a``, ``-a``, ``*3``, ``*7``,
``*9``), so no step can be skipped or guessed from a later one. The question lists the operations
last-applied first and then the start value (``-7 -8 -2 *3 2``: start at 2, times 3, minus 2, minus 8,
minus 7), so that the first thing the model must compute is at the end of the question and the
answer cannot be read off the question's left end. The CoT steps are the intermediate values as
equations (``2*3=6 6-2=4 4-8=6 6-7=9``, arithmetic mod 10) and the answer is the last value.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ctexp.records import FrozenRecord

MODULUS = 10
OPERATIONS: tuple[str, ...] = (
    *(f"+{a}" for a in range(1, MODULUS)),
    *(f"-{a}" for a in range(1, MODULUS)),
    "*3", "*7", "*9",  # the units of Z/10 other than 1: multiplication by them is a bijection
)


class TaskProblem(FrozenRecord):
    """One generated problem: the question text, its CoT steps and the answer."""

    question: str
    steps: list[str]
    answer: str

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    def aug_record(self) -> dict[str, str]:
        """The GSM8K-Aug JSONL object (``question``, ``cot``, ``answer``) that ``aug:PATH`` reads."""
        return {"question": self.question, "cot": " ".join(f"<<{s}>>" for s in self.steps), "answer": self.answer}


def apply(value: int, operation: str) -> int:
    """One step mod 10: ``apply(6, "-8") == 8``."""
    operand = int(operation[1:])
    if operation[0] == "+":
        return (value + operand) % MODULUS
    if operation[0] == "-":
        return (value - operand) % MODULUS
    return (value * operand) % MODULUS


def make_problem(start: int, operations: list[str]) -> TaskProblem:
    """The problem that starts at ``start`` and applies ``operations`` in order."""
    steps, value = [], start
    for operation in operations:
        after = apply(value, operation)
        steps.append(f"{value}{operation}={after}")
        value = after
    return TaskProblem(question=" ".join([*reversed(operations), str(start)]), steps=steps, answer=str(value))


def sample_problem(rng: random.Random, n_steps: int) -> TaskProblem:
    """A uniformly drawn problem of ``n_steps`` operations."""
    return make_problem(rng.randrange(MODULUS), [rng.choice(OPERATIONS) for _ in range(n_steps)])


def held_out(rng: random.Random, lengths: range, per_length: int, exclude: set[str]) -> list[TaskProblem]:
    """``per_length`` distinct problems of each length whose questions are not in ``exclude`` (which grows)."""
    found: list[TaskProblem] = []
    for n_steps in lengths:
        drawn = 0
        while drawn < per_length:
            problem = sample_problem(rng, n_steps)
            if problem.question not in exclude:
                exclude.add(problem.question)
                found.append(problem)
                drawn += 1
    return found


def write_aug(problems: list[TaskProblem], path: Path) -> None:
    """Write problems as GSM8K-Aug JSONL (``ctexp align --source aug:PATH``, ``ctexp extract --data aug:PATH``)."""
    path.write_text("".join(json.dumps(p.aug_record()) + "\n" for p in problems), encoding="utf-8")


def read_aug(path: Path) -> list[TaskProblem]:
    """Read problems written by ``write_aug`` back."""
    problems = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        steps = [s.strip() for s in record["cot"].replace("<<", "").split(">>") if s.strip()]
        problems.append(TaskProblem(question=record["question"], steps=steps, answer=record["answer"]))
    return problems
