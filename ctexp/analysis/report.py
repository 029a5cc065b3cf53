"""A Markdown report of one run, in the shape of the reference write-up, from loaded, typed inputs; and
of one intervention (``render_intervention_report``): its rows, its figure and what the numbers mean; and of
one attention analysis (``render_attention_report``): its tables, observations, figure and statistics.

The caller reads them (``ctexp report`` from the results database: the run's row, its epochs and its
results of every grouping; samples from the run's ``result.json`` where it is still on disk).
Observations are computed, never written by hand: best and worst positions and their ratio, whether
their intervals overlap, the best layer by top-1 and by top-10, the lift over both baselines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from ctexp.analysis.attention import KIND_COLUMNS, AttentionReport
from ctexp.analysis.comparison import RecordedRun
from ctexp.analysis.groupings import BREAKDOWNS, Grouping
from ctexp.analysis.intervention import InterventionResult, InterventionRow
from ctexp.analysis.result import EpochMetrics, GroupMetrics, Sample


class ReportedRun(RecordedRun, Protocol):
    """What the report reads of a run: what compare reads, and its provenance (``RunRecord`` has it all)."""

    @property
    def started_at(self) -> datetime: ...
    @property
    def adapter(self) -> str: ...
    @property
    def layers(self) -> str: ...
    @property
    def positions(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def device(self) -> str: ...
    @property
    def store_path(self) -> str | None: ...
    @property
    def code_version(self) -> str: ...
    @property
    def best_epoch(self) -> int | None: ...
    @property
    def n_test_problems(self) -> int | None: ...
    @property
    def n_test_states(self) -> int | None: ...
    @property
    def test_top1_low(self) -> float | None: ...
    @property
    def test_top1_high(self) -> float | None: ...


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _ci(row: GroupMetrics, metric: str = "top1") -> str:
    interval = row.ci.get(metric)
    return "-" if interval is None else f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def epochs_section(epochs: list[EpochMetrics], best_epoch: int | None, stopped_early: bool) -> list[str]:
    if not epochs:
        return ["Nothing was trained (identity lens: the logit lens)."]
    last = epochs[-1].epoch
    rows = []
    for epoch in epochs:
        notes = [n for n, on in (("**Best model**", epoch.epoch == best_epoch),
                                 ("Early stopping triggered", stopped_early and epoch.epoch == last)) if on]
        rows.append([str(epoch.epoch), f"{epoch.train_loss:.4f}", f"{epoch.val_loss:.4f}", _pct(epoch.val_top1),
                     _pct(epoch.val_top5), _pct(epoch.val_top10), ", ".join(notes)])
    seconds = sum(epoch.seconds for epoch in epochs)
    table = _table(["Epoch", "Train loss", "Val loss", "Top-1", "Top-5", "Top-10", "Notes"], rows)
    return [*table, "", f"**Training time**: {seconds:.1f} s over {len(epochs)} epochs"]


def breakdown_section(rows: list[GroupMetrics], grouping: Grouping) -> list[str]:
    """A table of one grouping's rows (by layer, by position, ...) with intervals, baselines and lifts."""
    header = [grouping.heading, "Samples", "Loss", "Top-1", "95% CI", "Top-5", "Top-10", "Prior top-1",
              "Identity top-1", "Lift vs prior", "Lift vs identity"]
    body = [
        [grouping.label(row), f"{row.n:,}", "-" if row.loss is None else f"{row.loss:.2f}", _pct(row.top1),
         _ci(row), _pct(row.top5), _pct(row.top10), _pct(row.prior_top1), _pct(row.identity_top1),
         "-" if row.lift_prior is None else f"{100 * row.lift_prior:+.2f}",
         "-" if row.lift_identity is None else f"{100 * row.lift_identity:+.2f}"]
        for row in rows
    ]
    return _table(header, body)


def grid_section(cells: list[GroupMetrics], grouping: Grouping) -> list[str]:
    """Top-1 of a two-key grouping's rows as a grid: first key down, second across (layer x position)."""
    down, across = grouping.keys
    lines = sorted({getattr(c, down) for c in cells if getattr(c, down) is not None})
    columns = sorted({getattr(c, across) for c in cells if getattr(c, across) is not None})
    value = {grouping.key(c): c.top1 for c in cells}
    rows = [[str(line), *(_pct(value.get((line, column))) for column in columns)] for line in lines]
    return _table([f"{down.capitalize()} \\ {across.capitalize()}", *(str(c) for c in columns)], rows)


def grouping_sections(groups: Mapping[str, Sequence[GroupMetrics]]) -> list[str]:
    """A section per grouping with rows: a grid for two keys, else a table (``### Performance by Layer``)."""
    lines: list[str] = []
    for grouping in BREAKDOWNS:
        rows = list(groups.get(grouping.name, []))
        if len(grouping.keys) == 2:
            title = f"Top-1 by {' x '.join(key.capitalize() for key in grouping.keys)}"
            lines += [f"### {title}", "", *grid_section(rows, grouping), ""]
        else:
            lines += [f"### Performance by {grouping.name.capitalize()}", "", *breakdown_section(rows, grouping), ""]
    return lines


def observations(run: ReportedRun, layers: Sequence[GroupMetrics], positions: Sequence[GroupMetrics]) -> list[str]:
    """Findings computed from the data, each with the numbers behind it."""
    notes = []
    scored = [p for p in positions if p.top1 is not None]
    if len(scored) >= 2:
        best = max(scored, key=lambda p: p.top1)
        worst = min(scored, key=lambda p: p.top1)
        ratio = f"{best.top1 / worst.top1:.1f}x" if worst.top1 else "infinitely"
        best_ci, worst_ci = best.ci.get("top1"), worst.ci.get("top1")
        overlap = best_ci and worst_ci and best_ci[0] <= worst_ci[1]
        verdict = "their 95% intervals overlap, so the gap may be noise" if overlap else (
            "their 95% intervals do not overlap")
        notes.append(
            f"Position {best.position} decodes best ({_pct(best.top1)} top-1 {_ci(best)}) and position "
            f"{worst.position} worst ({_pct(worst.top1)} {_ci(worst)}): {ratio} better; {verdict}."
        )
    layer_scored = [row for row in layers if row.top1 is not None]
    if layer_scored:
        best_top1 = max(layer_scored, key=lambda row: row.top1)
        best_top10 = max(layer_scored, key=lambda row: row.top10 or 0.0)
        notes.append(f"Layer {best_top1.layer} has the highest top-1 ({_pct(best_top1.top1)} {_ci(best_top1)}); "
                     f"layer {best_top10.layer} the highest top-10 ({_pct(best_top10.top10)}).")
        spread = max(r.top1 for r in layer_scored) - min(r.top1 for r in layer_scored)
        notes.append(f"Top-1 spans {100 * spread:.1f} points across layers.")
    if run.test_top1 is not None and run.prior_top1 is not None and run.identity_top1 is not None:
        notes.append(
            f"Overall the lens reaches {_pct(run.test_top1)} top-1, {100 * (run.test_top1 - run.prior_top1):+.1f} "
            f"points over the prior baseline ({_pct(run.prior_top1)}) and "
            f"{100 * (run.test_top1 - run.identity_top1):+.1f} over the logit lens ({_pct(run.identity_top1)})."
        )
    return [f"- {note}" for note in notes]


def samples_section(samples: list[Sample]) -> list[str]:
    if not samples:
        return ["No samples: the run directory is no longer on disk."]
    lines = []
    for number, sample in enumerate(samples, start=1):
        predicted = ", ".join(f"'{t.token}' ({100 * (t.prob or 0):.2f}%)" for t in sample.predictions[:3])
        verdict = "Yes" if sample.correct else ("No, but in top-5" if sample.in_top5 else "No")
        targets = ", ".join(f"'{t.token}' (ID: {t.id})" for t in sample.targets)
        lines += [
            f"**Sample {number}** (Layer {sample.layer}, Position {sample.position}):",
            "```",
            f"CoT Steps: {sample.steps}",
            f"Target: {targets}",
            f"Predicted: {predicted}",
            f"Correct: {verdict}",
            "```",
            "",
        ]
    return lines


def render_report(
    run: ReportedRun,
    epochs: list[EpochMetrics],
    groups: Mapping[str, Sequence[GroupMetrics]],
    samples: list[Sample],
    figures: Sequence[str] = (),
) -> str:
    """The whole report as Markdown.

    Args:
        run: the run's provenance and headline metrics (e.g. the registry's ``RunRecord``).
        epochs: its training epochs.
        groups: its test metrics by grouping name (``layer``, ``position``, ``cell``, ...).
        samples: decoded test predictions to show.
        figures: file names of figures beside the report.
    """
    config = run.config
    train = config.get("train", {})
    lines = [
        f"# CoT Token Alignment: {run.name}",
        "",
        f"**Run**: `{run.id}`  ",
        f"**Experiment**: {run.experiment}  ",
        f"**Date**: {run.started_at:%Y-%m-%d %H:%M} UTC  ",
        f"**Status**: {run.status.value}  ",
        f"**Store**: {run.store_path or 'embedded world'} (hash `{run.store_hash}`)  ",
        f"**Code**: `{run.code_version}`",
        "",
        "## Executive Summary",
        "",
        (f"A `{run.lens}` tuned lens (adapter `{run.adapter}`) was trained to predict the `{run.target}` CoT token "
        f"of each continuous-thought position under the `{run.split}` split. On {run.n_test_problems or 0:,} test "
        f"problems ({run.n_test_states or 0:,} states) it reaches {_pct(run.test_top1)} top-1 "
        f"(95% CI {_pct(run.test_top1_low)} to {_pct(run.test_top1_high)}), {_pct(run.test_top5)} top-5 and "
        f"{_pct(run.test_top10)} top-10, against {_pct(run.prior_top1)} for the prior baseline and "
        f"{_pct(run.identity_top1)} for the logit lens."),
        "",
        "## Configuration",
        "",
        "```yaml",
        f"Lens: {run.lens} (adapter: {run.adapter})",
        f"Split: {run.split} (empty slices: {config.get('empty')})",
        f"Target: {run.target}",
        f"Layers: {run.layers}",
        f"Positions: {run.positions}",
        "Training:",
        "  Optimizer: AdamW",
        *(f"  {key}: {value}" for key, value in train.items()),
        f"Seed: {run.seed}",
        f"Device: {run.device}",
        "```",
        "",
        "## Results",
        "",
        "### Training Progress",
        "",
        *epochs_section(epochs, run.best_epoch, 0 < len(epochs) < train.get("epochs", len(epochs) + 1)),
        "",
        *grouping_sections(groups),
        "### Observations",
        "",
        *observations(run, groups.get("layer", []), groups.get("position", [])),
        "",
        "### Sample Predictions",
        "",
        *samples_section(samples),
    ]
    if figures:
        lines += ["## Figures", "", *(f"![{name}]({name})" for name in figures), ""]
    return "\n".join(lines).rstrip() + "\n"


# --- interventions ----------------------------------------------------------------------------------

OFF_DISTRIBUTION = ("mean", "zero", "noise")  # controls for "the replacement is just off the model's states"

MEANING = [
    ("- **Accuracy**: the share of the row's problems answered correctly with the thought replaced; **Control**:"
    " CODI unmodified on the same problems (a `decoded` or `target` row leaves out problems with no token at"
    " its positions)."),
    "- **Δ**: accuracy minus control, in points, with a 95% paired bootstrap interval over problems.",
    ("- **Changed**: the share of answers whose number (or text) differs from the control's, right or wrong;"
    " **Lost/gained**: problems the control got right and the row wrong, and the reverse."),
    ("- **p**: exact McNemar test on lost against gained; **p (Holm)**: adjusted across every row of the"
    " intervention; **Significant**: p (Holm) <= 0.05 and the interval excludes 0."),
    ("- A drop says the replaced thought carried something the answer needed, or that the replacement pushed"
    " the model off the states it was trained on: read `decoded` and `target` rows against `mean`, `zero` and"
    " `noise` at the same position. No drop does not mean the thought is unused: later thoughts and the"
    " attention cache can carry the same information. `none` replays the control and must change nothing."),
]


def intervention_rows_section(result: InterventionResult) -> list[str]:
    """The rows of an intervention as a Markdown table."""
    header = ["Mode", "Position", "Problems", "Accuracy", "Control", "Δ (points)", "95% CI", "Changed",
              "Lost/gained", "p", "p (Holm)", "Significant"]
    body = [
        [row.mode, str(row.position), str(row.n), _pct(row.accuracy), _pct(row.control_accuracy),
         "-" if row.delta is None else f"{100 * row.delta:+.2f}",
         "-" if row.ci is None else f"[{100 * row.ci[0]:+.1f}, {100 * row.ci[1]:+.1f}]", _pct(row.changed),
         f"{row.lost}/{row.gained}", f"{row.p_value:.3g}", "-" if row.p_holm is None else f"{row.p_holm:.3g}",
         "yes" if row.significant else ""]
        for row in result.rows
    ]
    return _table(header, body)


def intervention_observations(result: InterventionResult) -> list[str]:
    """Findings computed from an intervention's rows, each with the numbers behind it."""
    rows = [row for row in result.rows if row.delta is not None]
    notes = []
    significant = [row for row in rows if row.significant]
    notes.append(f"{len(significant)} of {len(result.rows)} rows change accuracy significantly"
                 + (f": {', '.join(f'{row.mode} at {row.position}' for row in significant)}." if significant else "."))
    if rows:
        worst = min(rows, key=lambda row: row.delta)  # type: ignore[arg-type, return-value]
        notes.append(f"The largest drop is {worst.mode} at position {worst.position}: {_points(worst)} "
                     f"({_pct(worst.control_accuracy)} to {_pct(worst.accuracy)} on {worst.n} problems).")
    for row in rows:
        if row.mode in ("decoded", "target"):
            baselines = [other for other in rows if other.position == row.position and other.mode in OFF_DISTRIBUTION]
            if baselines:
                against = ", ".join(f"{other.mode} {_points(other)}" for other in baselines)
                notes.append(f"At position {row.position}, {row.mode} changes accuracy by {_points(row)} against "
                             f"{against}.")
    replays = [row for row in result.rows if row.mode == "none"]
    if replays:
        moved = sum(row.lost + row.gained for row in replays)
        notes.append("The `none` rows replay the control exactly." if moved == 0 else
                     f"The `none` rows moved {moved} answers: the replay is not exact (bf16 rounding?).")
    return [f"- {note}" for note in notes]


def render_intervention_report(run: ReportedRun, result: InterventionResult, figures: Sequence[str] = ()) -> str:
    """The Markdown report of an intervention.

    Args:
        run: the intervention's registry record (its lens columns are those of its lens run).
        result: its rows and control.
        figures: file names of figures beside the report.
    """
    config, control = result.config, result.control
    site = f"{config.get('site')}" + (f" layer {config['layer']}" if config.get("layer") is not None else "")
    lines = [
        f"# Intervention: {run.name}",
        "",
        f"**Run**: `{run.id}`  ",
        f"**Lens run**: `{result.lens_run}` ({run.lens} lens, target `{run.target}`, split `{run.split}`)  ",
        f"**Experiment**: {run.experiment}  ",
        f"**Date**: {run.started_at:%Y-%m-%d %H:%M} UTC  ",
        f"**Status**: {run.status.value}  ",
        f"**Store**: {run.store_path or '-'} (hash `{run.store_hash}`)  ",
        f"**Code**: `{run.code_version}`",
        "",
        "## Summary",
        "",
        (f"CODI's continuous thoughts were replaced at the {site} site, one position at a time and all at once, "
         f"by {', '.join(f'`{mode}`' for mode in dict.fromkeys(row.mode for row in result.rows))}. Unmodified (the "
         f"control) it answers {_pct(control.accuracy)} of {control.n} problems correctly."),
        "",
        "## Configuration",
        "",
        "```yaml",
        *(f"{key}: {json_value}" for key, json_value in _config_lines(config)),
        "```",
        "",
        "## Results",
        "",
        *intervention_rows_section(result),
        "",
        "### Observations",
        "",
        *intervention_observations(result),
        "",
        "### What the numbers mean",
        "",
        *MEANING,
        "",
    ]
    if figures:
        lines += ["## Figures", "", *(f"![{name}]({name})" for name in figures), ""]
    return "\n".join(lines).rstrip() + "\n"


# --- attention analyses -----------------------------------------------------------------------------


def attention_sections(report: AttentionReport) -> list[str]:
    """An attention report's tables: mass by kind, top question tokens, and the target contrast with a run."""
    lines = ["### Attention mass by context kind", "",
             *_table(["Layer", "Position", *KIND_COLUMNS],
                     [[str(row.layer), str(row.position), *(f"{row.mass[kind]:.3f}" for kind in KIND_COLUMNS)]
                      for row in report.kinds]),
             "", "### Question tokens attended most", "",
             *_table(["Position", "Tokens (mass per problem)"],
                     [[str(entry.position), ", ".join(f"`{t.token.strip() or t.token!r}` {t.mass:.3f}"
                                                      for t in entry.tokens)]
                      for entry in report.top_tokens])]
    if report.run is not None and report.target is not None:
        lines += ["", f"### Attention on the target's occurrences: correct vs incorrect top-1 (lens run `{report.run.id}`)",
                  "", *_table(
                      ["Position", "Correct states", "Incorrect states", "Target absent", "Problems", "Mass correct",
                       "Mass incorrect", "Difference", "95% CI"],
                      [[str(row.position), str(row.correct_states), str(row.incorrect_states), str(row.absent_states),
                        str(row.problems), _mass(row.correct), _mass(row.incorrect),
                        "-" if row.difference is None else f"{row.difference:+.3f}",
                        "-" if row.low is None or row.high is None else f"[{row.low:+.3f}, {row.high:+.3f}]"]
                       for row in report.target])]
    return lines


def attention_observations(report: AttentionReport) -> list[str]:
    """Findings computed from an attention report, each with the numbers behind it."""
    notes = []
    for position in report.positions:
        rows = [row for row in report.kinds if row.position == position]
        means = {kind: sum(row.mass[kind] for row in rows) / len(rows) for kind in KIND_COLUMNS}
        kind = max(means, key=lambda name: means[name])
        notes.append(f"Position {position} puts most of its attention on `{kind}` ({means[kind]:.3f} on average "
                     f"over layers {', '.join(map(str, report.layers))}).")
    for row in report.target or []:
        if row.low is not None and row.high is not None and (row.low > 0 or row.high < 0):
            side = "more" if row.low > 0 else "less"
            notes.append(f"At position {row.position}, correctly decoded states attend {side} to their target's "
                         f"occurrences: {row.difference:+.3f} [{row.low:+.3f}, {row.high:+.3f}].")
    return [f"- {note}" for note in notes]


def render_attention_report(run: ReportedRun, report: AttentionReport, figures: Sequence[str] = ()) -> str:
    """The Markdown report of an attention analysis.

    Args:
        run: the analysis's registry record.
        report: its report, as ``ctexp attention`` computed it.
        figures: file names of figures beside the report.
    """
    lens = (f"`{report.run.id}` ({report.run.lens} lens, target `{report.run.target}`)" if report.run else "-")
    lines = [
        f"# Attention: {run.name}",
        "",
        f"**Run**: `{run.id}`  ",
        f"**Lens run**: {lens}  ",
        f"**Experiment**: {run.experiment}  ",
        f"**Date**: {run.started_at:%Y-%m-%d %H:%M} UTC  ",
        f"**Status**: {run.status.value}  ",
        (f"**Store**: {report.store} (hash `{report.store_hash}`), attention `{report.mode}`"
        f"{'' if report.heads is None else f' of {report.heads} heads'}, {report.problems} problems  "),
        f"**Code**: `{run.code_version}`",
        "",
        "## Configuration",
        "",
        "```yaml",
        *(f"{key}: {value}" for key, value in _config_lines(run.config) if key != "report"),
        "```",
        "",
        "## Results",
        "",
        *attention_sections(report),
        "",
        "### Observations",
        "",
        *attention_observations(report),
        "",
        "### What the numbers mean",
        "",
        report.statistics,
        "",
    ]
    if figures:
        lines += ["## Figures", "", *(f"![{name}]({name})" for name in figures), ""]
    return "\n".join(lines).rstrip() + "\n"


def _mass(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _points(row: InterventionRow) -> str:
    interval = "" if row.ci is None else f" [{100 * row.ci[0]:+.1f}, {100 * row.ci[1]:+.1f}]"
    return "-" if row.delta is None else f"{100 * row.delta:+.1f} points{interval}"


def _config_lines(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(key, value if isinstance(value, str) else json.dumps(value)) for key, value in config.items()
            if key not in ("name",)]
