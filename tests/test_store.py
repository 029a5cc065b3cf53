"""Tests for the activation store (ctexp.data.store) and the synthetic world writer (``ctexp world``)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ctexp.cli import app
from ctexp.config import WorldConfig
from ctexp.data.sources.world import build_world
from ctexp.data.store import content_hash, head_tensors, load_store
from ctexp.data.tokenizers import BuiltinTokenizer
from ctexp.errors import StoreError
from tests.conftest import assert_one_line_error

PROBLEMS, LAYERS, HIDDEN, POSITIONS = 50, 2, 16, 6
WORLD_ARGS = ["--problems", str(PROBLEMS), "--layers", str(LAYERS), "--hidden", str(HIDDEN)]
STORE_FILES = {"meta.json", "hidden.safetensors", "head.safetensors", "problems.jsonl"}

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def write_world(out: Path, *extra: str):
    return invoke("world", "--out", str(out), *WORLD_ARGS, *extra)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def file_bytes(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


@pytest.fixture(scope="module")
def base_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base") / "world"
    result = write_world(out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def store_copy(base_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(base_store, copy)
    return copy


# --- writing -----------------------------------------------------------------------------------


def test_world_writes_store_files(tmp_path: Path) -> None:
    out = tmp_path / "w"
    result = write_world(out)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    meta = json.loads((out / "meta.json").read_text())
    assert {p.name for p in out.iterdir()} == STORE_FILES
    assert str(out) in result.stdout and meta["content_hash"] in result.stdout
    assert f"{PROBLEMS} problems" in result.stdout
    assert meta["format"] == "ctexp-store" and meta["version"] == 1
    assert (meta["n_problems"], meta["n_states"], meta["n_positions"], meta["hidden"]) == (
        PROBLEMS, LAYERS + 1, POSITIONS, HIDDEN,
    )
    assert meta["vocab"] == BuiltinTokenizer().vocab_size and meta["tokenizer"] == "builtin"
    assert meta["dtype"] == "float32" and meta["norm"]["kind"] == "rmsnorm"
    assert len(meta["content_hash"]) == 16
    assert len((out / "problems.jsonl").read_text().splitlines()) == PROBLEMS
    assert leftovers(tmp_path) == []


def test_world_json_prints_meta(tmp_path: Path) -> None:
    out = tmp_path / "w"
    result = write_world(out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((out / "meta.json").read_text())


def test_load_round_trips_the_world(base_store: Path) -> None:
    built = build_world(WorldConfig(problems=PROBLEMS, layers=LAYERS, hidden=HIDDEN))
    store = load_store(base_store)
    assert store.path == base_store
    assert store.meta.model_dump() == built.meta.model_dump()
    assert store.hidden.shape == (PROBLEMS, LAYERS + 1, POSITIONS + 1, HIDDEN)
    assert store.hidden.dtype == torch.float32
    assert torch.equal(store.hidden, built.hidden)
    assert torch.equal(store.norm_weight, built.norm_weight)
    assert store.norm_bias is None and built.norm_bias is None
    assert torch.equal(store.unembed, built.unembed)
    assert store.problems == built.problems
    assert [p.id for p in store.problems] == [f"world-{i}" for i in range(PROBLEMS)]
    assert store.bot_index == POSITIONS
    # The recorded hash is the hash of what was read back.
    assert content_hash(store.hidden, head_tensors(store), store.problems) == store.meta.content_hash


def test_content_hash_stable_and_seed_dependent(tmp_path: Path) -> None:
    hashes = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert write_world(tmp_path / name, "--seed", seed).exit_code == 0
        hashes[name] = json.loads((tmp_path / name / "meta.json").read_text())["content_hash"]
    assert hashes["a"] == hashes["b"]
    assert hashes["a"] != hashes["c"]
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    assert not torch.equal(load_store(tmp_path / "a").hidden, load_store(tmp_path / "c").hidden)


def test_existing_store_is_kept_without_force(tmp_path: Path) -> None:
    out = tmp_path / "w"
    assert write_world(out).exit_code == 0
    before = file_bytes(out)
    result = write_world(out, "--seed", "1")
    assert_one_line_error(result, 3, str(out), "--force")
    assert file_bytes(out) == before
    load_store(out)
    assert leftovers(tmp_path) == []


def test_existing_non_store_directory_is_kept_without_force(tmp_path: Path) -> None:
    out = tmp_path / "w"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_one_line_error(write_world(out), 3, "already exists")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_empty_directory_is_written_into(tmp_path: Path) -> None:
    out = tmp_path / "w"
    out.mkdir()
    assert write_world(out).exit_code == 0
    assert {p.name for p in out.iterdir()} == STORE_FILES


def test_force_replaces_store(tmp_path: Path) -> None:
    out = tmp_path / "w"
    assert write_world(out).exit_code == 0
    (out / "stale.txt").write_text("from before")
    old_hash = json.loads((out / "meta.json").read_text())["content_hash"]
    result = write_world(out, "--seed", "1", "--force")
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["content_hash"] != old_hash
    assert "seed=1" in meta["model"]
    assert {p.name for p in out.iterdir()} == STORE_FILES  # replaced, not merged
    assert load_store(out).meta.content_hash == meta["content_hash"]
    assert leftovers(tmp_path) == []


def test_nested_out_directory_is_created(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "w"
    assert write_world(out).exit_code == 0
    assert {p.name for p in out.iterdir()} == STORE_FILES
    assert leftovers(out.parent) == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--problems", "5"], "problems"),
        (["--hidden", "4"], "hidden"),
        (["--layers", "0"], "layers"),
        (["--positions", "0"], "positions"),
        (["--noise", "-1"], "noise"),
    ],
)
def test_world_rejects_bad_sizes(tmp_path: Path, args: list[str], fragment: str) -> None:
    out = tmp_path / "w"
    result = invoke("world", "--out", str(out), *args)
    assert_one_line_error(result, 2, "invalid world", fragment)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# --- planted truth -----------------------------------------------------------------------------


def test_planted_truth_in_meta(base_store: Path) -> None:
    meta = json.loads((base_store / "meta.json").read_text())
    truth = meta["truth"]
    n_states = LAYERS + 1
    assert truth["layer_signal"] == [0.35, 0.675, 1.0]  # linear from 0.35 to 1.0
    assert len(truth["layer_signal"]) == n_states
    assert truth["position_signal"] == [0.35, 0.6, 0.95, 1.0, 0.55, 0.7]
    assert max(range(POSITIONS), key=truth["position_signal"].__getitem__) == 3
    assert truth["rotated_positions"] == [1, 3, 4]
    assert meta["normed_states"] == [n_states - 1]


def test_last_state_is_normed(base_store: Path) -> None:
    store = load_store(base_store)
    last = store.meta.normed_states[-1]
    assert last == store.meta.n_states - 1
    rms = (store.hidden / store.norm_weight).pow(2).mean(-1).sqrt()  # (P, S, T+1)
    assert torch.allclose(rms[:, last], torch.ones_like(rms[:, last]), atol=1e-3)  # bot slot included
    for state in range(store.meta.n_states):
        if state not in store.meta.normed_states:
            assert (rms[:, state] - 1).abs().max() > 0.1  # the other states are not normed
    # The norm weight is a scale around 1, so normed vectors have RMS ~ that scale.
    raw_rms = store.hidden[:, last].pow(2).mean(-1).sqrt()
    scale = store.norm_weight.pow(2).mean().sqrt()
    assert torch.allclose(raw_rms, torch.full_like(raw_rms, float(scale)), rtol=0.2)


# --- loading broken stores ---------------------------------------------------------------------


def _rewrite_meta(store: Path, **changes: object) -> None:
    meta = json.loads((store / "meta.json").read_text())
    meta.update(changes)
    (store / "meta.json").write_text(json.dumps(meta))


def _truncate(name: str, keep: Callable[[int], int]) -> Callable[[Path], None]:
    def corrupt(store: Path) -> None:
        data = (store / name).read_bytes()
        (store / name).write_bytes(data[: keep(len(data))])

    return corrupt


def _remove_store(store: Path) -> None:
    shutil.rmtree(store)


def _delete(name: str) -> Callable[[Path], None]:
    return lambda store: (store / name).unlink()


def _wrong_hidden_size_unembedding(store: Path) -> None:
    head = load_file(str(store / "head.safetensors"))
    head["unembed.weight"] = torch.zeros(head["unembed.weight"].shape[0], HIDDEN + 1)
    save_file(head, str(store / "head.safetensors"))


def _wrong_norm_weight(store: Path) -> None:
    head = load_file(str(store / "head.safetensors"))
    head["norm.weight"] = torch.ones(HIDDEN - 1)
    save_file(head, str(store / "head.safetensors"))


def _missing_unembedding(store: Path) -> None:
    head = load_file(str(store / "head.safetensors"))
    del head["unembed.weight"]
    save_file(head, str(store / "head.safetensors"))


def _poison_hidden(value: float) -> Callable[[Path], None]:
    def corrupt(store: Path) -> None:
        hidden = load_file(str(store / "hidden.safetensors"))["hidden"]
        hidden[3, 1, 2, 5] = value
        save_file({"hidden": hidden}, str(store / "hidden.safetensors"))

    return corrupt


def _float16_hidden(store: Path) -> None:
    hidden = load_file(str(store / "hidden.safetensors"))["hidden"]
    save_file({"hidden": hidden.half()}, str(store / "hidden.safetensors"))


def _malformed_problem_line(text: str) -> Callable[[Path], None]:
    def corrupt(store: Path) -> None:
        lines = (store / "problems.jsonl").read_text().splitlines()
        lines[2] = text
        (store / "problems.jsonl").write_text("\n".join(lines) + "\n")

    return corrupt


def _drop_last_problem(store: Path) -> None:
    lines = (store / "problems.jsonl").read_text().splitlines()
    (store / "problems.jsonl").write_text("\n".join(lines[:-1]) + "\n")


BROKEN = {
    "missing dir": (_remove_store, ["not found"]),
    "missing meta.json": (_delete("meta.json"), ["meta.json", "not found"]),
    "missing head": (_delete("head.safetensors"), ["head.safetensors", "not found"]),
    "missing problems": (_delete("problems.jsonl"), ["problems.jsonl", "not found"]),
    "meta.json not JSON": (lambda s: (s / "meta.json").write_text("{"), ["meta.json", "unreadable"]),
    "meta.json bad field": (lambda s: _rewrite_meta(s, hidden="wide"), ["meta.json", "hidden"]),
    "meta.json unknown key": (lambda s: _rewrite_meta(s, colour="blue"), ["meta.json", "colour"]),
    "hidden truncated to 4 bytes": (_truncate("hidden.safetensors", lambda n: 4), ["hidden.safetensors", "truncated"]),
    "hidden truncated to half": (
        _truncate("hidden.safetensors", lambda n: n // 2), ["hidden.safetensors", "truncated"]
    ),
    "hidden truncated by 1 byte": (_truncate("hidden.safetensors", lambda n: n - 1), ["hidden.safetensors"]),
    "hidden empty": (_truncate("hidden.safetensors", lambda n: 0), ["hidden.safetensors"]),
    "head truncated": (_truncate("head.safetensors", lambda n: n // 2), ["head.safetensors", "truncated"]),
    "hidden shape vs meta": (
        lambda s: _rewrite_meta(s, n_problems=PROBLEMS - 1), ["hidden states have shape", "meta.json"]
    ),
    "hidden dtype vs meta": (_float16_hidden, ["float16", "float32"]),
    "unembedding hidden size": (_wrong_hidden_size_unembedding, ["unembedding has shape", f"hidden size is {HIDDEN}"]),
    "norm weight size": (_wrong_norm_weight, ["norm.weight"]),
    "unembedding missing": (_missing_unembedding, ["head.safetensors", "unembed.weight"]),
    "NaN in hidden": (_poison_hidden(math.nan), ["hidden states", "NaN"]),
    "inf in hidden": (_poison_hidden(math.inf), ["hidden states", "infinite"]),
    "problems line not JSON": (_malformed_problem_line("{not json"), ["problems.jsonl:3:"]),
    "problems line not a problem": (_malformed_problem_line('{"id": "x"}'), ["problems.jsonl:3:"]),
    "problems count vs meta": (_drop_last_problem, ["problems.jsonl", f"{PROBLEMS - 1} problems"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_load_broken_store(store_copy: Path, case: str) -> None:
    corrupt, fragments = BROKEN[case]
    corrupt(store_copy)
    with pytest.raises(StoreError) as caught:
        load_store(store_copy)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("case", list(BROKEN))
def test_run_on_broken_store(store_copy: Path, tmp_path: Path, case: str) -> None:
    corrupt, fragments = BROKEN[case]
    corrupt(store_copy)
    home = tmp_path / "home"
    home.mkdir()
    result = invoke("run", "--store", str(store_copy), "--epochs", "1", "--home", str(home), "--device", "cpu")
    assert_one_line_error(result, 3, *fragments)
    assert list(home.iterdir()) == []  # no runs/ entry, nothing at all


def test_align_on_broken_store(store_copy: Path) -> None:
    _truncate("hidden.safetensors", lambda n: n // 2)(store_copy)
    result = invoke("align", "--source", f"store:{store_copy}", "--format", "jsonl")
    assert_one_line_error(result, 3, "hidden.safetensors")


def test_align_on_store_uses_its_problems(base_store: Path) -> None:
    result = invoke("align", "--source", f"store:{base_store}", "--format", "jsonl", "--limit", "5")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    problems = load_store(base_store).problems[:5]
    assert [r["id"] for r in records] == [p.id for p in problems]
    tokenizer = BuiltinTokenizer()  # the store's tokenizer
    for record, problem in zip(records, problems, strict=True):
        assert record["token_ids"] == tokenizer.encode(problem.cot_text)
        assert len(record["positions"]) == POSITIONS


def test_force_on_current_directory_never_loses_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "sub"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    monkeypatch.chdir(target)
    result = invoke("world", "--out", ".", *WORLD_ARGS, "--force")
    assert "Traceback" not in result.output
    if result.exit_code == 0:  # replaced, as --force asks
        assert {p.name for p in target.iterdir()} == STORE_FILES
        load_store(target)
    else:  # or refused, leaving the directory as it was
        assert (target / "notes.txt").read_text() == "precious"
    assert leftovers(tmp_path) == [] and leftovers(target) == []
