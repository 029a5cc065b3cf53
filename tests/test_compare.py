"""``ctexp compare``: deltas between runs, paired tests where the test sets match, and every output format."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest

from ctexp.analysis.compare import compare_runs
from ctexp.analysis.comparison import Comparison
from ctexp.analysis.statistics import holm, mcnemar_p
from ctexp.data.sources.world import position_signal, rotated_positions
from ctexp.registry.locations import Locations
from ctexp.registry.readback import load_compared_runs
from tests.conftest import SMALL_WORLD, Cli

SMALL_LAYERS, POSITIONS = 3, 6  # SMALL_WORLD: states 0..2, 6 positions


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """Small runs: two lenses on one world, variants that change the test set, and one whose files tests remove."""
    cli = Cli(tmp_path_factory.mktemp("compare-home"))
    cli("run", *SMALL_WORLD, "--lens", "layer", "--name", "small-layer")
    cli("run", *SMALL_WORLD, "--lens", "layer-position", "--name", "small-lp")
    cli("run", *SMALL_WORLD, "--lens", "layer", "--world-seed", "1", "--name", "other-world")
    cli("run", *SMALL_WORLD, "--lens", "layer", "--target", "all", "--name", "all-targets")
    cli("run", *SMALL_WORLD, "--lens", "layer", "--seed", "1", "--name", "seed-1")
    cli("run", *SMALL_WORLD, "--lens", "layer", "--layers", "1-2", "--name", "two-layers")
    cli("run", *SMALL_WORLD, "--lens", "identity", "--name", "moved")
    return cli


def compare_json(cli: Cli, *args: str) -> dict:
    return json.loads(cli("compare", *args, "--format", "json").stdout)


def every_row(pair: dict) -> list[dict]:
    return [pair["overall"], *pair["by_layer"], *pair["by_position"], *pair["by_cell"]]


# ---------------------------------------------------------------------------------------------------------
# Exact tests


def exact_mcnemar(b: int, c: int) -> float:
    """2 * P[Binomial(b + c, 1/2) <= min(b, c)], capped at 1, in exact rational arithmetic."""
    n, k = b + c, min(b, c)
    tail, term = 0, 1  # term = C(n, i)
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def test_mcnemar_matches_hand_computed_values():
    assert mcnemar_p(0, 5) == 0.0625  # 2 / 2^5
    assert mcnemar_p(5, 0) == 0.0625
    assert mcnemar_p(1, 9) == 0.021484375  # 2 * (1 + 10) / 2^10
    assert mcnemar_p(1, 4) == 0.375  # 2 * (1 + 5) / 2^5
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(2, 3) == 1.0  # 2 * (1 + 5 + 10) / 32 = 1
    assert mcnemar_p(0, 1) == 1.0
    for b, c in ((10, 30), (400, 480), (990, 1010), (1100, 1300), (4000, 4300)):  # exact and log-space paths
        assert mcnemar_p(b, c) == pytest.approx(exact_mcnemar(b, c), rel=1e-9, abs=1e-300)
    with pytest.raises(ValueError):
        mcnemar_p(-1, 2)


def test_holm_adjusts_step_down():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([None, 0.5, 0.01])
    assert adjusted[0] is None and adjusted[1:] == pytest.approx([0.5, 0.02])
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert holm([]) == []


# ---------------------------------------------------------------------------------------------------------
# Small runs through the CLI


def test_a_run_against_itself_has_zero_deltas_and_nothing_significant(small: Cli):
    for metric in ("top1", "loss"):
        out = compare_json(small, "small-layer", "small-layer", "--metric", metric, "--resamples", "200")
        (pair,) = out["comparisons"]
        assert pair["paired"] is True and pair["note"] is None
        assert pair["config"] == []
        assert all(row["delta"] == 0 for row in pair["headline"] if row["delta"] is not None)
        rows = every_row(pair)
        assert len(pair["by_cell"]) == SMALL_LAYERS * POSITIONS
        for row in rows:
            deltas = {key: value for key, value in row.items() if key.startswith("delta")}
            assert set(deltas) >= {"delta_top1", "delta_top5", "delta_top10", "delta_loss", "delta_low", "delta_high"}
            assert all(value == 0 for value in deltas.values()), row
            assert row["p_value"] == 1 and row["p_holm"] == 1 and row["significant"] is False


def test_runs_on_different_stores_fall_back_to_unpaired_intervals(small: Cli):
    out = compare_json(small, "small-layer", "other-world")
    (pair,) = out["comparisons"]
    assert pair["paired"] is False and "different stores" in pair["note"]
    assert pair["reference"]["store_hash"] != pair["other"]["store_hash"]
    for row in every_row(pair):
        assert row["p_value"] is None and row["p_holm"] is None and row["lost"] is None
        assert isinstance(row["significant"], bool)
        assert row["delta_low"] is not None and row["delta_low"] <= row["delta_high"]
    assert {change["key"] for change in pair["config"]} >= {"world.seed", "name"}
    text = small("compare", "small-layer", "other-world").stdout
    assert "note: test sets differ: the runs read different stores" in text and "unpaired" in text
    rows = list(csv.DictReader(io.StringIO(small("compare", "small-layer", "other-world", "--format", "csv").stdout)))
    assert rows and all(row["p_value"] == "" and row["paired"] == "False" for row in rows)


def test_pairing_needs_the_same_test_problems_and_targets(small: Cli):
    targets = compare_json(small, "small-layer", "all-targets")["comparisons"][0]
    assert targets["paired"] is False and "targets differ" in targets["note"]
    seed = compare_json(small, "small-layer", "seed-1")["comparisons"][0]
    assert seed["paired"] is False and "different test problems" in seed["note"]
    for pair in (targets, seed):
        assert all(row["p_value"] is None for row in every_row(pair))
    layers = compare_json(small, "small-layer", "two-layers")["comparisons"][0]
    assert layers["paired"] is True and "left out" in layers["note"]
    assert [row["layer"] for row in layers["by_layer"]] == [1, 2]
    assert layers["shared_states"] == layers["other"]["test_states"] == layers["overall"]["n_reference"]
    assert all(row["p_value"] is not None for row in every_row(layers))


def test_every_format_plot_and_all(small: Cli, tmp_path: Path):
    table = small("compare", "small-layer", "small-lp").stdout
    for heading in ("Config differences", "Headline", "By layer", "By position", "Δ top1 by layer (rows) x position"):
        assert heading in table
    assert "lens" in table and "layer-position" in table

    markdown = small("compare", "small-layer", "small-lp", "--format", "markdown").stdout
    assert markdown.startswith("# Comparison against small-layer")
    for heading in ("### Config differences", "### By layer", "### By position", "### By cell"):
        assert heading in markdown
    assert "| Position |" in markdown

    text = small("compare", "small-layer", "small-lp", "other-world", "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(text)))
    per_pair = 1 + SMALL_LAYERS + POSITIONS + SMALL_LAYERS * POSITIONS
    assert len(rows) == 2 * per_pair
    assert {row["table"] for row in rows} == {"overall", "layer", "position", "cell"}
    assert {"delta_top1", "delta_loss", "delta_low", "delta_high", "p_value", "p_holm", "significant"} <= set(rows[0])
    assert {row["paired"] for row in rows} == {"True", "False"}

    out = compare_json(small, "small-layer", "small-lp", "other-world", "--metric", "top5")
    assert out["metric"] == "top5" and out["reference"]["name"] == "small-layer"
    assert [pair["other"]["name"] for pair in out["comparisons"]] == ["small-lp", "other-world"]
    assert all(isinstance(row["significant"], bool) for pair in out["comparisons"] for row in every_row(pair))

    changed = compare_json(small, "small-layer", "small-lp")["comparisons"][0]["config"]
    assert {c["key"] for c in changed} == {"lens", "name"} and all(c["changed"] for c in changed)
    everything = compare_json(small, "small-layer", "small-lp", "--all")["comparisons"][0]["config"]
    keys = {c["key"]: c for c in everything}
    assert keys["train.lr"]["changed"] is False and keys["train.lr"]["reference"] == keys["train.lr"]["other"]
    assert keys["lens"] == {"key": "lens", "reference": "layer", "other": "layer-position", "changed": True}

    plot = tmp_path / "compare.png"
    small("compare", "small-layer", "small-lp", "other-world", "--plot", str(plot), "--format", "json")
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_line(small: Cli, tmp_path: Path):
    small("compare", "small-layer", "no-such-run", code=8)
    small("compare", "small-layer", code=2)
    small("compare", "small-layer", "small-lp", "--metric", "top3", code=2)
    small("compare", "small-layer", "small-lp", "--format", "yaml", code=2)
    small("compare", "small-layer", "small-lp", "--resamples", "5", code=2)
    small("compare", "small-layer", "small-lp", "--plot", str(tmp_path / "missing" / "x.png"), code=2)


def test_predictions_come_from_mlflow_when_the_run_directory_is_gone(small: Cli):
    record = compare_json(small, "moved", "moved")["reference"]
    assert record["predictions"] == "run directory"
    run_dir = small.home / "runs" / record["id"]
    shutil.rmtree(run_dir)
    out = compare_json(small, "moved", "small-layer")
    assert out["reference"]["predictions"] == "mlflow"
    assert out["comparisons"][0]["paired"] is True  # same store, split and targets: identity vs layer
    assert out["reference"]["test_problems"] == out["comparisons"][0]["other"]["test_problems"]
    artifacts = [p for p in (small.home / "artifacts").rglob("predictions.jsonl") if record["mlflow_run_id"] in p.parts]
    assert len(artifacts) == 1
    artifacts[0].unlink()
    error = small("compare", "moved", "small-layer", code=8).stderr
    assert "no per-state predictions" in error


# ---------------------------------------------------------------------------------------------------------
# The default world: the planted truth shows up as significant deltas


@pytest.fixture(scope="module")
def science(default_runs: Callable[[str], dict], science_cli: Cli) -> Callable[[str, str], Comparison]:
    """Compare two of the session's default-world runs (identity, layer, layer-position) by lens."""
    def compare(reference: str, other: str) -> Comparison:
        ids = [default_runs(reference)["run_id"], default_runs(other)["run_id"]]
        runs = load_compared_runs(Locations.resolve(science_cli.home), ids)
        return compare_runs(runs, metric="top1", resamples=1000)

    return compare


def significant_gains(comparison: Comparison) -> set[int]:
    (pair,) = comparison.comparisons
    assert pair.paired, pair.note
    return {row.position for row in pair.rows("position") if row.significant and (row.delta_top1 or 0) > 0}


def test_trained_layer_position_lens_beats_the_logit_lens_where_signal_is_planted(science):
    comparison = science("identity", "layer-position")
    strong = {position for position, signal in enumerate(position_signal(POSITIONS)) if signal >= 0.9}
    assert strong == {2, 3}
    gains = significant_gains(comparison)
    assert strong <= gains, gains
    (pair,) = comparison.comparisons
    assert pair.overall.significant and pair.overall.delta_top1 > 0.1
    assert {c.key for c in pair.config} >= {"lens"}
    assert next(h for h in pair.headline if h.metric == "identity_top1").delta == 0


def test_layer_position_lens_beats_the_layer_lens_at_the_rotated_positions(science):
    rotated = set(rotated_positions(POSITIONS))
    assert rotated == {1, 3, 4}
    comparison = science("layer", "layer-position")
    gains = significant_gains(comparison)
    assert rotated <= gains, gains
    (pair,) = comparison.comparisons
    for row in pair.rows("position"):
        if row.position in rotated:
            assert row.lost is not None and row.gained is not None and row.gained > row.lost
            assert row.p_holm is not None and row.p_holm < 1e-6
            assert row.delta_low is not None and row.delta_low > 0
