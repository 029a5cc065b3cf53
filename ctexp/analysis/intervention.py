"""What an intervention did to the answers: typed records and the paired statistics against the control.

Each row (one position, or ``"all"`` positions at once, and one mode) is compared with the control
(CODI unmodified) on the same problems: a problem enters a row where the mode had something to put
at each of the row's positions (``target`` and ``decoded`` lack a token where a CoT slice is empty).

* ``accuracy``: the share of the row's answers that are correct; ``control_accuracy`` the control's on
  the same problems; ``delta = accuracy - control_accuracy``.
* ``changed``: the share of problems whose answer differs from the control's (the parsed number, or
  the stripped text where the answer gives none), right or wrong.
* ``ci``: a paired bootstrap interval of ``delta`` at level ``1 - alpha``: problems are resampled
  with replacement, each carrying its control and intervened answer together, ``resamples`` times,
  from a generator seeded by the command's seed and the row's index (so a row's interval does not
  depend on which other rows the command has).
* ``p_value``: exact two-sided McNemar test on the discordant problems (``lost``: right in the
  control and wrong here; ``gained``: the reverse). Problems are independent (each is its own
  question), so the test's assumption holds here.
* ``p_holm``: Holm's step-down adjustment across all rows of the command; ``significant``:
  ``p_holm <= alpha`` and the interval excludes 0.

What it cannot show: a drop in accuracy says the replaced thought carried something the answer
needed (or that the replacement pushed the model off its distribution: compare with ``mean``,
``zero`` and ``noise`` rows); no drop does not say the thought is unused, since later thoughts and
the attention cache may carry the same information.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from ctexp.analysis.statistics import holm, mcnemar_p
from ctexp.records import Record

ALPHA = 0.05
RESAMPLES = 2000


class ProblemAnswer(Record):
    """One problem's decoded answer, parsed as ``ctexp extract`` parses it."""

    problem_id: str
    text: str
    parsed: str | None  # the number the answer gives, None if it gives none
    correct: bool

    @property
    def key(self) -> str:
        """What "the answer changed" compares: the number, else the stripped text."""
        return self.parsed if self.parsed is not None else self.text.strip()


class ControlSummary(Record):
    """CODI unmodified on the command's problems."""

    accuracy: float
    n: int
    answers: list[ProblemAnswer]


class InterventionRow(Record):
    """One (position, mode) replacement compared with the control on the same problems."""

    position: int | Literal["all"]
    mode: str
    site: str
    layer: int | None
    n: int
    accuracy: float | None
    control_accuracy: float | None
    delta: float | None
    ci: tuple[float, float] | None
    changed: float | None
    lost: int
    gained: int
    p_value: float
    p_holm: float | None = None
    significant: bool = False
    answers: list[ProblemAnswer]


class InterventionResult(Record):
    """Everything ``ctexp intervene`` computed."""

    run_id: str
    lens_run: str
    config: dict[str, Any]
    control: ControlSummary
    rows: list[InterventionRow]

    def to_json(self, answers: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; the per-problem answers of the control and every row only where asked."""
        drop: Any = None if answers else {"control": {"answers"}, "rows": {"__all__": {"answers"}}}
        return self.model_dump(mode="json", exclude=drop)


def summarize_control(answers: Sequence[ProblemAnswer]) -> ControlSummary:
    """The control's accuracy over its problems."""
    correct = [answer.correct for answer in answers]
    return ControlSummary(accuracy=float(np.mean(correct)) if correct else 0.0, n=len(correct), answers=list(answers))


def paired_row(
    control: Sequence[ProblemAnswer],
    treated: Sequence[ProblemAnswer],
    *,
    position: int | Literal["all"],
    mode: str,
    site: str,
    layer: int | None,
    seed: Sequence[int],
    resamples: int = RESAMPLES,
    alpha: float = ALPHA,
) -> InterventionRow:
    """Compare a row's answers with the control's, problem by problem (both in the same order).

    Args:
        control: The control's answers on the row's problems.
        treated: The row's answers on the same problems.
        position, mode, site, layer: What the row replaced.
        seed: Entropy for the bootstrap's generator (the command's seed and the row's index).
        resamples: Bootstrap resamples.
        alpha: The interval's level is ``1 - alpha``.

    Returns:
        The row, without ``p_holm`` and ``significant`` (see ``adjust``).
    """
    if [a.problem_id for a in control] != [b.problem_id for b in treated]:
        raise ValueError("a row and the control must hold the same problems in the same order")
    before = np.array([answer.correct for answer in control], dtype=bool)
    after = np.array([answer.correct for answer in treated], dtype=bool)
    lost, gained = int((before & ~after).sum()), int((~before & after).sum())
    row: dict[str, Any] = {
        "position": position, "mode": mode, "site": site, "layer": layer, "n": len(before), "lost": lost,
        "gained": gained, "p_value": mcnemar_p(lost, gained), "answers": list(treated),
    }
    if len(before) == 0:
        return InterventionRow(
            **row, accuracy=None, control_accuracy=None, delta=None, ci=None, changed=None,
        )
    changed = np.mean([a.key != b.key for a, b in zip(control, treated, strict=True)])
    return InterventionRow(
        **row,
        accuracy=float(after.mean()),
        control_accuracy=float(before.mean()),
        delta=float(after.mean() - before.mean()),
        ci=paired_bootstrap(before, after, np.random.default_rng(list(seed)), resamples, alpha),
        changed=float(changed),
    )


def paired_bootstrap(
    before: np.ndarray, after: np.ndarray, rng: np.random.Generator, resamples: int, alpha: float
) -> tuple[float, float]:
    """Percentile interval of ``mean(after) - mean(before)``, resampling problems (pairs) with replacement."""
    differences = after.astype(np.float64) - before.astype(np.float64)  # (n,)
    n = len(differences)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)  # (R, n): times each problem is drawn
    deltas = weights @ differences / n  # (R,)
    low, high = np.percentile(deltas, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def adjust(rows: list[InterventionRow], alpha: float = ALPHA) -> list[InterventionRow]:
    """Holm across all rows of the command, and the significance verdict of each."""
    adjusted = holm([row.p_value for row in rows])
    return [
        row.model_copy(update={"p_holm": p, "significant": p is not None and p <= alpha and _excludes_zero(row.ci)})
        for row, p in zip(rows, adjusted, strict=True)
    ]


def _excludes_zero(ci: tuple[float, float] | None) -> bool:
    return ci is not None and (ci[0] > 0 or ci[1] < 0)
