"""Generated multi-step problems whose CoT steps ``ctexp align`` reads (``2*3=6``, GSM8K-Aug's form).

Each task is one sampler (``SAMPLERS``) and one count of its distinct questions (``QUESTION_COUNTS``); a
new task is a function from (rng, number of steps) to a problem, a function from the number of steps
to how many questions it can draw, and a member of ``Task``.

``mod10r``: a chain of operations mod 10 that only uses bijections (``+a``, ``-a``, ``*3``, ``*7``,
``*9``), so no step can be skipped or guessed from a later one. The question lists the operations
last-applied first and then the start value (``-7 -8 -2 *3 2``: start at 2, times 3, minus 2, minus 8,
minus 7), so that the first thing the model must compute is at the end of the question and the
answer cannot be read off the question's left end. The CoT steps are the intermediate values as
equations (``2*3=6 6-2=4 4-8=6 6-7=9``, arithmetic mod 10) and the answer is the last value.

``mod10v``: the same chains written so that latents can stand one for one for CoT tokens: the start
value and then the operations in the order they apply, without spaces (``2*3-2-8-7``: left to right, mod
10), and CoT steps that are the values alone (``6 4 6 9``). Every step reads its operation at the same
distance back from the token that computes it (for a given number of steps), and each step is two CoT
tokens, its value and a space: two latents a step.

``hops``: pointer chasing along a chain of ``CHAIN`` distinct digits stated as shuffled facts (``5=2``:
5 points to 2). The question lists the facts, then a start node; each CoT step is one hop (``3=7``)
and the answer is the node ``k`` hops on. Each hop is a lookup by content (the fact whose left side is
the current node), the step a latent can take; the chain has no cycles and its start is drawn so that
``k`` hops stay on it, so the answer can be neither the start nor guessed from a cycle's length.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from ctexp.records import FrozenRecord


class Task(StrEnum):
    MOD10R = "mod10r"
    MOD10V = "mod10v"
    HOPS = "hops"


MODULUS = 10
OPERATIONS: tuple[str, ...] = (
    *(f"+{a}" for a in range(1, MODULUS)),
    *(f"-{a}" for a in range(1, MODULUS)),
    "*3", "*7", "*9",  # the units of Z/10 other than 1: multiplication by them is a bijection
)
CHAIN = 8  # nodes of a hops chain (of the 10 digits): 7 facts, at most 7 hops


class TaskProblem(FrozenRecord):
    """One generated problem: the question text, its CoT steps and the answer."""

    question: str
    steps: list[str]
    answer: str

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def results(self) -> list[str]:
        """The value each step computes: the text after its ``=`` (``2*3=6`` -> ``6``)."""
        return [step.rsplit("=", 1)[-1] for step in self.steps]

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


def sample_mod10r(rng: random.Random, n_steps: int) -> TaskProblem:
    """A uniformly drawn mod10r problem of ``n_steps`` operations."""
    return make_problem(rng.randrange(MODULUS), [rng.choice(OPERATIONS) for _ in range(n_steps)])


def sample_mod10v(rng: random.Random, n_steps: int) -> TaskProblem:
    """A uniformly drawn mod10v problem of ``n_steps`` operations: the values are its CoT steps."""
    start = rng.randrange(MODULUS)
    operations = [rng.choice(OPERATIONS) for _ in range(n_steps)]
    values = [str(value) for value in itertools.accumulate(operations, apply, initial=start)][1:]
    return TaskProblem(question=str(start) + "".join(operations), steps=values, answer=values[-1])


def sample_hops(rng: random.Random, n_steps: int) -> TaskProblem:
    """A hops problem: a random chain of ``CHAIN`` digits, its facts shuffled, a start ``n_steps`` before its end or earlier."""
    if not 1 <= n_steps < CHAIN:
        raise ValueError(f"a hops chain of {CHAIN} nodes allows 1 to {CHAIN - 1} steps, not {n_steps}")
    nodes = rng.sample(range(MODULUS), CHAIN)  # the chain nodes[0] -> nodes[1] -> ...
    facts = [f"{a}={b}" for a, b in itertools.pairwise(nodes)]
    rng.shuffle(facts)
    start = rng.randrange(CHAIN - n_steps)
    path = nodes[start:start + n_steps + 1]
    steps = [f"{a}={b}" for a, b in itertools.pairwise(path)]
    return TaskProblem(question=" ".join([*facts, str(path[0])]), steps=steps, answer=str(path[-1]))


SAMPLERS: dict[Task, Callable[[random.Random, int], TaskProblem]] = {
    Task.MOD10R: sample_mod10r, Task.MOD10V: sample_mod10v, Task.HOPS: sample_hops,
}


def mod10_questions(n_steps: int) -> int:
    """Distinct mod10r or mod10v questions of ``n_steps`` steps: a start value and an operation per step."""
    return MODULUS * len(OPERATIONS) ** n_steps


def hops_questions(n_steps: int) -> int:
    """Distinct hops questions of ``n_steps`` steps: a chain's nodes in order, its facts in any order, a start."""
    return math.perm(MODULUS, CHAIN) * math.factorial(CHAIN - 1) * (CHAIN - n_steps)


QUESTION_COUNTS: dict[Task, Callable[[int], int]] = {
    Task.MOD10R: mod10_questions, Task.MOD10V: mod10_questions, Task.HOPS: hops_questions,
}


def distinct_questions(task: Task, n_steps: int) -> int:
    """How many different questions of ``n_steps`` steps ``task`` can draw (held-out splits need enough)."""
    return QUESTION_COUNTS[task](n_steps)


def sample_problem(rng: random.Random, n_steps: int, task: Task = Task.MOD10R) -> TaskProblem:
    """A uniformly drawn problem of ``task`` with ``n_steps`` CoT steps."""
    return SAMPLERS[task](rng, n_steps)


def held_out(
    rng: random.Random, lengths: range, per_length: int, exclude: set[str], task: Task = Task.MOD10R,
) -> list[TaskProblem]:
    """``per_length`` distinct problems of each length whose questions are not in ``exclude`` (which grows)."""
    found: list[TaskProblem] = []
    for n_steps in lengths:
        drawn = 0
        while drawn < per_length:
            problem = sample_problem(rng, n_steps, task)
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
