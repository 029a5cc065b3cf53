"""CODI's decoded answers: the number an answer gives, and whether it is the problem's."""

from __future__ import annotations

import math
import re

from ctexp.data.problems import Problem

_ANSWER_MARK = "The answer is:"
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def parse_answer(text: str) -> str | None:
    """The number a decoded answer gives: the first after "The answer is:", else the last in the text.

    Args:
        text: The decoded answer, e.g. ``"The answer is: 1,200"``.

    Returns:
        The number as written (thousands commas dropped), or None where there is none.
    """
    _, mark, tail = text.partition(_ANSWER_MARK)
    numbers = _NUMBER_RE.findall((tail if mark else text).replace(",", ""))
    if not numbers:
        return None
    return numbers[0] if mark else numbers[-1]


def answers_match(predicted: str | None, answer: str) -> bool:
    """Whether a predicted answer equals the problem's, numerically where both are numbers."""
    if predicted is None:
        return False
    try:
        return math.isclose(float(predicted), float(answer.replace(",", "")), rel_tol=1e-9, abs_tol=1e-6)
    except ValueError:
        return predicted.strip() == answer.strip()


def answered(problem: Problem, text: str) -> Problem:
    """The problem with ``predicted`` (the parsed number, else the stripped text) and ``correct`` filled."""
    number = parse_answer(text)
    predicted = number if number is not None else text.strip()
    return problem.model_copy(update={"predicted": predicted, "correct": answers_match(number, problem.answer)})
