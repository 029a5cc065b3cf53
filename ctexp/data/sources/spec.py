"""Problem sources by spec, for commands that read problems from any supported container.

* ``gsm8k:PATH``: GSM8K JSONL (``question``, ``answer`` with ``<<...>>`` and ``#### final``).
* ``aug:PATH``: GSM8K-Aug JSONL (``question``, ``cot``, ``answer``).
* ``hf:DIR``: a local Hugging Face ``datasets`` directory, as ``Dataset.save_to_disk`` writes it
  (``state.json`` naming Arrow stream files ``data-*.arrow``). Rows with a ``cot`` column are read
  as GSM8K-Aug, others as GSM8K. For a ``DatasetDict`` pass one split's directory
  (``hf:DIR/test``). The ``datasets`` package is not needed: the Arrow files are read with
  ``pyarrow``, and nothing is ever downloaded.

Problem ids are ``"{file stem or directory name}-{0-based row}"`` (``train-0``), as for JSONL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctexp.data.problems import Problem
from ctexp.data.sources.gsm8k import _check_limit, build_problem, read_source
from ctexp.errors import SourceError

DATA_FORMS = "'gsm8k:PATH', 'aug:PATH' or 'hf:DIR' (a local datasets directory written by save_to_disk)"


def read_problems(spec: str, limit: int | None = None) -> list[Problem]:
    """Read problems from ``gsm8k:PATH``, ``aug:PATH`` or ``hf:DIR``.

    Args:
        spec: The source spec.
        limit: Stop after this many problems; None reads all.

    Returns:
        The problems, at least one.

    Raises:
        SourceError: The spec has another form, or the source is missing, unreadable or malformed.
        ConfigError: ``limit`` is below 1.
    """
    kind, sep, raw_path = spec.partition(":")
    if sep and kind in ("gsm8k", "aug"):
        return read_source(spec, limit)
    if sep and kind == "hf":
        if not raw_path:
            raise SourceError(f"source spec {spec!r} names no directory; use {DATA_FORMS}")
        return read_hf_dataset(Path(raw_path).expanduser(), limit)
    raise SourceError(f"unknown source spec {spec!r}; use {DATA_FORMS}")


def read_hf_dataset(path: Path, limit: int | None = None) -> list[Problem]:
    """Read a ``Dataset.save_to_disk`` directory of GSM8K or GSM8K-Aug rows.

    Args:
        path: The dataset directory (one split).
        limit: Stop after this many problems; None reads all.

    Returns:
        The problems, in row order.

    Raises:
        SourceError: Not a datasets directory, a DatasetDict, unreadable Arrow files, missing
            columns, or no rows.
        ConfigError: ``limit`` is below 1.
    """
    _check_limit(limit)
    problems: list[Problem] = []
    for index, record in enumerate(_rows(path)):
        if limit is not None and len(problems) >= limit:
            break
        kind = "aug" if "cot" in record else "gsm8k"
        try:
            problems.append(build_problem(record, f"{path.name}-{index}", kind))
        except SourceError as exc:
            raise SourceError(f"{path} row {index}: {exc}") from None
    if not problems:
        raise SourceError(f"{path} holds no rows; pass a datasets directory with GSM8K rows")
    return problems


def _data_files(path: Path) -> list[Path]:
    """The Arrow files of a save_to_disk directory, in order, from its ``state.json``."""
    if not path.is_dir():
        raise SourceError(f"datasets directory {path} not found; pass the directory save_to_disk wrote")
    if (path / "dataset_dict.json").is_file():
        splits = _read_json(path / "dataset_dict.json").get("splits") or []
        example = f" e.g. hf:{path / splits[0]}" if splits else ""
        raise SourceError(f"{path} holds several splits {splits}; pass one split's directory,{example}")
    state_path = path / "state.json"
    if not state_path.is_file():
        raise SourceError(f"{path} has no state.json; pass a directory written by Dataset.save_to_disk")
    files = _read_json(state_path).get("_data_files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
        raise SourceError(f"{state_path} lists no data files ('_data_files'); re-save the dataset")
    return [path / str(f["filename"]) for f in files]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path} is unreadable ({exc}); re-save the dataset") from None
    if not isinstance(value, dict):
        raise SourceError(f"{path} is not a JSON object; re-save the dataset")
    return value


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the rows of every Arrow file of the dataset as dicts, one record batch in memory at a time."""
    try:
        import pyarrow as pa  # imported lazily: only this source needs it
    except ImportError:
        raise SourceError("reading a datasets directory needs pyarrow; install it (pip install pyarrow)") from None
    for file in _data_files(path):
        try:
            reader = _open_arrow(pa, file)
            for batch in reader:
                yield from batch.to_pylist()
        except (OSError, pa.ArrowException) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SourceError(f"{file} is not a readable Arrow file ({first}); re-save the dataset") from None


def _open_arrow(pa: Any, file: Path) -> Any:
    """Open an Arrow file: datasets writes the stream format; the file (random-access) format is accepted too."""
    if not file.is_file():
        raise SourceError(f"{file} not found; the datasets directory is incomplete")
    try:
        return pa.ipc.open_stream(pa.memory_map(str(file)))
    except pa.ArrowInvalid:
        opened = pa.ipc.open_file(pa.memory_map(str(file)))
        return (opened.get_batch(i) for i in range(opened.num_record_batches))
