"""A run's description on MLflow's run page: Markdown in the run note (the tag ``mlflow.note.content``).

``describe`` is one function of the typed result, dispatched on its type (``functools.singledispatch``):
a lens run's ``RunResult`` is described here; a kind of run with a result type of its own (interventions,
attention) adds its description with ``@describe.register`` on a function that takes that type, and
the tracker logs whatever ``describe`` returns.

A lens run's description: the headline test top-1 with its interval, both baselines and the lifts over
them, the per-position table (the report's own Markdown table), the best layer, and the config in one
line. Everything is computed from the result, nothing is typed by hand.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from ctexp.analysis.attention import KIND_COLUMNS, AttentionReport
from ctexp.analysis.groupings import grouping
from ctexp.analysis.intervention import InterventionResult
from ctexp.analysis.report import breakdown_section
from ctexp.analysis.result import GroupMetrics, RunResult
from ctexp.registry.tracking.names import flatten_config

NOTE_TAG = "mlflow.note.content"  # MLflow's run description (shown as "Description" on the run page)
BASELINE_NAMES = {"prior": "prior (train-set token frequencies)", "identity": "logit lens (identity)"}


@functools.singledispatch
def describe(result: object) -> str:
    """The Markdown description of a run's typed result.

    Args:
        result: a run's result (``RunResult`` for a lens run; other types register their own).

    Returns:
        Markdown for MLflow's run note.

    Raises:
        TypeError: no description is registered for the result's type.
    """
    raise TypeError(f"no run description for {type(result).__name__}; register one with @describe.register")


@describe.register
def _describe_lens_run(result: RunResult) -> str:
    overall = result.overall
    lines = [
        (f"**Test top-1 {_pct_ci(overall)}** (top-5 {_pct(overall.top5)}, top-10 {_pct(overall.top10)}, "
         f"loss {_number(overall.loss)}) over {overall.n:,} states of {overall.problems:,} test problems; "
         f"`{result.config.get('lens')}` lens, {_training(result)}."),
        "",
        *_baselines(result),
        "",
        "### By position",
        "",
        *breakdown_section(result.rows("position"), grouping("position")),
        "",
        _best_layer(result.rows("layer")),
        "",
        f"**Config**: `{_config_line(result.config)}`",
        "",
        (f"Store `{result.store.path or result.store.model}` (content hash `{result.store.content_hash}`); "
         f"ctexp run `{result.run_id}`."),
    ]
    return "\n".join(lines)


@describe.register
def _describe_intervention(result: InterventionResult) -> str:
    control = result.control
    lines = [
        (f"**Intervention** on lens run `{result.lens_run}`: control accuracy {_pct(control.accuracy)} over "
         f"{control.n:,} problems; {sum(row.significant for row in result.rows)} of {len(result.rows)} "
         "replacements change accuracy significantly (Holm, 95% paired bootstrap excluding 0)."),
        "",
        "| position | mode | n | accuracy | delta [95% CI] | changed | p (Holm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        interval = "" if row.ci is None else f" [{100 * row.ci[0]:+.1f}, {100 * row.ci[1]:+.1f}]"
        holm = "-" if row.p_holm is None else f"{row.p_holm:.3g}{' *' if row.significant else ''}"
        lines.append(f"| {row.position} | {row.mode} | {row.n} | {_pct(row.accuracy)} | "
                     f"{_points(row.delta)}{interval} | {_pct(row.changed)} | {holm} |")
    lines += ["", f"**Config**: `{_config_line(result.config)}`", "", f"ctexp run `{result.run_id}`."]
    return "\n".join(lines)


@describe.register
def _describe_attention(report: AttentionReport) -> str:
    lens = (f" related to lens run `{report.run.id}` ({report.run.lens} lens, target `{report.run.target}`)"
            if report.run else "")
    lines = [
        (f"**Attention** of store `{report.store}` (hash `{report.store_hash}`, {report.mode}, "
         f"{report.problems:,} problems){lens}: mean mass by context kind over layers "
         f"{', '.join(map(str, report.layers))}."),
        "",
        "| position | " + " | ".join(KIND_COLUMNS) + " |",
        "|---" * (len(KIND_COLUMNS) + 1) + "|",
    ]
    for position in report.positions:
        rows = [row for row in report.kinds if row.position == position]
        means = [sum(row.mass[kind] for row in rows) / len(rows) for kind in KIND_COLUMNS]
        lines.append(f"| {position} | " + " | ".join(f"{value:.3f}" for value in means) + " |")
    if report.target:
        lines += ["", "| position | correct | incorrect | difference [95% CI] |", "|---|---|---|---|"]
        for row in report.target:
            interval = "" if row.low is None or row.high is None else f" [{row.low:+.3f}, {row.high:+.3f}]"
            difference = "-" if row.difference is None else f"{row.difference:+.3f}{interval}"
            lines.append(f"| {row.position} | {_number(row.correct)} | {_number(row.incorrect)} | {difference} |")
    lines += ["", f"ctexp run `{report.run_id}`."]
    return "\n".join(lines)


def describe_unfinished(status: str, config: Mapping[str, Any], reason: str | None = None) -> str:
    """The description of a run without results: RUNNING (until ``describe`` replaces it), or how it ended.

    Args:
        status: ``RUNNING``, ``FAILED``, ``KILLED`` or ``PRUNED``.
        config: the run's resolved config (``ExperimentConfig.model_dump(mode="json")``).
        reason: why it ended (the error, the pruner's message).
    """
    headline = reason or ("training; the results replace this description when the run finishes"
                          if status == "RUNNING" else "no results")
    return f"**{status}**: {headline}\n\n**Config**: `{_config_line(config)}`"


def _baselines(result: RunResult) -> list[str]:
    """One line per baseline: its top-1 and the lens's lift over it, in points."""
    lines = []
    for name, baseline in result.baselines.items():
        value = baseline.overall.top1
        lift = None if value is None or result.overall.top1 is None else result.overall.top1 - value
        lines.append(f"- Baseline {BASELINE_NAMES.get(name, name)}: top-1 {_pct_ci(baseline.overall)}; "
                     f"lift {_points(lift)}")
    return lines


def _best_layer(layers: list[GroupMetrics]) -> str:
    scored = [row for row in layers if row.top1 is not None]
    if not scored:
        return "**Best layer**: - (no layer has test states)"
    best = max(scored, key=lambda row: row.top1 or 0.0)
    return f"**Best layer**: {best.layer}, top-1 {_pct_ci(best)} (lift vs identity {_points(best.lift_identity)})"


def _training(result: RunResult) -> str:
    if not result.epochs:
        return "nothing trained"
    stopped = ", stopped early" if result.stopped_early else ""
    return f"{len(result.epochs)} epochs (best {result.best_epoch}{stopped})"


def _config_line(config: Mapping[str, Any]) -> str:
    """Every config value as ``key=value``, dotted keys for nested ones; the world's only when it is the store."""
    flat = flatten_config(config)
    return " ".join(
        f"{key}={value}" for key, value in flat.items()
        if not (key.startswith("world.") and flat.get("store") != "null")
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _pct_ci(row: GroupMetrics) -> str:
    interval = row.ci.get("top1")
    if row.top1 is None or interval is None:
        return _pct(row.top1)
    return f"{_pct(row.top1)} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f} points"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
