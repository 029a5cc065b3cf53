"""The problem record shared by sources, stores and alignment."""

from __future__ import annotations

from ctexp.records import FrozenRecord


class Problem(FrozenRecord):
    """One GSM8K-style question with its chain-of-thought steps and final answer.

    Attributes:
        id: Stable identifier, unique within a store or source.
        question: The question text.
        steps: CoT steps in GSM8K-Aug form, e.g. ``["4-1=3", "3*5=15"]``.
        answer: The final answer as written in the source.
        predicted: The model's decoded answer, where a model was run (real extraction).
        correct: Whether ``predicted`` matches ``answer``; None where unknown.
    """

    id: str
    question: str
    steps: list[str]
    answer: str
    predicted: str | None = None
    correct: bool | None = None

    @property
    def cot_text(self) -> str:
        """The CoT as the lens targets see it: steps joined with one space (the reference's form)."""
        return " ".join(self.steps)
