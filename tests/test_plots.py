"""Plots: valid PNG files, a colour scale centred at zero, token labels, HTML via plotly."""

import sys

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from transformer_hooks.analysis import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS = ["When", " Mary", " and", " John", " went", ",", "\n", " to"]


def assert_png(path, min_width=200, min_height=150):
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)  # decodes the whole file: a truncated PNG fails here
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height
    assert image[..., :3].std() > 0.05, "the image is blank"


def test_layer_pos_heatmap_is_a_png_centred_at_zero_with_token_labels(tmp_path):
    values = torch.randn(5, len(TOKENS), generator=torch.Generator().manual_seed(0)) + 0.7  # mostly positive
    fig = plots.plot_layer_pos(values, TOKENS, title="resid_pre", path=tmp_path / "sweep.png")
    assert_png(tmp_path / "sweep.png")

    ax = fig.axes[0]
    vmin, vmax = ax.images[0].get_clim()
    assert vmin == -vmax and vmax == pytest.approx(float(values.abs().max()))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == plots.token_labels(TOKENS)
    assert labels[1] == "1 ␣Mary" and labels[6] == "6 ⏎"
    assert ax.get_ylabel() == "layer" and ax.get_title() == "" and fig._suptitle.get_text() == "resid_pre"
    assert len(fig.axes) == 2, "a colour bar"


def test_panels_share_one_scale_and_nan_cells_are_masked(tmp_path):
    values = torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(1))
    values[2:4, :, 2:] = float("nan")  # GQA: key/value heads that do not exist
    fig = plots.plot_layer_head(values, title="every head", path=tmp_path / "heads.png")
    assert_png(tmp_path / "heads.png", min_width=600)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["output (z)", "query", "key", "value", "pattern"]
    limit = float(values[~values.isnan()].abs().max())
    assert all(im.get_clim() == pytest.approx((-limit, limit)) for im in images)
    assert images[2].get_array().mask[:, 2:].all() and not images[0].get_array().mask.any()

    own = plots.heatmaps(values[:2], shared_scale=False)
    limits = [im.get_clim()[1] for ax in own.axes for im in ax.images]
    assert limits == pytest.approx([float(values[i].abs().max()) for i in range(2)])


def test_lines_png_and_label_checks(tmp_path):
    values = torch.randn(2, 7).cumsum(-1)
    fig = plots.plot_lines(
        values,
        labels=["Mary", "John"],
        x_labels=[f"{i}_pre" for i in range(7)],
        ylabel="logit",
        path=tmp_path / "lens.png",
    )
    assert_png(tmp_path / "lens.png")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), values[1].numpy(), rtol=1e-6)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Mary", "John"]

    with pytest.raises(ValueError, match="3 column labels for 8 columns"):
        plots.heatmaps(torch.zeros(2, 8), x_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"got shape \(2, 2, 2, 2\)"):
        plots.heatmaps(torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError, match="backend must be"):
        plots.plot_lines(values, backend="bokeh")


def test_html_output_through_plotly(tmp_path):
    values = torch.randn(3, 4, len(TOKENS))
    fig = plots.plot_layer_pos(values, TOKENS, title="block", path=tmp_path / "sweep.html")
    html = (tmp_path / "sweep.html").read_text()
    assert "<html>" in html[:100].lower() and "plotly" in html.lower()
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 3 and all(t.zmid == 0 and t.zmax == -t.zmin for t in heatmaps)
    assert list(heatmaps[0].x) == plots.token_labels(TOKENS)
    lines = plots.plot_lines(torch.randn(2, 5), labels=["a", "b"], path=tmp_path / "lines.html")
    assert [t.name for t in lines.data] == ["a", "b"] and (tmp_path / "lines.html").stat().st_size > 1000


def test_html_without_plotly_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly now raises ImportError
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.raises(ImportError, match=r"transformer_hooks\[interactive\]"):
        plots.plot_layer_head(torch.zeros(2, 3), path=tmp_path / "heads.html")
    assert not (tmp_path / "heads.html").exists()
    plots.plot_layer_head(torch.zeros(2, 3), path=tmp_path / "heads.png")  # matplotlib still works
    assert_png(tmp_path / "heads.png", min_width=100, min_height=100)
