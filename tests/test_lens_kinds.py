"""Lens kinds as classes: the registry, a kind added from outside ctexp, and saved lenses read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ctexp.config import AdapterKind, ExperimentConfig, LensKind, TrainConfig
from ctexp.errors import ConfigError, StoreError
from ctexp.lens.kinds import Lens, lens_class, lens_kinds, register_lens_kind
from ctexp.lens.saved import LensSpec
from ctexp.lens.train import SplitTensors, train_lens
from tests.test_performance_equivalence import CASE_IDS, CASES, D, L, T, make_batch, make_head, make_lens


@register_lens_kind("test-diagonal")
class DiagonalLens(Lens):
    """A kind defined outside ctexp: each layer scales the coordinates, h -> h * (1 + s_l). No fast backward."""

    def __init__(
        self, n_layers: int, n_positions: int, hidden: int, adapter: AdapterKind = AdapterKind.NONE,
        rank: int = 4, seed: int = 0,
    ) -> None:
        super().__init__(n_layers, n_positions, hidden, adapter, rank, seed)
        self.scale = nn.Parameter(torch.zeros(n_layers, hidden))

    def translate(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return h * (1 + self.scale)  # (B, L, d)


def test_every_lens_kind_value_has_a_class_and_every_builtin_class_a_value():
    builtin = {name for name, cls in lens_kinds().items() if cls.__module__.startswith("ctexp.")}
    assert builtin == {kind.value for kind in LensKind}
    for kind in LensKind:
        assert lens_class(kind).kind == kind.value
        assert Lens.build(kind, L, T, D).kind == kind.value


def test_unknown_kind_fails_naming_the_known_ones():
    with pytest.raises(ConfigError) as caught:
        Lens.build("diagonal-typo", L, T, D)
    message = str(caught.value)
    assert "'diagonal-typo'" in message and "\n" not in message
    for kind in LensKind:
        assert kind.value in message


def test_a_kind_name_is_registered_once():
    with pytest.raises(ConfigError, match="already registered"):

        @register_lens_kind("layer")
        class AnotherLayerLens(Lens):
            def translate(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
                return h


def test_adapters_are_for_kinds_shared_across_positions():
    with pytest.raises(ConfigError, match="shared across positions"):
        Lens.build(LensKind.POSITION, L, T, D, AdapterKind.BIAS)
    with pytest.raises(ConfigError, match="known adapters: none, bias, lowrank"):
        Lens.build(LensKind.LAYER, L, T, D, "diagonal")
    assert Lens.build(LensKind.LAYER, L, T, D, "lowrank").adapter is AdapterKind.LOWRANK


def test_the_autograd_fallback_is_the_gradient_of_the_output():
    lens = Lens.build("test-diagonal", L, T, D)
    assert not lens.has_fast_backward() and Lens.build(LensKind.LAYER, L, T, D).has_fast_backward()
    states, position, _ = make_batch()
    grad_out = torch.randn(states.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # as the training step calls it
        assert lens.write_grads(states, position, grad_out) is None
    torch.testing.assert_close(lens.scale.grad, (states * grad_out).sum(0))


@pytest.mark.parametrize("adapter", [AdapterKind.NONE, AdapterKind.BIAS], ids=lambda v: v.value)
def test_a_kind_added_outside_ctexp_trains_through_train_lens(adapter):
    head = make_head()
    train_split, val_split = (SplitTensors(*make_batch(n, seed)) for n, seed in ((40, 1), (12, 2)))
    lens = Lens.build("test-diagonal", L, T, D, adapter)
    before = {name: value.clone() for name, value in lens.state_dict().items()}
    config = TrainConfig(batch_size=2 * L, epochs=6, patience=6, lr=3e-2)
    outcome = train_lens(lens, head, train_split, val_split, config, seed=0)
    losses = [epoch.train_loss for epoch in outcome.epochs]
    assert len(losses) == 6 and losses[-1] < losses[0]
    for name, value in lens.state_dict().items():
        assert not torch.equal(value, before[name]), name


ROUND_TRIP = [*CASES, ("test-diagonal", AdapterKind.NONE), ("test-diagonal", AdapterKind.LOWRANK)]


@pytest.mark.parametrize(("kind", "adapter"), ROUND_TRIP, ids=[*CASE_IDS, "test-diagonal-none", "test-diagonal-lowrank"])
def test_save_and_load_round_trip(tmp_path: Path, kind, adapter):
    lens = make_lens(kind, adapter, seed=4)
    config = {"lens": kind, "adapter": adapter.value, "seed": 4}
    lens.save(tmp_path, [0, 2, 5], config)
    loaded, spec = Lens.load(tmp_path)
    assert type(loaded) is type(lens) and loaded.adapter is adapter
    assert spec == LensSpec(kind=kind, adapter=adapter, rank=3, n_layers=L, n_positions=T, hidden=D,
                            layers=[0, 2, 5], config=config)
    states, position, _ = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(states, position), lens(states, position), rtol=0, atol=0)


def test_saved_config_is_the_experiment_config(tmp_path: Path):
    config = ExperimentConfig(lens=LensKind.GLOBAL, adapter=AdapterKind.LOWRANK, adapter_rank=3, seed=9)
    Lens.build(config.lens, L, T, D, config.adapter, config.adapter_rank).save(tmp_path, [1, 2, 3], config)
    written = json.loads((tmp_path / "lens.json").read_text())
    assert list(written) == ["kind", "adapter", "rank", "n_layers", "n_positions", "hidden", "layers", "config"]
    _, spec = Lens.load(tmp_path)
    assert ExperimentConfig.model_validate(spec.config) == config


def _edit_json(directory: Path, **changes) -> None:
    path = directory / "lens.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


BAD_FILES = {
    "missing directory": (lambda d: d.rename(d.with_name("elsewhere")), StoreError, "lens.json not found"),
    "missing weights": (lambda d: (d / "lens.safetensors").unlink(), StoreError, "lens.safetensors not found"),
    "truncated weights": (lambda d: (d / "lens.safetensors").write_bytes(b"\x08\x00"), StoreError, "corrupt"),
    "not JSON": (lambda d: (d / "lens.json").write_text("{kind"), StoreError, "not valid JSON"),
    "unknown kind": (lambda d: _edit_json(d, kind="nope"), ConfigError, "unknown lens kind 'nope'; known kinds:"),
    "unknown adapter": (lambda d: _edit_json(d, adapter="nope"), StoreError, "adapter"),
    "unknown field": (lambda d: _edit_json(d, colour="red"), StoreError, "colour"),
    "layers do not fit": (lambda d: _edit_json(d, layers=[0]), StoreError, "n_layers=3"),
    "wrong shape": (lambda d: _edit_json(d, hidden=D + 1), StoreError, "weight has shape (3, 16, 16)"),
    "other kind's tensors": (lambda d: _edit_json(d, kind="identity"), StoreError, "do not fit a 'identity' lens"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_lens_files_fail_in_one_line(tmp_path: Path, case):
    directory = tmp_path / "lens"
    directory.mkdir()
    make_lens(LensKind.LAYER, AdapterKind.NONE).save(directory, [0, 1, 2], {})
    spoil, error, fragment = BAD_FILES[case]
    spoil(directory)
    with pytest.raises(error) as caught:
        Lens.load(directory)
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message
