"""Readers for GSM8K and GSM8K-Aug JSONL files.

* GSM8K (``gsm8k:PATH``): one ``{"question", "answer"}`` object per line; the answer holds
  calculator annotations ``<<48/2=24>>`` (the CoT steps) and ends with ``#### 72``.
* GSM8K-Aug (``aug:PATH``): one ``{"question", "cot", "answer"}`` object per line; ``cot`` is
  e.g. ``"<<600*30/100=180>> <<600*10/100=60>>"``.

Problem ids are ``"{file stem}-{0-based line index}"`` (blank lines count), e.g. ``train-0``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ctexp.data.problems import Problem
from ctexp.errors import ConfigError, SourceError

_ANNOTATION_RE = re.compile(r"<<(.*?)>>", re.DOTALL)
_THOUSANDS_COMMA_RE = re.compile(r"(?<=\d),(?=\d)")
_FINAL_MARK = "####"
_JSON_WHITESPACE = " \t\r\n"  # what JSON itself treats as whitespace; other blanks are errors

_RecordBuilder = Callable[[dict[str, Any], str], Problem]


def _annotation_steps(text: str) -> list[str]:
    """Return the stripped, non-empty contents of each ``<<...>>`` in ``text``, in order."""
    return [step.strip() for step in _ANNOTATION_RE.findall(text) if step.strip()]


def _normalise_answer(answer: str) -> str:
    """Strip a final answer and drop thousands commas (``"1,000"`` -> ``"1000"``)."""
    return _THOUSANDS_COMMA_RE.sub("", answer.strip())


def parse_gsm8k_answer(answer: str) -> tuple[list[str], str]:
    """Split a GSM8K answer into its CoT steps and final answer.

    Args:
        answer: The ``answer`` field, e.g. ``"... <<48/2=24>>24 ...\\n#### 72"``.

    Returns:
        ``(steps, final)``: the inner text of each calculator annotation in order
        (``[]`` where there is none) and the text after ``####`` without thousands commas.

    Raises:
        SourceError: There is no ``####`` marker, or nothing follows it.
    """
    body, mark, final = answer.rpartition(_FINAL_MARK)
    if not mark:
        raise SourceError("the answer has no '####' marker; GSM8K answers end with '#### <final answer>'")
    final_answer = _normalise_answer(final)
    if not final_answer:
        raise SourceError("the answer has nothing after '####'; GSM8K answers end with '#### <final answer>'")
    return _annotation_steps(body), final_answer


def _json_type(value: object) -> str:
    """Name a decoded JSON value's type as JSON does (for error messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _require_str(record: dict[str, Any], key: str, needed: str) -> str:
    """Return ``record[key]`` where it is a string, else raise SourceError naming the needed fields."""
    if key not in record:
        raise SourceError(f"field '{key}' is missing; each line needs {needed}")
    value = record[key]
    if not isinstance(value, str):
        kind = _json_type(value)
        raise SourceError(f"field '{key}' is a JSON {kind}, not a string; each line needs {needed}")
    return value


def _build_gsm8k(record: dict[str, Any], problem_id: str) -> Problem:
    """Build a Problem from one GSM8K record."""
    needed = "string fields 'question' and 'answer'"
    question = _require_str(record, "question", needed)
    steps, answer = parse_gsm8k_answer(_require_str(record, "answer", needed))
    return Problem(id=problem_id, question=question, steps=steps, answer=answer)


def _aug_answer(record: dict[str, Any], needed: str) -> str:
    """Return the GSM8K-Aug final answer as a string; JSON numbers are accepted and converted."""
    value = record.get("answer")
    # bool is an int subclass but no answer; NaN/Infinity fall through to the "not a string" error.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(value)
    answer = _normalise_answer(_require_str(record, "answer", needed))
    if not answer:
        raise SourceError(f"field 'answer' is empty; each line needs {needed}")
    return answer


def _build_aug(record: dict[str, Any], problem_id: str) -> Problem:
    """Build a Problem from one GSM8K-Aug record."""
    needed = "string fields 'question', 'cot' and 'answer'"
    question = _require_str(record, "question", needed)
    cot = _require_str(record, "cot", needed)
    # Aug CoTs are annotations "<<a=b>> <<c=d>>"; a CoT without them is read as space-separated steps.
    steps = _annotation_steps(cot) or cot.split()
    return Problem(id=problem_id, question=question, steps=steps, answer=_aug_answer(record, needed))


def build_problem(record: dict[str, Any], problem_id: str, kind: str) -> Problem:
    """Build a Problem from one decoded record, for readers of other containers (e.g. datasets dirs).

    Args:
        record: The record's fields, as a JSON line would decode.
        problem_id: The id to give the problem.
        kind: ``"gsm8k"`` (``question``, ``answer``) or ``"aug"`` (``question``, ``cot``, ``answer``).

    Returns:
        The problem.

    Raises:
        SourceError: The record is malformed (the message does not say where; callers add that).
    """
    return (_build_aug if kind == "aug" else _build_gsm8k)(record, problem_id)


def _unreadable(path: Path, exc: OSError) -> SourceError:
    """Describe an OS error while opening or reading ``path`` as a one-line SourceError."""
    return SourceError(f"{path} cannot be read ({exc.strerror or exc}); pass a readable JSONL file")


def _open_binary(path: Path) -> BinaryIO:
    """Open ``path`` for reading bytes, turning OS errors into one-line SourceErrors."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise SourceError(f"{path} not found; pass an existing JSONL file") from None
    except IsADirectoryError:
        raise SourceError(f"{path} is a directory; pass a JSONL file") from None
    except PermissionError:
        raise SourceError(
            f"{path} cannot be read (permission denied); fix its permissions or pass a readable copy"
        ) from None
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    """Decode one line as UTF-8 (a BOM is allowed on line 1)."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"{path}:{lineno}: not valid UTF-8 (bad byte at position {exc.start + 1} of the line); "
            "re-save the file as UTF-8"
        ) from None


def _parse_record(text: str, path: Path, lineno: int) -> dict[str, Any]:
    """Parse one non-blank line as a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); write one JSON object per line"
        ) from None
    except (ValueError, RecursionError) as exc:  # e.g. huge integers, absurdly deep nesting
        raise SourceError(
            f"{path}:{lineno}: not usable JSON ({type(exc).__name__}); write one JSON object per line"
        ) from None
    if not isinstance(value, dict):
        raise SourceError(
            f"{path}:{lineno}: expected a JSON object, got a JSON {_json_type(value)}; "
            "write one JSON object per line"
        )
    return value


def _check_limit(limit: int | None) -> None:
    """Reject a limit that would read nothing."""
    if limit is not None and limit < 1:
        raise ConfigError(
            f"limit must be a positive number of problems, got {limit}; pass limit >= 1 or None for all"
        )


def _read_jsonl(path: Path, limit: int | None, build: _RecordBuilder) -> list[Problem]:
    """Read problems from a JSONL file, one ``build`` call per non-blank line.

    Args:
        path: The JSONL file.
        limit: Stop after this many problems; None reads all.
        build: Turns a JSON object and its problem id into a Problem, raising SourceError
            (without location) for a malformed record.

    Returns:
        The problems, at least one.

    Raises:
        SourceError: The file cannot be read, a line is malformed, or it holds no problems.
        ConfigError: ``limit`` is below 1.
    """
    _check_limit(limit)
    problems: list[Problem] = []
    with _open_binary(path) as handle:
        try:
            for index, raw in enumerate(handle):
                if limit is not None and len(problems) >= limit:
                    break
                lineno = index + 1
                text = _decode_line(raw, path, lineno)
                if not text.strip(_JSON_WHITESPACE):
                    continue
                record = _parse_record(text, path, lineno)
                try:
                    problems.append(build(record, f"{path.stem}-{index}"))
                except SourceError as exc:
                    raise SourceError(f"{path}:{lineno}: {exc}") from None
        except OSError as exc:
            raise _unreadable(path, exc) from None
    if not problems:
        raise SourceError(f"{path} holds no problems; pass a JSONL file with one JSON object per line")
    return problems


def read_gsm8k(path: Path, limit: int | None = None) -> list[Problem]:
    """Read a GSM8K JSONL file (``{"question", "answer"}`` per line).

    Args:
        path: The JSONL file, e.g. ``data/gsm8k/train.jsonl``.
        limit: Stop after this many problems; None reads all.

    Returns:
        The problems; steps are the calculator annotations, answer the text after ``####``.

    Raises:
        SourceError: The file is missing, unreadable or malformed (message names file and line),
            or holds no problems.
        ConfigError: ``limit`` is below 1.
    """
    return _read_jsonl(Path(path), limit, _build_gsm8k)


def read_aug(path: Path, limit: int | None = None) -> list[Problem]:
    """Read a GSM8K-Aug JSONL file (``{"question", "cot", "answer"}`` per line).

    Args:
        path: The JSONL file.
        limit: Stop after this many problems; None reads all.

    Returns:
        The problems; steps are the ``<<...>>`` contents of ``cot`` (else ``cot`` split on
        whitespace), answer the ``answer`` field as a string.

    Raises:
        SourceError: The file is missing, unreadable or malformed (message names file and line),
            or holds no problems.
        ConfigError: ``limit`` is below 1.
    """
    return _read_jsonl(Path(path), limit, _build_aug)
