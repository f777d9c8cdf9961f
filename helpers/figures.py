"""Figure builders for the book, and the one way notebooks show a figure.

Builders return plotly figures from numbers computed elsewhere (``store``, ``train``), so
a test can check the numbers without drawing. ``show`` labels every figure made with
random weights, and in a book build emits plain HTML (plotly.js is served once by the
book itself), since myst-nb drops plotly's own output type.
"""

from __future__ import annotations

import os

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .inception import BRANCHES

BRANCH_COLOURS = {"1x1": "#4C78A8", "3x3": "#F58518", "5x5": "#54A24B", "pool": "#B279A2"}
NOT_A_RESULT = "RANDOM WEIGHTS: NOT A RESULT"


def show(fig: go.Figure, ctx=None) -> None:
    """Display ``fig`` (watermarked when ``ctx`` says the weights are random)."""
    from IPython.display import HTML, display

    if ctx is not None and ctx.random_weights:
        fig.add_annotation(text=NOT_A_RESULT, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                           font=dict(size=28, color="rgba(200,0,0,0.25)"), textangle=-15)
    if os.environ.get("SAE_BOOK_BUILD"):
        display(HTML(fig.to_html(include_plotlyjs=False, full_html=False, config={"displaylogo": False})))
    else:
        fig.show()


def markdown(text: str) -> None:
    from IPython.display import Markdown, display

    display(Markdown(text))


def table(rows: list[dict]) -> str:
    """A Markdown table from a list of dicts with the same keys."""
    if not rows:
        return "*(nothing)*"
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def branch_layout_figure(slices: dict[str, dict[str, tuple[int, int]]]) -> go.Figure:
    """Each mixed layer's channels as stacked bars, one colour per branch."""
    layers = list(slices)[::-1]
    fig = go.Figure()
    for branch in BRANCHES:
        widths = [slices[layer][branch][1] - slices[layer][branch][0] for layer in layers]
        starts = [slices[layer][branch][0] for layer in layers]
        fig.add_bar(y=layers, x=widths, base=starts, orientation="h", name=branch,
                    marker_color=BRANCH_COLOURS[branch],
                    customdata=np.stack([starts, np.add(starts, widths)], axis=1),
                    hovertemplate=f"{branch}: channels %{{customdata[0]}}-%{{customdata[1]}}<extra></extra>")
    fig.update_layout(barmode="overlay", title="Channel layout of each mixed layer, by branch",
                      xaxis_title="channel", height=120 + 40 * len(layers), legend_title="branch")
    return fig


def norm_distribution_figure(norms: dict[str, np.ndarray]) -> go.Figure:
    """Histogram of the L2 norms of the harvested vectors, per layer."""
    fig = go.Figure()
    for layer, values in norms.items():
        fig.add_histogram(x=values, name=layer, opacity=0.6, nbinsx=60)
    fig.update_layout(barmode="overlay", title="Norms of the harvested activation vectors",
                      xaxis_title="||x||", yaxis_title="vectors")
    return fig


def positions_figure(image: np.ndarray, ys: np.ndarray, xs: np.ndarray, grid: int, title: str) -> go.Figure:
    """An input image (uint8 [H, W, 3]) with the kept grid positions outlined."""
    cell = image.shape[0] / grid
    fig = go.Figure(go.Image(z=image))
    for y, x in zip(ys, xs):
        fig.add_shape(type="rect", x0=x * cell, x1=(x + 1) * cell, y0=y * cell, y1=(y + 1) * cell,
                      line=dict(color="yellow", width=2))
    fig.update_layout(title=title, width=420, height=440, margin=dict(l=10, r=10, t=40, b=10))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def training_curves_figure(metrics: dict[str, list[dict]]) -> go.Figure:
    """FVU, L0 and dead fraction against vectors seen, one line per layer."""
    panels = [("fvu", "FVU"), ("l0", "L0"), ("dead_fraction", "dead fraction")]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in panels])
    for i, layer in enumerate(metrics):
        seen = [r["vectors_seen"] for r in metrics[layer]]
        for col, (key, _) in enumerate(panels, start=1):
            fig.add_scatter(x=seen, y=[r[key] for r in metrics[layer]], name=layer, legendgroup=layer,
                            showlegend=col == 1, mode="lines", line=dict(color=_palette(i)), row=1, col=col)
    fig.update_xaxes(title_text="vectors seen")
    fig.update_layout(title="Training the TopK SAEs", height=380)
    return fig


def _palette(i: int) -> str:
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    return colours[i % len(colours)]


def banner(ctx) -> None:
    """The profile banner: a MyST admonition in the book, a coloured box in a live notebook."""
    from IPython.display import HTML, Markdown, display

    text = ctx.banner()
    if os.environ.get("SAE_BOOK_BUILD"):
        display(Markdown(text))
        return
    import html
    import re

    kind = "warning" if text.startswith(":::{warning}") else "note"
    body = "<br>".join(html.escape(p) for p in text.split("\n", 1)[1].rsplit(":::", 1)[0].strip().split("\n\n"))
    body = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", body)
    colour = "#fdecea" if kind == "warning" else "#e8f0fe"
    display(HTML(f'<div style="background:{colour};padding:8px 12px;border-radius:4px">{body}</div>'))


def kept_positions_figure(run, layer: str, image: int) -> go.Figure:
    """One harvested image with the grid positions the harvest kept for ``layer``."""
    from .images import load_image
    from .store import ActivationStore

    store = ActivationStore(run, layer)
    prov = store.load_provenance()
    kept = prov[prov["image"] == image]
    path = store.manifest["images"]["paths"][image]
    label = store.manifest["images"]["labels"][image] or "unlabelled"
    grid = store.manifest["grid"][layer][0]
    return positions_figure(load_image(path), kept["y"], kept["x"], grid,
                            f"{layer}: {len(kept)} kept positions ({store.manifest['sampling']}) in image {image}, {label}")


def branch_rows(slices: dict[str, dict[str, tuple[int, int]]]) -> list[dict]:
    """Table rows: each layer's width and each branch's channel range (width)."""
    return [{"layer": layer, "width": max(stop for _, stop in s.values()),
             **{b: f"{s[b][0]}-{s[b][1] - 1} ({s[b][1] - s[b][0]})" for b in BRANCHES}}
            for layer, s in slices.items()]
