"""The run figures: every label inside its canvas at any grid size, every cell annotated, PNG files.

The figures set their margins in inches instead of measuring their text (``tight_layout`` drew each
figure twice); these tests are what keeps that from clipping titles, tick labels or the colorbar.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ctexp.analysis.figures import (
    layer_position_heatmap,
    position_bars,
    save_figures,
    training_curves,
)
from ctexp.analysis.result import RunResult
from ctexp.config import build_config
from ctexp.experiment.pipeline import run_experiment

SHAPES = [(1, 1), (8, 6), (24, 12)]  # world layers (states 0..L), positions
BUILDERS = [layer_position_heatmap, position_bars, training_curves]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def result(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    layers, positions = request.param
    config = build_config(None, {
        "world.problems": 60, "world.layers": layers, "world.positions": positions, "world.hidden": 8,
        "train.epochs": 2, "lens": "layer-position",
    })
    return run_experiment(config, home=tmp_path_factory.mktemp("home"))


def drawn(figure: Figure) -> FigureCanvasAgg:
    canvas = FigureCanvasAgg(figure)
    figure.draw(canvas.get_renderer())
    return canvas


@pytest.mark.parametrize("build", BUILDERS, ids=lambda build: build.__name__)
def test_every_label_is_inside_the_canvas(result: RunResult, build) -> None:
    figure = build(result)
    extent = figure.get_tightbbox(drawn(figure).get_renderer())  # inches, every artist's ink
    width, height = figure.get_size_inches()
    assert extent.x0 >= 0 and extent.y0 >= 0, (extent, width, height)
    assert extent.x1 <= width and extent.y1 <= height, (extent, width, height)


def test_heatmap_annotates_every_cell_with_its_value(result: RunResult) -> None:
    figure = layer_position_heatmap(result)
    drawn(figure)
    grid_axes = figure.axes[0]
    annotations = sorted(text.get_text() for text in grid_axes.texts)
    expected = sorted(f"{row.top1:.2f}" for row in result.rows("cell") if row.top1 is not None)
    assert annotations == expected
    assert len(figure.axes) == 2 and figure.axes[1].get_ylabel() == "top-1"  # the colorbar


def test_save_figures_writes_three_pngs(result: RunResult, tmp_path: Path) -> None:
    paths = save_figures(result, tmp_path / "new")
    assert [path.name for path in paths] == ["layer_position_top1.png", "position_top1.png", "training_curves.png"]
    assert all(path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for path in paths)
