"""Tests for ctexp.data.sources.gsm8k: GSM8K and GSM8K-Aug JSONL readers."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctexp.data.sources.gsm8k import parse_gsm8k_answer, read_aug, read_gsm8k
from ctexp.data.sources.spec import EVERY_SOURCE, SourceKind, SourceSpec, read_problems
from ctexp.errors import ConfigError, SourceError

TRAIN = Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k/train.jsonl"

GOOD_GSM8K = {
    "question": "Natalia sold 48 clips ... How many altogether?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72",
}
GOOD_AUG = {"question": "What is 10% of 600?", "cot": "<<600*10/100=60>>", "answer": "60"}


def write_lines(path: Path, lines: list[str | dict[str, object]]) -> Path:
    """Write JSONL lines (dicts are dumped, strings written verbatim) and return the path."""
    text = "".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


# --- parse_gsm8k_answer ------------------------------------------------------------------------


def test_parse_answer_steps_and_final() -> None:
    assert parse_gsm8k_answer(GOOD_GSM8K["answer"]) == (["48/2=24", "48+24=72"], "72")


def test_parse_answer_thousands_commas() -> None:
    assert parse_gsm8k_answer("So <<500*2=1000>>1,000 in all.\n#### 1,000") == (["500*2=1000"], "1000")
    assert parse_gsm8k_answer("#### 2,520,000")[1] == "2520000"


def test_parse_answer_without_annotations() -> None:
    assert parse_gsm8k_answer("She has 5 left.\n#### 5") == ([], "5")


@pytest.mark.parametrize(
    ("answer", "what"), [("no marker here", "no '####'"), ("text\n####   ", "nothing after")]
)
def test_parse_answer_errors(answer: str, what: str) -> None:
    with pytest.raises(SourceError, match=what):
        parse_gsm8k_answer(answer)


# --- the real GSM8K train file -----------------------------------------------------------------


@pytest.mark.skipif(not TRAIN.is_file(), reason=f"GSM8K train file absent at {TRAIN}")
def test_real_train_file() -> None:
    problems = read_gsm8k(TRAIN)
    assert len(problems) == 7473
    first = problems[0]
    assert first.id == "train-0"
    assert first.steps == ["48/2=24", "48+24=72"]
    assert first.answer == "72"
    assert problems[-1].id == "train-7472"
    assert all("," not in problem.answer for problem in problems)
    assert read_problems(f"gsm8k:{TRAIN}", limit=5) == problems[:5]


# --- good files --------------------------------------------------------------------------------


def test_read_gsm8k_ids_skip_blank_lines_and_limit(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "test.jsonl", [GOOD_GSM8K, "", "  \t", GOOD_GSM8K, GOOD_GSM8K])
    problems = read_gsm8k(path)
    assert [problem.id for problem in problems] == ["test-0", "test-3", "test-4"]
    assert [problem.id for problem in read_gsm8k(path, limit=2)] == ["test-0", "test-3"]


def test_read_gsm8k_accepts_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_GSM8K).encode() + b"\r\n")
    assert read_gsm8k(path)[0].answer == "72"


def test_read_aug(tmp_path: Path) -> None:
    records = [
        {"question": "q1", "cot": "<<600*30/100=180>> <<600*10/100=60>>", "answer": "240"},
        {"question": "q2", "cot": "4-1=3 3*5=15", "answer": 15},
        {"question": "q3", "cot": "", "answer": " 1,000 "},
        {"question": "q4", "cot": "<<1+1=2>>", "answer": 10**400},
    ]
    problems = read_aug(write_lines(tmp_path / "aug.jsonl", records))
    expected_steps = [["600*30/100=180", "600*10/100=60"], ["4-1=3", "3*5=15"], [], ["1+1=2"]]
    assert [problem.steps for problem in problems] == expected_steps
    assert [problem.answer for problem in problems] == ["240", "15", "1000", "1" + "0" * 400]
    assert problems[0].cot_text == "600*30/100=180 600*10/100=60"
    assert [problem.id for problem in problems] == ["aug-0", "aug-1", "aug-2", "aug-3"]


def test_read_problems_dispatch(tmp_path: Path) -> None:
    gsm = write_lines(tmp_path / "g.jsonl", [GOOD_GSM8K])
    aug = write_lines(tmp_path / "a.jsonl", [GOOD_AUG])
    assert read_problems(f"gsm8k:{gsm}")[0].steps == ["48/2=24", "48+24=72"]
    assert read_problems(SourceSpec.parse(f"aug:{aug}"))[0].steps == ["600*10/100=60"]


# --- errors ------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"
    with pytest.raises(SourceError, match=r"absent\.jsonl not found; pass an existing JSONL file"):
        read_gsm8k(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="is a directory"):
        read_aug(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "locked.jsonl", [GOOD_GSM8K])
    path.chmod(0)
    try:
        with pytest.raises(SourceError, match="permission denied"):
            read_gsm8k(path)
    finally:
        path.chmod(0o644)


def test_permission_error_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Works as root too, where chmod cannot make a file unreadable.
    path = write_lines(tmp_path / "locked.jsonl", [GOOD_GSM8K])

    def deny(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", deny)
    with pytest.raises(SourceError, match=r"locked\.jsonl cannot be read \(permission denied\)"):
        read_gsm8k(path)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", r":3: not valid JSON"),
        ("[1, 2]", r":3: expected a JSON object, got a JSON array"),
        ('"text"', r":3: expected a JSON object, got a JSON string"),
        ("null", r":3: expected a JSON object, got a JSON null"),
        ("\x0c", r":3: not valid JSON"),
        ('{"answer": "#### 1"}', r":3: field 'question' is missing"),
        ('{"question": 5, "answer": "#### 1"}', r":3: field 'question' is a JSON number, not a string"),
        ('{"question": "q"}', r":3: field 'answer' is missing"),
        ('{"question": "q", "answer": 72}', r":3: field 'answer' is a JSON number, not a string"),
        ('{"question": "q", "answer": "<<1+1=2>>2"}', r":3: the answer has no '####' marker"),
        ("[" * 100_000, r":3: not (valid|usable) JSON"),
    ],
)
def test_gsm8k_line_errors(tmp_path: Path, bad_line: str, message: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [GOOD_GSM8K, "", bad_line, GOOD_GSM8K])
    with pytest.raises(SourceError, match=rf"bad\.jsonl{message}") as info:
        read_gsm8k(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("bad_record", "message"),
    [
        ({"question": "q", "answer": "1"}, r":2: field 'cot' is missing"),
        ({"question": "q", "cot": ["a"], "answer": "1"}, r":2: field 'cot' is a JSON array, not a string"),
        ({"question": "q", "cot": "", "answer": None}, r":2: field 'answer' is a JSON null, not a string"),
        ({"question": "q", "cot": "", "answer": True}, r":2: field 'answer' is a JSON boolean, not a string"),
        ({"question": "q", "cot": "", "answer": "  "}, r":2: field 'answer' is empty"),
        ({"cot": "", "answer": "1"}, r":2: field 'question' is missing"),
        (
            {"question": "q", "cot": "", "answer": float("nan")},
            r":2: field 'answer' is a JSON number, not a string",
        ),
    ],
)
def test_aug_record_errors(tmp_path: Path, bad_record: dict[str, object], message: str) -> None:
    path = write_lines(tmp_path / "aug.jsonl", [GOOD_AUG, bad_record])
    with pytest.raises(SourceError, match=rf"aug\.jsonl{message}"):
        read_aug(path)


def test_non_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    latin1_line = '{"question": "caf\xe9"}'.encode("latin-1")
    path.write_bytes(json.dumps(GOOD_GSM8K).encode() + b"\n" + latin1_line + b"\n")
    with pytest.raises(SourceError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        read_gsm8k(path)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_file_without_problems(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(SourceError, match="holds no problems"):
        read_gsm8k(path)


def test_limit_must_be_positive(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "g.jsonl", [GOOD_GSM8K])
    with pytest.raises(ConfigError, match="limit must be a positive"):
        read_gsm8k(path, limit=0)


def test_limit_stops_before_bad_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "g.jsonl", [GOOD_GSM8K, "{broken"])
    assert len(read_gsm8k(path, limit=1)) == 1


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("world", SourceSpec(kind=SourceKind.WORLD)),
        ("store:~/s", SourceSpec(kind=SourceKind.STORE, path=Path("~/s").expanduser())),
        ("gsm8k:data/a:b.jsonl", SourceSpec(kind=SourceKind.GSM8K, path=Path("data/a:b.jsonl"))),
        ("aug:x.jsonl", SourceSpec(kind=SourceKind.AUG, path=Path("x.jsonl"))),
        ("hf:d/test", SourceSpec(kind=SourceKind.HF, path=Path("d/test"))),
    ],
)
def test_source_spec_parses_every_kind(text: str, spec: SourceSpec) -> None:
    assert SourceSpec.parse(text, EVERY_SOURCE) == spec
    assert SourceSpec.parse(str(spec), EVERY_SOURCE) == spec


@pytest.mark.parametrize("spec", ["GSM8K:/x", "/data/train.jsonl", "json:x.jsonl", "worlds"])
def test_unknown_source_spec(spec: str) -> None:
    with pytest.raises(SourceError, match=r"^unknown source spec .*; use 'gsm8k:PATH', 'aug:PATH' or 'hf:DIR'$"):
        SourceSpec.parse(spec)


@pytest.mark.parametrize("spec", ["store:/tmp/x", "store", "world", "hf:d"])
def test_source_spec_of_a_kind_the_caller_does_not_read(spec: str) -> None:
    with pytest.raises(SourceError, match=r"cannot be read here; use 'gsm8k:PATH' or 'aug:PATH'$"):
        SourceSpec.parse(spec, (SourceKind.GSM8K, SourceKind.AUG))


@pytest.mark.parametrize(("spec", "what"), [("gsm8k:", "file"), ("aug:", "file"), ("hf:", "directory"),
                                            ("store:", "directory")])
def test_source_spec_without_path(spec: str, what: str) -> None:
    with pytest.raises(SourceError, match=f"names no {what}; use 'world', 'store:DIR', "):
        SourceSpec.parse(spec, EVERY_SOURCE)


def test_world_takes_no_path() -> None:
    with pytest.raises(SourceError, match="world takes no path"):
        SourceSpec.parse("world:x", EVERY_SOURCE)


# --- fuzz --------------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.just(10**400), st.floats(), st.text(max_size=20)
)
RECORDS = st.dictionaries(
    st.sampled_from(["question", "answer", "cot", "extra"]),
    st.one_of(JSON_SCALARS, st.just("a <<1+1=2>> b #### 2"), st.lists(JSON_SCALARS, max_size=3)),
)
LINES = st.lists(
    st.one_of(
        st.text(max_size=40),
        RECORDS.map(json.dumps),
        st.binary(max_size=20).map(lambda data: data.decode("latin-1")),
    ),
    max_size=6,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=LINES, raw=st.binary(max_size=30))
def test_fuzz_only_source_errors(lines: list[str], raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.jsonl"
        path.write_bytes("\n".join(lines).encode("utf-8", errors="surrogatepass") + raw)
        for reader in (read_gsm8k, read_aug):
            try:
                problems = reader(path)
            except SourceError as exc:
                assert "\n" not in str(exc)
            else:
                assert problems and all(isinstance(problem.answer, str) for problem in problems)
