"""The store's contract under hostile input: every meta.json field and head tensor is validated as
strictly as the hidden states, a store file that is not a regular file is refused before it is opened,
and every refusal is exit 3, one line, no traceback and nothing written."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ctexp.cli import app
from tests.conftest import assert_one_line_error

WORLD = ["--problems", "40", "--layers", "2", "--hidden", "8"]
PROPERTY = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def base_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("contract") / "world"
    result = CliRunner().invoke(app, ["world", "--out", str(out), *WORLD])
    assert result.exit_code == 0, result.output
    return out


def copy_of(base: Path, parent: Path) -> Path:
    if parent.exists():
        shutil.rmtree(parent)
    parent.mkdir(parents=True)
    return Path(shutil.copytree(base, parent / "store"))


def run_on(store: Path, home: Path):
    """``ctexp run`` on the store; the home must stay empty whatever happens before training."""
    home.mkdir(parents=True, exist_ok=True)
    return CliRunner().invoke(app, ["run", "--store", str(store), "--epochs", "1", "--home", str(home), "--device", "cpu"])


def assert_refused(store: Path, home: Path, *fragments: str) -> str:
    line = assert_one_line_error(run_on(store, home), 3, *fragments)
    assert list(home.iterdir()) == []  # no run directory, no database, no MLflow store
    return line


def rewrite_meta(store: Path, **fields: object) -> None:
    meta = json.loads((store / "meta.json").read_text())
    meta.update(fields)
    (store / "meta.json").write_text(json.dumps(meta))  # json writes NaN / Infinity literals as given


def rewrite_nested(store: Path, outer: str, **fields: object) -> None:
    meta = json.loads((store / "meta.json").read_text())
    meta[outer] = {**meta[outer], **fields}
    (store / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(("change", "fragments"), [
    ({"version": 2}, ["version", "store format 1"]),
    ({"version": "1"}, ["version"]),
    ({"n_problems": "40"}, ["n_problems", "integer"]),
    ({"n_problems": 40.0}, ["n_problems", "integer"]),
    ({"hidden": True}, ["hidden", "integer"]),
    ({"n_positions": 0}, ["n_positions"]),
    ({"vocab": -3}, ["vocab"]),
    ({"dtype": "int8"}, ["dtype"]),
    ({"tokenizer": ""}, ["tokenizer"]),
    ({"normed_states": [2, 2]}, ["normed_states", "twice"]),
])
def test_meta_fields_are_checked_strictly(base_store: Path, tmp_path: Path, change: dict, fragments: list[str]) -> None:
    store = copy_of(base_store, tmp_path / "s")
    rewrite_meta(store, **change)
    assert_refused(store, tmp_path / "home", "meta.json" if "twice" not in fragments else "", *fragments)


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), 0.0, -1e-5, "1e-5", 5.0])
def test_norm_epsilon_must_be_a_small_positive_finite_number(base_store: Path, tmp_path: Path, eps: object) -> None:
    store = copy_of(base_store, tmp_path / "s")
    rewrite_nested(store, "norm", eps=eps)
    assert_refused(store, tmp_path / "home", "norm.eps")


@pytest.mark.parametrize("name", ["norm.weight", "unembed.weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_head_tensors_must_be_finite(base_store: Path, tmp_path: Path, name: str, bad: float) -> None:
    store = copy_of(base_store, tmp_path / "s")
    head = load_file(str(store / "head.safetensors"))
    head[name].view(-1)[0] = bad
    save_file(head, str(store / "head.safetensors"))
    assert_refused(store, tmp_path / "home", "NaN or infinite")


def test_duplicate_problem_ids(base_store: Path, tmp_path: Path) -> None:
    store = copy_of(base_store, tmp_path / "s")
    lines = (store / "problems.jsonl").read_text().splitlines()
    second = json.loads(lines[1])
    second["id"] = json.loads(lines[0])["id"]
    lines[1] = json.dumps(second)
    (store / "problems.jsonl").write_text("\n".join(lines) + "\n")
    assert_refused(store, tmp_path / "home", "appears twice")


@pytest.mark.parametrize("name", ["meta.json", "hidden.safetensors", "head.safetensors", "problems.jsonl"])
def test_a_fifo_in_place_of_a_store_file_is_refused_without_blocking(
    base_store: Path, tmp_path: Path, name: str
) -> None:
    store = copy_of(base_store, tmp_path / "s")
    (store / name).unlink()
    os.mkfifo(store / name)
    home = tmp_path / "home"
    home.mkdir()
    # A process of its own with a timeout: a regression would block on open() for ever.
    done = subprocess.run(
        [sys.executable, "-m", "ctexp.cli", "run", "--store", str(store), "--home", str(home), "--epochs", "1"],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [(f"Error: {store / name} is a FIFO, not a regular file; "
                                        "a store holds plain files (re-create it)")]
    assert list(home.iterdir()) == []


# --- properties: any value in any meta.json field or head tensor --------------------------------------

def _json_values() -> st.SearchStrategy[object]:
    scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=8)
               | st.floats(allow_nan=True, allow_infinity=True))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                               max_size=3), max_leaves=6)


META_FIELDS = ["format", "version", "n_problems", "n_states", "n_positions", "hidden", "vocab", "dtype",
               "normed_states", "norm", "norm.kind", "norm.eps"]


def _positive_finite(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and 0 < value <= 1


def is_valid(field: str, value: object, meta: dict) -> bool:
    """Whether ``value`` in ``field`` still describes this store correctly (the oracle of the property)."""
    if field == "normed_states":
        return (isinstance(value, list) and all(type(i) is int and 0 <= i < meta["n_states"] for i in value)
                and len(set(value)) == len(value))
    if field == "norm":
        return (isinstance(value, dict) and set(value) <= {"kind", "eps"}
                and value.get("kind", "rmsnorm") == meta["norm"]["kind"] == "rmsnorm"
                and _positive_finite(value.get("eps", 1e-5)))
    if field == "norm.eps":
        return _positive_finite(value)
    outer, _, inner = field.partition(".")
    current = meta[outer][inner] if inner else meta[outer]
    return value == current and type(value) is type(current)


@PROPERTY
@given(field=st.sampled_from(META_FIELDS), value=_json_values())
def test_any_wrong_meta_value_is_exit_3_and_writes_nothing(base_store: Path, tmp_path: Path, field: str,
                                                           value: object) -> None:
    store = copy_of(base_store, tmp_path / "s")
    original = json.loads((store / "meta.json").read_text())
    outer, _, inner = field.partition(".")
    if is_valid(field, value, original):
        return  # not every random value is wrong: the contract is about the wrong ones
    if inner:
        rewrite_nested(store, outer, **{inner: value})
    else:
        rewrite_meta(store, **{outer: value})
    if field == "norm.kind" and value == "layernorm":
        fragments: tuple[str, ...] = ("norm.bias",)  # a valid kind that this head cannot serve
    else:
        fragments = ()
    home = tmp_path / "home"
    if home.exists():
        shutil.rmtree(home)
    assert_refused(store, home, *fragments)


@PROPERTY
@given(name=st.sampled_from(["norm.weight", "unembed.weight"]),
       value=st.sampled_from([math.nan, math.inf, -math.inf]) | st.floats(allow_nan=True, allow_infinity=True, width=32),
       index=st.integers(0, 10**6), shape_change=st.sampled_from([None, 1, -1]), dtype=st.sampled_from([None, torch.int64]))
def test_any_bad_head_tensor_is_exit_3_and_writes_nothing(
    base_store: Path, tmp_path: Path, name: str, value: float, index: int, shape_change: int | None,
    dtype: torch.dtype | None,
) -> None:
    if math.isfinite(value) and shape_change is None and dtype is None:
        return  # a finite value of the right shape and dtype is a valid head
    store = copy_of(base_store, tmp_path / "s")
    head = load_file(str(store / "head.safetensors"))
    tensor = head[name].clone()
    tensor.view(-1)[index % tensor.numel()] = value
    if shape_change is not None:  # one row more or fewer along the first axis
        tensor = torch.cat([tensor, tensor[:1]]) if shape_change > 0 else tensor[1:]
    if dtype is not None:
        tensor = torch.nan_to_num(tensor).to(dtype)
    head[name] = tensor.contiguous()
    save_file(head, str(store / "head.safetensors"))
    home = tmp_path / "home"
    if home.exists():
        shutil.rmtree(home)
    assert_refused(store, home)
