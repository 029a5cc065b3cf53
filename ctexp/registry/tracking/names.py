"""What ctexp logs to MLflow under which names: flattened config parameters, a run's final metrics, an
intervention's metrics and an attention analysis's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ctexp.analysis.attention import AttentionReport
from ctexp.analysis.groupings import GROUPINGS
from ctexp.analysis.intervention import CONTROL_KEY, InterventionResult
from ctexp.analysis.result import GroupMetrics, RunResult

GROUP_METRICS = ("loss", "top1", "top5", "top10")
ROW_EXTRAS = ("prior_top1", "identity_top1", "lift_prior", "lift_identity")


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: dotted keys, string values (``"train.lr" -> "0.001"``).

    Args:
        config: the resolved config (``RunResult.config`` or ``ExperimentConfig.model_dump(mode="json")``).
        prefix: the dotted path of ``config`` itself (for recursion).

    Returns:
        One entry per leaf; None is ``"null"`` and booleans are ``"true"``/``"false"``, as in the JSON
        the run directory holds, so that ``params.store = 'null'`` finds world runs.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = _param_value(value)
    return flat


def final_metrics(result: RunResult) -> dict[str, float]:
    """The final metrics of a run under MLflow keys; None values are left out.

    Keys: per group of every grouping, its prefix (``Grouping.mlflow``: ``test/*`` overall, ``layer{L}/*``,
    ``position{P}/*``, ``cell/l{L}_p{P}/*``) with ``loss``, ``top1``, ``top5``, ``top10``, their
    ``*_low``/``*_high`` 95% interval ends, ``n``, ``problems``, ``prior_top1``, ``identity_top1``,
    ``lift_prior``, ``lift_identity``, or only the grouping's ``mlflow_metrics`` (cells: top-1; the SQL
    results table holds every cell metric); the baselines overall as ``prior/*`` and ``identity/*``;
    and ``run/seconds``, ``run/lens_parameters``, ``run/epochs``, ``run/best_epoch``.

    Args:
        result: a finished run.

    Returns:
        Metric name -> value.
    """
    metrics: dict[str, float] = {}
    for grouping in GROUPINGS:
        for row in result.rows(grouping.name):
            values = _group_metrics(grouping.mlflow_prefix(row), row)
            if grouping.mlflow_metrics is not None:
                values = {key: value for key, value in values.items()
                          if key.rsplit("/", 1)[1] in grouping.mlflow_metrics}
            metrics.update(values)
    for name, baseline in result.baselines.items():
        metrics.update(_group_metrics(name, baseline.overall))
    run = {
        "run/seconds": result.seconds,
        "run/lens_parameters": result.lens_parameters,
        "run/epochs": len(result.epochs),
        "run/best_epoch": result.best_epoch,
    }
    metrics.update({key: float(value) for key, value in run.items() if value is not None})
    return metrics


INTERVENTION_METRICS = ("accuracy", "delta", "changed", "p_holm")


def intervention_metrics(result: InterventionResult) -> dict[str, float]:
    """An intervention's metrics under MLflow keys; None values are left out.

    Keys: ``intervene/control/accuracy``, and per row ``intervene/p{position}/{mode}/`` (``pall`` for every
    position at once, as the row's key) with ``accuracy``, ``delta``, ``changed`` and ``p_holm``.
    """
    metrics = {f"intervene/{CONTROL_KEY}/accuracy": result.control.accuracy}
    for row in result.rows:
        for name in INTERVENTION_METRICS:
            value = getattr(row, name)
            if value is not None:
                metrics[f"intervene/{row.key}/{name}"] = float(value)
    return metrics


def attention_metrics(report: AttentionReport) -> dict[str, float]:
    """An attention analysis's metrics under MLflow keys; None values are left out.

    Keys: ``attention/l{layer}/p{position}/{kind}`` per mass row of the chosen layers and positions
    (``pbot`` for bot), and with a lens run ``attention/p{position}/target_correct``, ``target_incorrect``
    and ``target_difference``.
    """
    metrics = {f"attention/l{row.layer}/p{row.position}/{kind}": float(mass)
               for row in report.kinds for kind, mass in row.mass.items()}
    for contrast in report.target or []:
        for name, value in (("correct", contrast.correct), ("incorrect", contrast.incorrect),
                            ("difference", contrast.difference)):
            if value is not None:
                metrics[f"attention/p{contrast.position}/target_{name}"] = float(value)
    return metrics


def _group_metrics(prefix: str, row: GroupMetrics) -> dict[str, float]:
    """One group's metrics under ``prefix/``; None values are left out."""
    values: dict[str, float | int | None] = {"n": row.n, "problems": row.problems}
    for name in GROUP_METRICS:
        values[name] = getattr(row, name)
        interval = row.ci.get(name)
        if interval is not None:
            values[f"{name}_low"], values[f"{name}_high"] = interval
    for name in ROW_EXTRAS:
        values[name] = getattr(row, name)
    return {f"{prefix}/{key}": float(value) for key, value in values.items() if value is not None}


def _param_value(value: Any) -> str:
    """A parameter as the run directory's JSON writes it: ``null``, ``true``, ``1,2``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_param_value(item) for item in value)
    return str(value)
