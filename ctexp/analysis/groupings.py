"""Result groupings: the one definition of how test states are grouped into result rows.

A grouping is a name and the key columns that split the states into groups: ``overall`` has no key (one
group, all states), ``layer`` one group per layer, ``position`` one per CT position, ``cell`` one per
(layer, position). Evaluation, the run result, compare, rendering, the report, the registry's results
table and the MLflow metric names all iterate over ``GROUPINGS``; nothing else names a grouping.

Adding a grouping over the existing axes (``AXES``) is one entry in ``GROUPINGS``. A grouping over a new
axis (CoT steps, head, answer correctness) also needs that axis: a field on the row models
(``GroupMetrics``, ``DeltaRow``), the per-state values where states are grouped (``evaluate.breakdown``,
``compare``'s states) and a column of ``ctexp_results`` (a migration).

In JSON (``ctexp run --json``, ``ctexp show --json``, ``ctexp compare --format json``, ``result.json``)
a grouping without keys is one object under its name (``overall``) and any other a list under
``by_<name>`` (``by_layer``, ``by_position``, ``by_cell``): ``Grouped`` reads and writes that shape.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer, model_validator

from ctexp.records import Record

if TYPE_CHECKING:
    import numpy as np

AXES = ("layer", "position")  # the key columns a grouping may use; every row model has one field per axis


@dataclass(frozen=True)
class Grouping:
    """One way of grouping test states.

    Args:
        name: the grouping's name (``--by`` values, the ``grouping`` column of ``ctexp_results``).
        keys: the key columns (from ``AXES``) whose values identify a group; none for a single group.
        mlflow: the MLflow metric prefix of a group, formatted with its key values (``layer{layer}``).
        mlflow_metrics: the metrics MLflow gets per group; None for all of them.
    """

    name: str
    keys: tuple[str, ...]
    mlflow: str
    mlflow_metrics: tuple[str, ...] | None = None

    @property
    def field(self) -> str:
        """The JSON key of its rows: the name for a single group, else ``by_<name>``."""
        return f"by_{self.name}" if self.keys else self.name

    @property
    def heading(self) -> str:
        """A table's first column header: ``Layer``, ``Layer/position``, ``Overall``."""
        return "/".join(self.keys).capitalize() if self.keys else self.name.capitalize()

    def key(self, row: Any) -> tuple[Any, ...]:
        """The key values of a row (any object with one attribute per axis)."""
        return tuple(getattr(row, key) for key in self.keys)

    def label(self, row: Any) -> str:
        """A row's label in a table: ``3``, ``3/2``, or ``all`` for a single group."""
        return "/".join(str(value) for value in self.key(row)) if self.keys else "all"

    def group_key(self, row: Any) -> str:
        """The non-null text that identifies a row within a run and split in SQL: ``layer=3,position=2``.

        SQL unique constraints treat NULLs as distinct, so the nullable axis columns cannot be the key.
        """
        return ",".join(f"{key}={value}" for key, value in zip(self.keys, self.key(row), strict=True))

    def mlflow_prefix(self, row: Any) -> str:
        """The MLflow metric prefix of a row: ``test``, ``layer9``, ``cell/l9_p3``."""
        return self.mlflow.format(**dict(zip(self.keys, self.key(row), strict=True)))


GROUPINGS: tuple[Grouping, ...] = (
    Grouping("overall", (), mlflow="test"),
    Grouping("layer", ("layer",), mlflow="layer{layer}"),
    Grouping("position", ("position",), mlflow="position{position}"),
    # Per cell, MLflow gets top-1 only: L x T cells times every metric would be hundreds of flat keys
    # (slow to log, unreadable in the UI); the SQL results table holds every cell metric with its interval.
    Grouping("cell", ("layer", "position"), mlflow="cell/l{layer}_p{position}", mlflow_metrics=("top1",)),
)
# The groupings that split states into several groups: the registry's results rows, `ctexp best --by`.
BREAKDOWNS: tuple[Grouping, ...] = tuple(grouping for grouping in GROUPINGS if grouping.keys)


def grouping(name: str, among: Sequence[Grouping] = GROUPINGS) -> Grouping:
    """The grouping called ``name``.

    Raises:
        KeyError: no grouping of ``among`` has that name.
    """
    for candidate in among:
        if candidate.name == name:
            return candidate
    raise KeyError(name)


def names(among: Sequence[Grouping] = GROUPINGS) -> list[str]:
    """The groupings' names, in definition order."""
    return [candidate.name for candidate in among]


# ---------------------------------------------------------------------------------------------------------
# Numbering groups, for accumulating per-state values


class GroupIndex:
    """Numbers the groups of every grouping ``0..count-1``, in ``GROUPINGS`` order.

    Within a grouping, groups follow the product of its keys' levels in key order (cells: layer-major).

    Args:
        levels: per axis, its values in the order groups should follow (e.g. the run's layers).
    """

    def __init__(self, levels: Mapping[str, Sequence[int]]) -> None:
        self.levels = {axis: list(values) for axis, values in levels.items()}
        self._sizes = [math.prod(len(self.levels[key]) for key in g.keys) for g in GROUPINGS]
        self._offsets = list(itertools.accumulate(self._sizes, initial=0))[:-1]
        self.count = sum(self._sizes)

    def ids(self, values: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Each state's group id, one array per grouping.

        Args:
            values: per axis, each state's value; the arrays broadcast to one shape (e.g. ``(S, 1)``
                positions and ``(1, L)`` layers for states scored at every layer).

        Returns:
            Per grouping, int64 ids of the broadcast shape.

        Raises:
            ValueError: a value that is not one of its axis's levels.
        """
        import numpy as np  # here, not at the top: the CLI reads the groupings' names without numpy

        shape = np.broadcast_shapes(*(np.shape(array) for array in values.values()))
        ranks = {axis: _ranks(self.levels[axis], np.asarray(array), axis) for axis, array in values.items()}
        ids = []
        for g, offset in zip(GROUPINGS, self._offsets, strict=True):
            gid = np.zeros(shape, dtype=np.int64)
            for key in g.keys:  # mixed radix, first key most significant
                gid = gid * len(self.levels[key]) + ranks[key]
            ids.append(np.broadcast_to(offset + gid, shape))
        return ids

    def groups(self) -> Iterator[tuple[Grouping, dict[str, int]]]:
        """Every group in id order: its grouping and its key values."""
        for g in GROUPINGS:
            for combination in itertools.product(*(self.levels[key] for key in g.keys)):
                yield g, dict(zip(g.keys, combination, strict=True))

    def largest(self) -> int:
        """The number of groups of the largest grouping (the biggest family of tests)."""
        return max(self._sizes)


def _ranks(levels: list[int], values: np.ndarray, axis: str) -> np.ndarray:
    """The index of each value in ``levels`` (which need not be sorted)."""
    import numpy as np

    if values.size == 0:
        return np.zeros(values.shape, dtype=np.int64)
    order = np.argsort(np.asarray(levels, dtype=np.int64), kind="stable")
    ordered = np.asarray(levels, dtype=np.int64)[order]
    found = np.clip(np.searchsorted(ordered, values), 0, max(len(levels) - 1, 0))
    if not levels or not np.array_equal(ordered[found], values):
        unknown = sorted(set(np.unique(values).tolist()) - set(levels))
        raise ValueError(f"{axis} values {unknown} are not among {levels}")
    return order[found]


# ---------------------------------------------------------------------------------------------------------
# Rows of every grouping in one record


RowT = TypeVar("RowT", bound=BaseModel)


class Grouped(Record, Generic[RowT]):
    """A record holding rows of every grouping: ``groups[name]`` (the subclass declares ``groups``).

    It reads and writes the JSON shape of ``overall`` plus ``by_<name>`` keys, in place of ``groups``, so
    that the output's keys stay what users' scripts read; a record written before a grouping existed
    simply has no rows of it.
    """

    if TYPE_CHECKING:
        groups: dict[str, list[RowT]]

    @model_validator(mode="before")
    @classmethod
    def _gather(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "groups" in data:
            return data
        data = dict(data)
        groups = {}
        for g in GROUPINGS:
            if g.field in data:
                value = data.pop(g.field)
                groups[g.name] = value if g.keys else [value]
        return {**data, "groups": groups}

    @model_serializer(mode="wrap")
    def _spread(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        spread: dict[str, Any] = {}
        for key, value in handler(self).items():
            if key != "groups":
                spread[key] = value
                continue
            for g in GROUPINGS:
                if g.name in value:
                    spread[g.field] = value[g.name] if g.keys else value[g.name][0]
        return spread

    def rows(self, name: str) -> list[RowT]:
        """The rows of the grouping ``name`` ([] when this record has none)."""
        return self.groups.get(name, [])

    @property
    def overall(self) -> RowT:
        """The one row of all states (the headline)."""
        return self.groups["overall"][0]

    def with_rows(self, name: str, rows: list[RowT]) -> Self:
        """A copy with the rows of ``name`` replaced."""
        return self.model_copy(update={"groups": {**self.groups, name: rows}})
