"""A Markdown report of one run, in the shape of the reference write-up, built from the registry.

Every number comes from the results database (the run's row, its epochs and its layer, position and
cell results); samples come from the run's ``result.json`` where it is still on disk. Observations
are computed, never written by hand: best and worst positions and their ratio, whether their
intervals overlap, the best layer by top-1 and by top-10, the lift over both baselines.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ctexp.analysis.result import EpochMetrics, Sample
from ctexp.registry.db import ResultRow, RunRecord


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _ci(row: ResultRow, metric: str = "top1") -> str:
    interval = row.interval(metric)
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


def breakdown_section(rows: list[ResultRow], key: str) -> list[str]:
    header = [key.capitalize(), "Samples", "Loss", "Top-1", "95% CI", "Top-5", "Top-10", "Prior top-1",
              "Identity top-1", "Lift vs prior", "Lift vs identity"]
    body = [
        [str(getattr(row, key)), f"{row.n:,}", "-" if row.loss is None else f"{row.loss:.2f}", _pct(row.top1),
         _ci(row), _pct(row.top5), _pct(row.top10), _pct(row.prior_top1), _pct(row.identity_top1),
         "-" if row.lift_prior is None else f"{100 * row.lift_prior:+.2f}",
         "-" if row.lift_identity is None else f"{100 * row.lift_identity:+.2f}"]
        for row in rows
    ]
    return _table(header, body)


def grid_section(cells: list[ResultRow]) -> list[str]:
    layers = sorted({c.layer for c in cells if c.layer is not None})
    positions = sorted({c.position for c in cells if c.position is not None})
    value = {(c.layer, c.position): c.top1 for c in cells}
    rows = [[str(layer), *(_pct(value.get((layer, p))) for p in positions)] for layer in layers]
    return _table(["Layer \\ Position", *(str(p) for p in positions)], rows)


def observations(run: RunRecord, layers: list[ResultRow], positions: list[ResultRow]) -> list[str]:
    """Findings computed from the data, each with the numbers behind it."""
    notes = []
    scored = [p for p in positions if p.top1 is not None]
    if len(scored) >= 2:
        best = max(scored, key=lambda p: p.top1)
        worst = min(scored, key=lambda p: p.top1)
        ratio = f"{best.top1 / worst.top1:.1f}x" if worst.top1 else "infinitely"
        overlap = best.interval("top1") and worst.interval("top1") and best.top1_low <= worst.top1_high
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
    run: RunRecord,
    epochs: list[EpochMetrics],
    layers: list[ResultRow],
    positions: list[ResultRow],
    cells: list[ResultRow],
    samples: list[Sample],
    figures: Sequence[str] = (),
) -> str:
    """The whole report as Markdown."""
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
        "### Performance by Layer",
        "",
        *breakdown_section(layers, "layer"),
        "",
        "### Performance by Position",
        "",
        *breakdown_section(positions, "position"),
        "",
        "### Top-1 by Layer x Position",
        "",
        *grid_section(cells),
        "",
        "### Observations",
        "",
        *observations(run, layers, positions),
        "",
        "### Sample Predictions",
        "",
        *samples_section(samples),
    ]
    if figures:
        lines += ["## Figures", "", *(f"![{name}]({name})" for name in figures), ""]
    return "\n".join(lines).rstrip() + "\n"
