"""Plots for patching, attribution, logit lens and DLA: heatmaps and per-layer lines, and
the figures of the ``dla`` and ``logit-lens`` commands (``plot_dla``, ``plot_logit_lens``).

Every function takes tensors (or arrays) and labels and returns a figure; with ``path``
it also writes the figure there. The backend follows the path: ``.html`` renders an
interactive plotly figure (the ``interactive`` extra: ``pip install
'transformer_hooks[interactive]'``), anything else (``.png``, ``.svg``, ``.pdf``) a
matplotlib one; ``backend=`` chooses explicitly (``"matplotlib"`` or ``"plotly"``).
``title``, ``xlabel``, ``ylabel`` and ``colorbar_label`` label the figure, its axes and its
colour bar.

Heatmaps use a diverging colormap centred at zero (blue positive, red negative, as
TransformerLens's plots) with symmetric limits, so white means "no effect" and equal
colours mean equal magnitudes. NaN cells (e.g. key/value heads that GQA does not have)
are grey. Layer 0 is the top row.

Matplotlib figures are built with ``matplotlib.figure.Figure`` (no pyplot): nothing is
registered globally, nothing needs closing, and no display is needed (Agg rendering).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from matplotlib.figure import Figure

from ..protocol import HookedModel
from ..tables import short_repr

if TYPE_CHECKING:
    from .dla import DLAResult
    from .lens import LogitLens

Backend = Literal["matplotlib", "plotly"]
ArrayLike = Any  # torch.Tensor, numpy array or nested lists

CMAP = "RdBu"
NAN_COLOUR = "#d9d9d9"


def token_labels(str_tokens: Sequence[str]) -> list[str]:
    """Axis labels for the token positions of ``str_tokens``: ``"3 ␣John"``, with spaces and
    newlines made visible and the position first, so repeated tokens stay distinct.
    """

    def show(tok: str) -> str:
        return tok.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"

    return [f"{i} {show(tok)}" for i, tok in enumerate(str_tokens)]


def _array(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=float)


def _limit(values: np.ndarray) -> float:
    """Symmetric colour limit: the largest magnitude (1 for an all-zero or all-NaN array)."""
    finite = np.abs(values[np.isfinite(values)])
    top = float(finite.max()) if finite.size else 0.0
    return top if top > 0 else 1.0


def _backend(path: str | Path | None, backend: Backend | None) -> Backend:
    if backend is not None:
        if backend not in ("matplotlib", "plotly"):
            raise ValueError(f"backend must be 'matplotlib' or 'plotly', got {backend!r}")
        return backend
    return "plotly" if path is not None and str(path).lower().endswith(".html") else "matplotlib"


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError as e:
        raise ImportError(
            "interactive HTML plots need plotly: pip install 'transformer_hooks[interactive]' "
            "(or pip install plotly), or save as .png for a matplotlib figure"
        ) from e
    return go, make_subplots


def _labels(given: Sequence[str] | None, n: int, what: str) -> list[str]:
    if given is None:
        return [str(i) for i in range(n)]
    given = list(given)
    if len(given) != n:
        raise ValueError(f"{len(given)} {what} labels for {n} {what}s; give one label per {what}")
    return [str(g) for g in given]


def _save(fig: Any, path: str | Path | None, backend: Backend) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if backend == "plotly":
        fig.write_html(path, include_plotlyjs=True)  # self-contained: opens offline
    else:
        fig.savefig(path, dpi=120, bbox_inches="tight")


# Heatmaps -----------------------------------------------------------------------------------
def heatmaps(
    values: ArrayLike,
    titles: Sequence[str] | None = None,
    x_labels: Sequence[str] | None = None,
    y_labels: Sequence[str] | None = None,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    colorbar_label: str = "",
    shared_scale: bool = True,
    annotate: bool = False,
    path: str | Path | None = None,
    backend: Backend | None = None,
) -> Any:
    """Side-by-side heatmaps of ``values`` [panel, row, col] (or one [row, col] heatmap).

    ``x_labels`` label columns (e.g. ``token_labels(model.to_str_tokens(tokens))``),
    ``y_labels`` rows (default: their indices). ``shared_scale`` puts every panel on one
    colour scale (comparable colours); otherwise each panel spans its own largest value.
    ``annotate`` writes each cell's value (for small grids). ``titles``: one per panel;
    ``xlabel``, ``ylabel``, ``title``, ``colorbar_label``, ``path`` and ``backend`` as in the
    module docstring.
    """
    data = _array(values)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"heatmaps take [row, col] or [panel, row, col] values, got shape {data.shape}")
    n_panels, n_rows, n_cols = data.shape
    titles = _labels(titles, n_panels, "panel") if titles is not None else [""] * n_panels
    xs, ys = _labels(x_labels, n_cols, "column"), _labels(y_labels, n_rows, "row")
    limits = [_limit(data)] * n_panels if shared_scale else [_limit(d) for d in data]
    backend = _backend(path, backend)
    if backend == "plotly":
        fig = _plotly_heatmaps(data, titles, xs, ys, limits, xlabel, ylabel, title, colorbar_label, shared_scale)
    else:
        fig = _mpl_heatmaps(data, titles, xs, ys, limits, xlabel, ylabel, title, colorbar_label, annotate)
    _save(fig, path, backend)
    return fig


def _mpl_heatmaps(data, titles, xs, ys, limits, xlabel, ylabel, title, colorbar_label, annotate) -> Figure:
    import matplotlib

    n_panels, n_rows, n_cols = data.shape
    longest = max(len(x) for x in xs)
    rotate = longest > 3 and n_cols > 2
    width = min(30.0, n_panels * (1.4 + 0.34 * max(n_cols, 4)) + 1.0)
    height = min(30.0, 1.6 + 0.28 * max(n_rows, 5) + (0.075 * longest if rotate else 0.2))
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    cmap = matplotlib.colormaps[CMAP].with_extremes(bad=NAN_COLOUR)
    for i, (ax, panel, panel_title, lim) in enumerate(zip(axes, data, titles, limits, strict=True)):
        image = ax.imshow(
            np.ma.masked_invalid(panel), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest"
        )
        ax.set_xticks(range(n_cols), xs, rotation=90 if rotate else 0, fontsize=8)
        ax.set_yticks(_ticks(n_rows), [ys[i] for i in _ticks(n_rows)], fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel if i == 0 else "")
        ax.set_title(panel_title, fontsize=10)
        if annotate:
            for (r, c), v in np.ndenumerate(panel):
                if np.isfinite(v):
                    ax.text(
                        c,
                        r,
                        f"{v:.2g}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if abs(v) > 0.6 * lim else "black",
                    )
        if len(set(limits)) > 1 or ax is axes[-1]:
            fig.colorbar(image, ax=ax, label=colorbar_label, shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig


def _ticks(n: int, most: int = 32) -> list[int]:
    """Row ticks: every row when there are few, else an even subset (layers 0, 2, 4 ...)."""
    step = 1 if n <= most else -(-n // most)
    return list(range(0, n, step))


def _plotly_heatmaps(data, titles, xs, ys, limits, xlabel, ylabel, title, colorbar_label, shared_scale) -> Any:
    go, make_subplots = _plotly()
    n_panels = data.shape[0]
    fig = make_subplots(rows=1, cols=n_panels, subplot_titles=titles, horizontal_spacing=0.06)
    for i, (panel, lim) in enumerate(zip(data, limits, strict=True)):
        show_bar = not shared_scale or i == n_panels - 1
        fig.add_trace(
            go.Heatmap(
                z=np.where(np.isfinite(panel), panel, None),
                x=xs,
                y=ys,
                colorscale=CMAP,
                zmin=-lim,
                zmax=lim,
                zmid=0,
                showscale=show_bar,
                colorbar=dict(title=colorbar_label, x=(i + 1) / n_panels + 0.01, len=0.9),
                hovertemplate="%{y} / %{x}: %{z:.4g}<extra></extra>",
            ),
            row=1,
            col=i + 1,
        )
        fig.update_xaxes(title_text=xlabel, type="category", row=1, col=i + 1)
        fig.update_yaxes(title_text=ylabel if i == 0 else "", type="category", autorange="reversed", row=1, col=i + 1)
    fig.update_layout(
        title=title, plot_bgcolor=NAN_COLOUR, width=max(500, 380 * n_panels), height=max(350, 22 * data.shape[1] + 200)
    )
    return fig


def plot_layer_pos(
    values: ArrayLike,
    str_tokens: Sequence[str] | None = None,
    *,
    title: str = "",
    colorbar_label: str = "metric",
    path: str | Path | None = None,
    **kwargs: Any,
) -> Any:
    """``values``, a ``[layer, pos]`` sweep or attribution (or ``[panel, layer, pos]``, e.g.
    ``get_act_patch_block_every``), with the tokens ``str_tokens`` on the x axis.

    ``title``, ``colorbar_label`` and ``path`` as in the module docstring; ``**kwargs`` go to
    ``heatmaps`` (``titles``, ``shared_scale``, ``annotate``, ``backend``, ...)."""
    labels = token_labels(str_tokens) if str_tokens is not None else None
    if _array(values).ndim == 3 and "titles" not in kwargs and _array(values).shape[0] == 3:
        kwargs["titles"] = ["resid_pre", "attn_out", "mlp_out"]
    return heatmaps(
        values,
        x_labels=labels,
        xlabel="position",
        ylabel="layer",
        title=title,
        colorbar_label=colorbar_label,
        path=path,
        **kwargs,
    )


def plot_layer_head(
    values: ArrayLike, *, title: str = "", colorbar_label: str = "metric", path: str | Path | None = None, **kwargs: Any
) -> Any:
    """``values``, a ``[layer, head]`` sweep or attribution (or ``[panel, layer, head]``, e.g.
    ``get_act_patch_attn_head_all_pos_every``: panels output, query, key, value, pattern).

    ``title``, ``colorbar_label`` and ``path`` as in the module docstring; ``**kwargs`` go to
    ``heatmaps``."""
    if _array(values).ndim == 3 and "titles" not in kwargs and _array(values).shape[0] == 5:
        kwargs["titles"] = ["output (z)", "query", "key", "value", "pattern"]
    return heatmaps(
        values, xlabel="head", ylabel="layer", title=title, colorbar_label=colorbar_label, path=path, **kwargs
    )


# Lines ---------------------------------------------------------------------------------------
def plot_lines(
    values: ArrayLike,
    labels: Sequence[str] | None = None,
    x_labels: Sequence[str] | None = None,
    *,
    title: str = "",
    xlabel: str = "layer",
    ylabel: str = "",
    path: str | Path | None = None,
    backend: Backend | None = None,
) -> Any:
    """One line per row of ``values`` [line, point] (or one line [point]) over layers or
    components: a logit lens's probability of the answer per layer, DLA per layer.

    ``labels`` name the lines (a legend appears with more than one); ``x_labels`` the
    points (default 0, 1, ...; e.g. ``cache.accumulated_resid(return_labels=True)``'s).
    ``title``, ``xlabel``, ``ylabel``, ``path`` and ``backend`` as in the module docstring.
    """
    data = _array(values)
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2:
        raise ValueError(f"plot_lines takes [point] or [line, point] values, got shape {data.shape}")
    n_lines, n_points = data.shape
    names = _labels(labels, n_lines, "line") if labels is not None else [f"line {i}" for i in range(n_lines)]
    xs = _labels(x_labels, n_points, "point")
    backend = _backend(path, backend)
    if backend == "plotly":
        go, _ = _plotly()
        fig = go.Figure(
            [go.Scatter(x=xs, y=row, mode="lines+markers", name=name) for row, name in zip(data, names, strict=True)]
        )
        fig.update_layout(
            title=title, xaxis_title=xlabel, yaxis_title=ylabel, showlegend=n_lines > 1, xaxis=dict(type="category")
        )
    else:
        longest = max(len(x) for x in xs)
        rotate = n_points > 16 or longest > 4
        fig = Figure(
            figsize=(min(20.0, max(6.0, 0.25 * n_points + 2)), 4 + (0.07 * longest if rotate else 0)),
            layout="constrained",
        )
        ax = fig.subplots()
        for row, name in zip(data, names, strict=True):
            ax.plot(range(n_points), row, marker="o", markersize=3, label=name)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(n_points), xs, rotation=90 if rotate else 0, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if n_lines > 1:
            ax.legend(fontsize=8)
    _save(fig, path, backend)
    return fig


# The figures of the ``dla`` and ``logit-lens`` commands ------------------------------------
def _tex(text: str) -> str:
    """Text for matplotlib: '$' would start math mode."""
    return text.replace("$", r"\$")


def _write(fig: Figure, path: Path) -> Path:
    _save(fig, path, "matplotlib")
    return Path(path)


def plot_dla(r: "DLAResult", path: Path) -> Path:
    """Left: the logit difference the accumulated residual stream would give, layer by layer.
    Right: each head's direct contribution (layer x head). ``r``: the ``direct_logit_attribution``
    result. Written to ``path`` (PNG)."""
    n_layers, n_heads = r.heads.shape
    fig = Figure(figsize=(15, max(5.0, 0.22 * n_layers + 2.5)))
    ax_line, ax_heat = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    diff = f"logit({_tex(repr(r.answer))}) − logit({_tex(repr(r.contrast))})"
    fig.suptitle(
        f"Direct logit attribution: {diff} after {_tex(repr(''.join(r.str_tokens[: r.pos + 1])))}\n"
        f"model logit difference = {r.logit_diff:.3f}",
        fontsize=12,
    )

    x = range(len(r.accumulated))
    ax_line.axhline(0, color="0.6", lw=0.8)
    ax_line.plot(
        x, r.accumulated.numpy(), marker="o", ms=3, lw=1.5, color="tab:blue", label="accumulated residual stream"
    )
    ax_line.axhline(
        r.logit_diff, color="tab:red", ls="--", lw=1, label=f"model's logit difference ({r.logit_diff:.3f})"
    )
    step = max(1, len(r.accumulated_labels) // 24)
    ax_line.set_xticks(
        list(x)[::step], [_tex(s) for s in r.accumulated_labels[::step]], rotation=60, ha="right", fontsize=8
    )
    ax_line.set_xlabel("residual stream position (resid_pre / resid_mid of each layer, final resid_post)")
    ax_line.set_ylabel(f"{diff}\n(final norm with its cached scale)")
    ax_line.set_title("Accumulated logit difference by layer")
    ax_line.grid(alpha=0.3)
    ax_line.legend(loc="best", fontsize=9)

    heads = r.heads.numpy()
    vmax = max(float(abs(heads).max()), 1e-6)
    im = ax_heat.imshow(heads, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    ax_heat.set_xlabel("head")
    ax_heat.set_ylabel("layer")
    ax_heat.set_xticks(range(n_heads))
    ax_heat.set_yticks(range(0, n_layers, max(1, n_layers // 30)))
    ax_heat.set_title("Direct contribution of each head")
    for L in range(n_layers):
        for h in range(n_heads):
            if abs(heads[L, h]) >= 0.3 * vmax:
                ax_heat.text(
                    h,
                    L,
                    f"{heads[L, h]:+.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if abs(heads[L, h]) > 0.65 * vmax else "black",
                )
    fig.colorbar(im, ax=ax_heat, label=f"direct effect on {diff}")
    fig.set_layout_engine("tight")
    return _write(fig, path)


def plot_logit_lens(
    lens: "LogitLens", model: HookedModel, str_tokens: list[str], pos: int, path: Path, max_positions: int = 12
) -> Path:
    """The ``logit-lens`` command's figure, written to ``path`` (PNG).

    Left: the residual stream after each layer, layer x position (up to ``max_positions``
    around ``pos``). Right: the attention and MLP outputs of each layer at ``pos``, decoded
    alone. Each cell shows the top token, coloured by its probability. ``lens``: a
    ``logit_lens`` result over one prompt; ``model`` decodes its tokens; ``str_tokens``: the
    prompt's tokens.
    """
    from matplotlib.patches import Rectangle

    n_pos = len(str_tokens)
    first = max(0, min(pos - max_positions // 2, n_pos - max_positions))
    shown = list(range(first, min(n_pos, first + max_positions)))
    strings = lens.top_strings(model)
    layers = sorted(set(lens.layers))
    fig = Figure(figsize=(3.5 + 0.95 * (len(shown) + 2), 0.27 * len(layers) + 2.6), layout="constrained")
    ax_resid, ax_out = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [len(shown), 2]})

    def heatmap(ax: Any, cells: list[tuple[list[int], int]]) -> Any:
        """cells[j] = (lens row of layer 0, position); rows of later layers follow per site."""
        probs = torch.stack([lens.top_probs[rows, 0, p, 0] for rows, p in cells], dim=1).numpy()  # [layer, column]
        im = ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        for j, (rows, p) in enumerate(cells):
            for i, row in enumerate(rows):
                ax.text(
                    j,
                    i,
                    _tex(short_repr(strings[row][0][p][0], 11)),
                    ha="center",
                    va="center",
                    fontsize=7.5,
                    color="white" if probs[i, j] > 0.6 else "black",
                )
        return im

    resid_rows = lens.rows("resid_post")
    im = heatmap(ax_resid, [(resid_rows, p) for p in shown])
    ax_resid.set_xticks(
        range(len(shown)), [_tex(repr(str_tokens[p])) for p in shown], rotation=60, ha="right", fontsize=8
    )
    ax_resid.add_patch(Rectangle((shown.index(pos) - 0.5, -0.5), 1, len(layers), fill=False, ec="tab:red", lw=2))
    ax_resid.set_xlabel("input token (the next token is predicted)")
    ax_resid.set_ylabel("layer")
    ax_resid.set_yticks(range(len(layers)), [str(L) for L in layers], fontsize=7)
    ax_resid.set_title("residual stream after each layer")

    heatmap(ax_out, [(lens.rows("attn_out"), pos), (lens.rows("mlp_out"), pos)])
    ax_out.set_xticks([0, 1], ["attention\noutput", "MLP\noutput"], fontsize=8)
    ax_out.set_xlabel(f"at position {pos}: {_tex(repr(str_tokens[pos]))}")
    ax_out.set_title("each sublayer's output alone")
    fig.colorbar(im, ax=[ax_resid, ax_out], label="probability of the top token", shrink=0.8, aspect=40)
    fig.suptitle(
        f"Logit lens: top token of each vector through the final norm and unembedding (red box: position {pos})",
        fontsize=12,
    )
    return _write(fig, path)
