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

Two interventions compare row by row (``compare_interventions``): for each (position, mode) row both
have, and for their controls, accuracy of each on the problems both answered, the difference with a
paired bootstrap interval, an exact McNemar test on correctness and Holm across the rows.

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
CONTROL_KEY = "control"  # the control's key among row keys (``p3/decoded``, ``pall/zero``)

Position = int | Literal["all"]


def row_key(position: Position, mode: str) -> str:
    """A row's key, as the registry and MLflow name it: ``p3/decoded``, ``pall/zero``."""
    return f"p{position}/{mode}"


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


class Flip(Record):
    """A problem whose correctness a replacement changed: the control's answer and the replaced one."""

    control: ProblemAnswer
    replaced: ProblemAnswer


class InterventionRow(Record):
    """One (position, mode) replacement compared with the control on the same problems."""

    position: Position
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

    @property
    def key(self) -> str:
        """``p3/decoded``, ``pall/zero``: see ``row_key``."""
        return row_key(self.position, self.mode)


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

    def row(self, position: Position, mode: str) -> InterventionRow:
        """The row of ``(position, mode)``.

        Raises:
            KeyError: the intervention has no such row.
        """
        for row in self.rows:
            if row.position == position and row.mode == mode:
                return row
        raise KeyError(row_key(position, mode))

    def flips(self, row: InterventionRow) -> list[Flip]:
        """The problems of ``row`` whose answer is right in the control and wrong there, or the reverse."""
        control = {answer.problem_id: answer for answer in self.control.answers}
        return [
            Flip(control=control[answer.problem_id], replaced=answer)
            for answer in row.answers
            if answer.problem_id in control and control[answer.problem_id].correct != answer.correct
        ]


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


# --- two interventions, row by row ---------------------------------------------------------------


class InterventionDelta(Record):
    """One row both interventions have (or their controls: ``mode`` ``control``, ``position`` None), paired
    over the problems both answered; ``delta = other_accuracy - reference_accuracy``."""

    position: Position | None
    mode: str
    n: int
    reference_accuracy: float | None
    other_accuracy: float | None
    delta: float | None
    ci: tuple[float, float] | None
    lost: int  # right in the reference, wrong in the other
    gained: int
    p_value: float
    p_holm: float | None = None
    significant: bool = False


class ConfigChange(Record):
    """A setting of the two interventions that differs."""

    key: str
    reference: Any
    other: Any


class InterventionComparison(Record):
    """Two interventions compared row by row (``compare_interventions``)."""

    reference: str  # run ids
    other: str
    reference_lens_run: str
    other_lens_run: str
    alpha: float
    resamples: int
    seed: int
    note: str | None
    config: list[ConfigChange]
    rows: list[InterventionDelta]


IGNORED_CONFIG = frozenset({"name", "device", "batch_size"})  # settings that do not change the answers


def compare_interventions(
    reference: InterventionResult,
    other: InterventionResult,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    alpha: float = ALPHA,
) -> InterventionComparison:
    """Compare two interventions: their controls, then every (position, mode) row both have.

    Each row pairs the two interventions' answers on the problems both rows hold (by problem id),
    and gets an exact McNemar test on correctness, a paired bootstrap interval of the difference
    (problems resampled, seeded by ``seed`` and the row's index) and Holm's adjustment across the rows.

    Args:
        reference: The first intervention; deltas are other minus reference.
        other: The second.
        resamples: Bootstrap resamples.
        seed: Seed of the bootstrap.
        alpha: Level of the intervals (``1 - alpha``) and of significance.
    """
    pairs: list[tuple[Position | None, str, list[ProblemAnswer], list[ProblemAnswer]]] = [
        (None, CONTROL_KEY, reference.control.answers, other.control.answers)
    ]
    theirs = {row.key: row for row in other.rows}
    pairs += [(row.position, row.mode, row.answers, theirs[row.key].answers) for row in reference.rows if row.key in theirs]
    rows = [_delta_row(position, mode, mine, yours, (seed, index), resamples, alpha)
            for index, (position, mode, mine, yours) in enumerate(pairs)]
    adjusted = holm([row.p_value for row in rows])
    rows = [row.model_copy(update={"p_holm": p, "significant": p is not None and p <= alpha and _excludes_zero(row.ci)})
            for row, p in zip(rows, adjusted, strict=True)]
    return InterventionComparison(
        reference=reference.run_id, other=other.run_id, reference_lens_run=reference.lens_run,
        other_lens_run=other.lens_run, alpha=alpha, resamples=resamples, seed=seed,
        note=_pairing_note(reference, other), config=_config_changes(reference.config, other.config),
        rows=rows,
    )


def _delta_row(
    position: Position | None, mode: str, reference: list[ProblemAnswer], other: list[ProblemAnswer],
    seed: tuple[int, int], resamples: int, alpha: float,
) -> InterventionDelta:
    theirs = {answer.problem_id: answer for answer in other}
    shared = [(mine, theirs[mine.problem_id]) for mine in reference if mine.problem_id in theirs]
    before = np.array([mine.correct for mine, _ in shared], dtype=bool)
    after = np.array([yours.correct for _, yours in shared], dtype=bool)
    lost, gained = int((before & ~after).sum()), int((~before & after).sum())
    values: dict[str, Any] = {"position": position, "mode": mode, "n": len(shared), "lost": lost, "gained": gained,
                              "p_value": mcnemar_p(lost, gained)}
    if not shared:
        return InterventionDelta(**values, reference_accuracy=None, other_accuracy=None, delta=None, ci=None)
    return InterventionDelta(
        **values, reference_accuracy=float(before.mean()), other_accuracy=float(after.mean()),
        delta=float(after.mean() - before.mean()),
        ci=paired_bootstrap(before, after, np.random.default_rng(list(seed)), resamples, alpha),
    )


def _pairing_note(reference: InterventionResult, other: InterventionResult) -> str | None:
    notes = []
    mine = {answer.problem_id for answer in reference.control.answers}
    yours = {answer.problem_id for answer in other.control.answers}
    if mine != yours:
        notes.append(f"the interventions share {len(mine & yours)} of {len(mine)} and {len(yours)} problems; "
                     "rows are paired over the shared ones")
    missing = len({row.key for row in reference.rows} ^ {row.key for row in other.rows})
    if missing:
        notes.append(f"{missing} rows are in one intervention only and left out")
    return "; ".join(notes) or None


def _config_changes(reference: dict[str, Any], other: dict[str, Any]) -> list[ConfigChange]:
    keys = [key for key in dict.fromkeys([*reference, *other]) if key not in IGNORED_CONFIG]
    return [ConfigChange(key=key, reference=reference.get(key), other=other.get(key))
            for key in keys if reference.get(key) != other.get(key)]
