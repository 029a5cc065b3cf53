"""Property-based tests: store round trips and a fuzz of the config loader."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctexp.config import ExperimentConfig, build_config, to_toml
from ctexp.data.problems import Problem
from ctexp.data.store import NormSpec, Store, StoreMeta, load_store, write_store
from ctexp.errors import ConfigError

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])


@st.composite
def stores(draw: st.DrawFn) -> Store:
    n_problems = draw(st.integers(1, 4))
    n_states = draw(st.integers(1, 3))
    n_positions = draw(st.integers(1, 4))
    hidden = draw(st.integers(1, 6))
    vocab = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(["float32", "bfloat16"]))
    layernorm = draw(st.booleans())
    finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    values = draw(st.lists(finite, min_size=n_problems * n_states * (n_positions + 1) * hidden,
                           max_size=n_problems * n_states * (n_positions + 1) * hidden))
    hidden_states = torch.tensor(values).view(n_problems, n_states, n_positions + 1, hidden).to(getattr(torch, dtype))
    text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
    problems = [
        Problem(id=f"p{i}", question=draw(text), steps=draw(st.lists(text, max_size=3)), answer=draw(text),
                predicted=draw(st.none() | text), correct=draw(st.none() | st.booleans()))
        for i in range(n_problems)
    ]
    meta = StoreMeta(
        model="hypothesis", n_problems=n_problems, n_states=n_states, n_positions=n_positions, hidden=hidden,
        vocab=vocab, dtype=dtype, tokenizer="builtin", norm=NormSpec(kind="layernorm" if layernorm else "rmsnorm"),
        normed_states=draw(st.lists(st.integers(0, n_states - 1), unique=True, max_size=n_states)),
    )
    return Store(meta, hidden_states, torch.randn(hidden), torch.randn(hidden) if layernorm else None,
                 torch.randn(vocab, hidden), problems)


@PROPERTY_SETTINGS
@given(store=stores())
def test_store_round_trip(store: Store) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = write_store(store, Path(directory) / "store")
        loaded = load_store(path)
    assert torch.equal(loaded.hidden, store.hidden) and loaded.hidden.dtype == store.hidden.dtype
    assert torch.equal(loaded.unembed, store.unembed) and torch.equal(loaded.norm_weight, store.norm_weight)
    assert (loaded.norm_bias is None) == (store.norm_bias is None)
    assert loaded.problems == store.problems
    assert loaded.meta.model_copy(update={"content_hash": ""}) == store.meta
    assert len(loaded.meta.content_hash) == 16


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
known_keys = st.sampled_from(sorted(ExperimentConfig.model_fields) + ["train", "world", "search", "bogus"])


@PROPERTY_SETTINGS
@given(data=st.dictionaries(known_keys | st.text(max_size=8), json_values, max_size=6))
def test_config_loader_fuzz_gives_a_config_or_one_config_error(data: dict) -> None:
    try:
        config = build_config(None, data)
    except ConfigError as error:
        assert "\n" not in str(error)
        return
    # A config that loads survives TOML and back unchanged.
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.toml"
        path.write_text(to_toml(config))
        assert build_config(path, {}) == config


@PROPERTY_SETTINGS
@given(text=st.text(max_size=200))
def test_config_file_fuzz_gives_a_config_or_one_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.toml"
        path.write_text(text, encoding="utf-8")
        try:
            build_config(path, {})
        except ConfigError as error:
            assert "\n" not in str(error)
