"""Problem sources by spec: one parser (``SourceSpec.parse``) for every command that reads problems.

* ``world``: the embedded default world's problems (``ctexp align``).
* ``store:DIR``: an activation store's problems (``ctexp align``).
* ``gsm8k:PATH``: GSM8K JSONL (``question``, ``answer`` with ``<<...>>`` and ``#### final``).
* ``aug:PATH``: GSM8K-Aug JSONL (``question``, ``cot``, ``answer``).
* ``hf:DIR``: a local Hugging Face ``datasets`` directory, as ``Dataset.save_to_disk`` writes it
  (``state.json`` naming Arrow stream files ``data-*.arrow``). Rows with a ``cot`` column are read
  as GSM8K-Aug, others as GSM8K. For a ``DatasetDict`` pass one split's directory
  (``hf:DIR/test``). The ``datasets`` package is not needed: the Arrow files are read with
  ``pyarrow``, and nothing is ever downloaded.

Each command names the kinds it accepts (``PROBLEM_FILES`` for ``extract`` and ``import``, which need
problems alone; ``EVERY_SOURCE`` for ``align``), and a spec of another form is one ``SourceError``
line listing them. ``read_problems`` reads the problem files; ``world`` and ``store:DIR`` come with a
store's tokenizer and positions, so the command that takes them loads them itself.

Problem ids are ``"{file stem or directory name}-{0-based row}"`` (``train-0``), as for JSONL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from ctexp.data.problems import Problem
from ctexp.data.sources.gsm8k import _check_limit, build_problem, read_aug, read_gsm8k
from ctexp.errors import SourceError
from ctexp.records import FrozenRecord


class SourceKind(StrEnum):
    """What a source spec names, by the text before its colon."""

    WORLD = "world"  # the embedded default world (no path)
    STORE = "store"  # an activation store directory
    GSM8K = "gsm8k"  # GSM8K JSONL
    AUG = "aug"  # GSM8K-Aug JSONL
    HF = "hf"  # a local datasets directory written by save_to_disk

    @property
    def form(self) -> str:
        """How a spec of this kind is written, for messages and help: ``gsm8k:PATH``."""
        return {
            SourceKind.WORLD: "world", SourceKind.STORE: "store:DIR", SourceKind.GSM8K: "gsm8k:PATH",
            SourceKind.AUG: "aug:PATH", SourceKind.HF: "hf:DIR",
        }[self]


PROBLEM_FILES: tuple[SourceKind, ...] = (SourceKind.GSM8K, SourceKind.AUG, SourceKind.HF)
EVERY_SOURCE: tuple[SourceKind, ...] = tuple(SourceKind)
RECORDS_FORM = "a JSONL file of problem records"  # what ``ctexp import`` also reads (a store's problems.jsonl)


def source_forms(kinds: Sequence[SourceKind], *others: str) -> str:
    """The forms of ``kinds`` (and ``others``, e.g. a plain file) as one phrase: ``'gsm8k:PATH' or 'aug:PATH'``."""
    forms = [f"'{kind.form}'" for kind in kinds] + list(others)
    return forms[0] if len(forms) == 1 else f"{', '.join(forms[:-1])} or {forms[-1]}"


class SourceSpec(FrozenRecord):
    """A parsed source spec: its kind, and the file or directory it names (None for ``world``)."""

    kind: SourceKind
    path: Path | None = None

    @classmethod
    def parse(cls, text: str, accepted: Sequence[SourceKind] = PROBLEM_FILES, *others: str) -> SourceSpec:
        """Parse ``world``, ``store:DIR``, ``gsm8k:PATH``, ``aug:PATH`` or ``hf:DIR``.

        Args:
            text: The spec as given.
            accepted: The kinds the caller reads; any other is an error.
            others: Further forms the caller accepts besides specs, named in the error message.

        Raises:
            SourceError: An unknown or unaccepted kind, a missing path, or a path after ``world``;
                one line listing the accepted forms.
        """
        forms = source_forms(accepted, *others)
        name, separator, raw_path = text.partition(":")
        if not cls.names_a_kind(text):
            raise SourceError(f"unknown source spec {text!r}; use {forms}")
        kind = SourceKind(name)
        if kind not in accepted:
            raise SourceError(f"source spec {text!r} ({kind.form}) cannot be read here; use {forms}")
        if kind is SourceKind.WORLD:
            if separator:
                raise SourceError(f"source spec {text!r}: world takes no path; use {forms}")
            return cls(kind=kind)
        if not raw_path:
            what = "directory" if kind.form.endswith("DIR") else "file"
            raise SourceError(f"source spec {text!r} names no {what}; use {forms}")
        return cls(kind=kind, path=Path(raw_path).expanduser())

    @staticmethod
    def names_a_kind(text: str) -> bool:
        """Whether ``text`` starts like a spec (a known kind), rather than being a plain file path."""
        return text.partition(":")[0] in {kind.value for kind in SourceKind}

    def __str__(self) -> str:
        return self.kind.value if self.path is None else f"{self.kind.value}:{self.path}"


def read_problems(spec: SourceSpec | str, limit: int | None = None) -> list[Problem]:
    """Read problems from a problem file: ``gsm8k:PATH``, ``aug:PATH`` or ``hf:DIR``.

    Args:
        spec: The parsed spec, or its text (parsed with ``SourceSpec.parse`` for ``PROBLEM_FILES``).
        limit: Stop after this many problems; None reads all.

    Returns:
        The problems, at least one.

    Raises:
        SourceError: The spec is not a problem file, or the source is missing, unreadable or malformed.
        ConfigError: ``limit`` is below 1.
    """
    source = spec if isinstance(spec, SourceSpec) else SourceSpec.parse(spec, PROBLEM_FILES)
    if source.kind not in PROBLEM_FILES or source.path is None:
        raise SourceError(f"source {source} is no problem file; use {source_forms(PROBLEM_FILES)}")
    readers = {SourceKind.GSM8K: read_gsm8k, SourceKind.AUG: read_aug, SourceKind.HF: read_hf_dataset}
    return readers[source.kind](source.path, limit)


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
