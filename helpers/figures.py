"""Figure builders for the book, and the one way notebooks show a figure.

Builders return plotly figures from numbers computed elsewhere (the chapters' analyses,
``store``, ``train``), so a test can check the numbers without drawing. ``show`` labels every
figure made with random weights, and in a book build (``ctx.book_build``) emits plain HTML
(plotly.js is served once by the book itself), since myst-nb drops plotly's own output type.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .inception import BRANCHES

BRANCH_COLOURS = {"1x1": "#4C78A8", "3x3": "#F58518", "5x5": "#54A24B", "pool": "#B279A2"}
NOT_A_RESULT = "RANDOM WEIGHTS: NOT A RESULT"
LAYER_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]  # lines of mixed4a, 4b, ...


def show(fig: go.Figure, ctx=None, save_as: str | None = None) -> None:
    """Display ``fig``, watermarked when ``ctx`` says the weights are random; with ``save_as``,
    also write it as PNG and SVG into the run's ``figures/`` folder (watermark included)."""
    from IPython.display import display

    if ctx is not None and ctx.random_weights and not any(a.text == NOT_A_RESULT for a in fig.layout.annotations):
        fig.add_annotation(text=NOT_A_RESULT, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                           font=dict(size=28, color="rgba(200,0,0,0.25)"), textangle=-15)
    if save_as and ctx is not None:
        save(fig, ctx.run_dir / "figures", save_as)
    if ctx is not None and ctx.book_build:
        import json

        display({"text/html": figure_html(fig), "application/vnd.plotly.v1+json": json.loads(fig.to_json())}, raw=True)
    else:
        fig.show()


PLOTLY_CDN = "https://cdn.plot.ly/plotly-{version}.min.js"


def figure_html(fig: go.Figure) -> str:
    """The figure as an HTML output that draws itself wherever it is opened: in the book with the book's
    own plotly.js (offline: it waits for the page's scripts, which load it); in a notebook opened
    elsewhere (the book's downloadable .ipynb on Colab, say), where no plotly.js is loaded, with
    plotly.js from its CDN. (JupyterLab renders the plotly mimetype beside it instead.)"""
    import json
    import uuid

    from plotly.offline import get_plotlyjs_version

    div = f"fig-{uuid.uuid4().hex[:12]}"
    spec = json.loads(fig.to_json())  # plotly's own encoding (typed arrays included), read back to add the config
    spec["config"] = {"displaylogo": False, "responsive": True}
    spec = json.dumps(spec).replace("</", "<\\/")  # no "</script>" can end the script early
    cdn = PLOTLY_CDN.format(version=get_plotlyjs_version())
    return (f'<div id="{div}" class="plotly-graph-div" style="height:{fig.layout.height or 450}px; width:100%;"></div>\n'
            f"<script>(function () {{\n"
            f"  var spec = {spec};\n"
            f'  function draw() {{ Plotly.newPlot("{div}", spec.data, spec.layout, spec.config); }}\n'
            f"  function go() {{\n"
            f"    if (window.Plotly) {{ draw(); return; }}\n"
            f'    var s = document.createElement("script"); s.src = "{cdn}"; s.onload = draw; document.head.appendChild(s);\n'
            f"  }}\n"
            f'  if (document.readyState === "complete") go(); else window.addEventListener("load", go);\n'
            f"}})();</script>")



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


def moves_table(rows: list[dict]) -> str:
    """Chapter 08's ``class_moves`` rows as a Markdown table: each class's probability before and after, the change."""
    return table([{"class": r["name"], "probability before": float(f"{r['before']:.3g}"),
                   "after": float(f"{r['after']:.3g}"), "change": float(f"{r['change']:.3g}")} for r in rows])


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
                            showlegend=col == 1, mode="lines", line=dict(color=LAYER_COLOURS[i % len(LAYER_COLOURS)]), row=1, col=col)
    fig.update_xaxes(title_text="vectors seen")
    fig.update_layout(title="Training the TopK SAEs", height=380)
    return fig


# the hue names of labels.HUES as marker colours: a set named "colour: blue" is drawn blue
HUE_COLOURS = {"red": "#d92121", "orange": "#d97d21", "yellow": "#ccbe1f", "green": "#21b021", "cyan": "#21c4d9",
               "blue": "#213fd9", "purple": "#9b21d9", "magenta": "#d9219b"}  # each at the middle of its hue
# other sets: colours no hue name claims, told apart by their symbols too
_NEUTRAL = [("black", "diamond"), ("#8c564b", "star"), ("#555555", "square"), ("#2f4f4f", "cross"),
            ("#7f7f7f", "triangle-up")]


def highlight_style(name: str, k: int) -> dict:
    """Marker of the ``k``-th highlighted set: the named hue for "colour: NAME" sets (a circle),
    else a neutral colour and a symbol of its own."""
    hue = name.split(":", 1)[1].strip() if name.startswith("colour:") else None
    if hue in HUE_COLOURS:
        return dict(color=HUE_COLOURS[hue], symbol="circle")
    colour, symbol = _NEUTRAL[k % len(_NEUTRAL)]
    return dict(color=colour, symbol=symbol)


def banner(ctx) -> None:
    """The profile banner: a MyST admonition in the book, a coloured box in a live notebook."""
    from IPython.display import HTML, Markdown, display

    text = ctx.banner()
    if ctx.book_build:
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
    path = store.manifest.images["paths"][image]
    label = store.manifest.images["labels"][image] or "unlabelled"
    grid = store.manifest.grid[layer][0]
    return positions_figure(load_image(path), kept["y"], kept["x"], grid,
                            f"{layer}: {len(kept)} kept positions ({store.manifest.sampling}) in image {image}, {label}")


def branch_rows(slices: dict[str, dict[str, tuple[int, int]]]) -> list[dict]:
    """Table rows: each layer's width and each branch's channel range (width)."""
    return [{"layer": layer, "width": max(stop for _, stop in s.values()),
             **{b: f"{s[b][0]}-{s[b][1] - 1} ({s[b][1] - s[b][0]})" for b in BRANCHES}}
            for layer, s in slices.items()]


# --- results: branch specialization, UMAP, circuits -------------------------------------------
def _hover(analysis, ids) -> list[str]:
    f = analysis.fractions
    return [f"feature {i}<br>" + "<br>".join(f"{b}: {f[i, k]:.2f}" for k, b in enumerate(BRANCHES)) for i in ids]


def branch_fraction_figure(analysis, branch: str, highlights: dict[str, list[int]] | None = None,
                           title: str = "", control=None) -> go.Figure:
    """The paper's figures 5-10 from a BranchAnalysis: every live feature's fraction in ``branch``, sorted;
    highlighted sets on top; with ``control`` (the same layer's BranchAnalysis on the untrained network),
    its sorted fractions as a line, stretched to the same number of features."""
    b = BRANCHES.index(branch)
    alive = np.flatnonzero(analysis.alive)
    order = alive[np.argsort(analysis.fractions[alive, b])]
    values = analysis.fractions[order, b]
    rank = {int(f): r for r, f in enumerate(order)}
    fig = go.Figure(go.Scatter(x=np.arange(len(order)), y=values, mode="markers", marker=dict(size=3, color="#999"),
                               name="all features", text=_hover(analysis, order), hoverinfo="text"))
    if control is not None:
        theirs = np.sort(control.fractions[np.flatnonzero(control.alive), b])
        fig.add_scatter(x=np.linspace(0, max(len(order) - 1, 0), len(theirs)), y=theirs, mode="lines",
                        name="same pipeline, untrained network", line=dict(color="#1f77b4", width=2),
                        hoverinfo="skip")
    # the two baselines' labels at opposite ends of their lines, so they never print over each other
    for base, dash, where in ((analysis.shuffled, "dash", "top left"), (analysis.gaussian, "dot", "bottom right")):
        fig.add_hline(y=float(base.threshold[b]), line_dash=dash, line_color="#444",
                      annotation_text=f"{base.kind} baseline, {base.quantile:.0%} quantile",
                      annotation_position=where, annotation_font_size=11)
    neutral = 0
    for name, ids in (highlights or {}).items():
        ids = [i for i in ids if i in rank]
        style = highlight_style(name, neutral)
        neutral += not name.startswith("colour:")
        fig.add_scatter(x=[rank[i] for i in ids], y=analysis.fractions[ids, b], mode="markers", name=name,
                        marker=dict(size=9, **style, line=dict(width=1, color="black")),
                        text=_hover(analysis, ids), hoverinfo="text")
    fig.update_layout(title=title or f"{analysis.layer}: fraction of each feature's decoder norm in the {branch} branch",
                      xaxis_title="feature rank (sorted by fraction)",
                      yaxis_title=f"||relu(d[{branch}])|| / ||relu(d)||", height=420)
    return fig


def umap_figure(coords: np.ndarray, analysis, colour: str = "dominant",
                highlights: dict[str, list[int]] | None = None, title: str = "") -> go.Figure:
    """The paper's figures 3-4: UMAP of decoder vectors, coloured by dominant branch or 5x5 fraction
    (``analysis``: the layer's BranchAnalysis)."""
    alive = np.flatnonzero(analysis.alive)
    fig = go.Figure()
    if colour == "dominant":
        dom = analysis.dominant()
        for k, b in enumerate(BRANCHES):
            ids = alive[dom[alive] == k]
            fig.add_scattergl(x=coords[ids, 0], y=coords[ids, 1], mode="markers", name=f"{b} dominant",
                              marker=dict(size=4, color=BRANCH_COLOURS[b]), text=_hover(analysis, ids),
                              hoverinfo="text")
    else:
        b = BRANCHES.index(colour)
        fig.add_scattergl(x=coords[alive, 0], y=coords[alive, 1], mode="markers", name=f"{colour} fraction",
                          marker=dict(size=4, color=analysis.fractions[alive, b], colorscale="Viridis",
                                      colorbar=dict(title=f"{colour}<br>fraction", x=1.0, xanchor="left")),
                          text=_hover(analysis, alive), hoverinfo="text")
    neutral = 0
    for name, ids in (highlights or {}).items():
        style = highlight_style(name, neutral)
        neutral += not name.startswith("colour:")
        fig.add_scatter(x=coords[ids, 0], y=coords[ids, 1], mode="markers", name=name,
                        marker=dict(size=10, **style, line=dict(width=1, color="white")),
                        text=_hover(analysis, ids), hoverinfo="text")
    # the legend below the map, the colour bar (if any) to its right: they cannot overlap
    fig.update_layout(title=title or f"UMAP of the {analysis.layer} decoder vectors", height=560,
                      xaxis=dict(visible=False), yaxis=dict(visible=False),
                      legend=dict(orientation="h", x=0, y=-0.02, yanchor="top"))
    return fig


def circuit_figure(graph: dict, analyses: dict, title: str = "", layers=None, thumbs: dict | None = None) -> go.Figure:
    """The paper's figure 2: a circuit across ``layers`` (default: those with nodes); nodes coloured by
    their dominant branch (``analyses``: a BranchAnalysis per layer), each with its image from
    ``thumbs`` ({(layer, feature): uint8 array}) beside it. A layer without nodes says so."""
    from PIL import Image

    layers = list(layers or dict.fromkeys(layer for layer, _ in graph["nodes"]))
    pos, tallest = {}, 1
    for x, layer in enumerate(layers):
        column = [n for n in graph["nodes"] if n[0] == layer]
        tallest = max(tallest, len(column))
        for y, node in enumerate(column):
            pos[node] = (x, (len(column) - 1) / 2 - y)
    fig = go.Figure()
    top = max((abs(w) for *_, w in graph["edges"]), default=1.0)
    for src, dst, w in graph["edges"]:
        fig.add_scatter(x=[pos[src][0], pos[dst][0]], y=[pos[src][1], pos[dst][1]], mode="lines", showlegend=False,
                        line=dict(width=1 + 6 * abs(w) / top, color="#888"), hoverinfo="text",
                        text=f"{src[0]}:{src[1]} -> {dst[0]}:{dst[1]}, effect {w:.3g}")
    for k, b in enumerate(BRANCHES):
        nodes = [n for n in graph["nodes"] if analyses[n[0]].dominant([n[1]])[0] == k]
        if nodes:
            fig.add_scatter(x=[pos[n][0] for n in nodes], y=[pos[n][1] for n in nodes], mode="markers+text",
                            name=f"{b} dominant", marker=dict(size=30, color=BRANCH_COLOURS[b]),
                            text=[str(n[1]) for n in nodes], textposition="middle center", textfont=dict(size=10),
                            hovertext=[f"{n[0]} feature {n[1]}<br>" + "<br>".join(
                                f"{bb}: {analyses[n[0]].fractions[n[1], kk]:.2f}" for kk, bb in enumerate(BRANCHES))
                                for n in nodes], hoverinfo="text")
    for node, img in (thumbs or {}).items():
        if node in pos:
            fig.add_layout_image(source=Image.fromarray(np.asarray(img, np.uint8)), xref="x", yref="y",
                                 x=pos[node][0] + 0.09, y=pos[node][1], sizex=0.3, sizey=0.8, xanchor="left",
                                 yanchor="middle", layer="above")
    for x, layer in enumerate(layers):
        if not any(n[0] == layer for n in graph["nodes"]):
            fig.add_annotation(x=x, y=0, text=f"no positive edge<br>into {layer}", showarrow=False,
                               font=dict(size=13, color="#666"), bordercolor="#aaa", borderpad=6)
    fig.update_layout(title=title or "A circuit across layers (attribution edges)", height=max(460, 120 * tallest),
                      xaxis=dict(tickvals=list(range(len(layers))), ticktext=layers, showgrid=False, zeroline=False,
                                 range=[-0.4, len(layers) - 0.45]),
                      yaxis=dict(visible=False, range=[-(tallest + 1) / 2, (tallest + 1) / 2]))
    return fig


def spliced_figure(rows: list[dict]) -> go.Figure:
    """Chapter 03: top-1 agreement with the clean network when each layer's output is replaced by its
    SAE's reconstruction (all channels, or one branch), against the zero and mean floors."""
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cases = list(dict.fromkeys(r["spliced in"] for r in rows))
    colours = {"SAE reconstruction": "#222222", "zeros (floor)": "#bbbbbb", "mean vector (floor)": "#888888",
               **{f"SAE, {b} branch only": c for b, c in BRANCH_COLOURS.items()}}
    fig = go.Figure()
    for case in cases:
        got = {r["layer"]: r for r in rows if r["spliced in"] == case}
        fig.add_bar(x=layers, y=[got[l]["top-1 agreement"] for l in layers], name=case,
                    marker_color=colours.get(case, "#1f77b4"),
                    hovertext=[f"KL {got[l]['KL']:.3g}, KL recovered {got[l]['KL recovered']:.2f}" for l in layers])
    fig.update_layout(barmode="group", height=420, yaxis=dict(title="top-1 agreement with the clean network",
                                                               range=[0, 1.02]),
                      title="Spliced in: each layer's output replaced by its SAE's reconstruction",
                      legend=dict(orientation="h", y=-0.15))
    return fig


def image_features_figure(image: np.ndarray, found, title: str = "") -> go.Figure:
    """Chapter 08: an image (uint8 [224, 224, 3]) and, per branch, the map of summed activation of the features
    dominant in that branch (``found``: an ``image_features.ImageFeatures``); hovering a cell of any map lists the
    features firing there, strongest first."""
    h, w = found.branch_maps.shape[1:]
    hover = [["<br>".join(f"feature {f}: {v:.3g}" for f, v in found.features_at(y, x)) or "no feature fires"
              for x in range(w)] for y in range(h)]
    fig = make_subplots(1, 1 + len(BRANCHES), subplot_titles=["the image", *[f"{b}-dominant features" for b in BRANCHES]],
                        horizontal_spacing=0.02)
    fig.add_trace(go.Image(z=image, hoverinfo="skip"), 1, 1)
    top = max(float(found.branch_maps.max()), 1e-12)
    for i, b in enumerate(BRANCHES):
        fig.add_trace(go.Heatmap(z=found.branch_maps[i], zmin=0, zmax=top, showscale=False, text=hover,
                                 colorscale=[[0, "#ffffff"], [1, BRANCH_COLOURS[b]]], xgap=1, ygap=1,
                                 hovertemplate=f"cell (%{{y}}, %{{x}}), {b}-dominant sum %{{z:.3g}}<br>%{{text}}<extra></extra>"),
                      1, 2 + i)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{2 + i}", row=1, col=2 + i)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, height=300, width=1100, margin=dict(l=10, r=10, t=60, b=10))
    return fig


def matched_cosines_figure(pairs: dict[str, np.ndarray]) -> go.Figure:
    """Chapter 09: each pair's matched cosines (one-to-one matching), sorted, with the 0.7 and 0.9 lines."""
    fig = go.Figure()
    for i, (name, cos) in enumerate(pairs.items()):
        cos = np.sort(np.asarray(cos))[::-1]
        fig.add_scatter(x=np.arange(len(cos)) / max(len(cos) - 1, 1), y=cos, mode="lines", name=name,
                        line=dict(color=LAYER_COLOURS[i % len(LAYER_COLOURS)], width=2))
    for t, where in ((0.9, "top right"), (0.7, "bottom right")):
        fig.add_hline(y=t, line_dash="dot", line_color="#444", annotation_text=f"cosine {t}",
                      annotation_position=where)
    fig.update_layout(title="Decoder directions matched one to one: cosine of each pair, best first", height=400,
                      xaxis_title="share of matched pairs", yaxis_title="cosine with its partner",
                      xaxis=dict(tickformat=".0%"), legend=dict(orientation="h", y=-0.2))
    return fig


def fraction_distributions_figure(analyses: dict) -> go.Figure:
    """Chapter 09: the live features' fraction in each branch, one box per SAE (``analyses``: name ->
    BranchAnalysis of the same layer), branches side by side."""
    fig = go.Figure()
    for i, (name, a) in enumerate(analyses.items()):
        alive = np.flatnonzero(a.alive)
        fig.add_box(x=np.repeat(BRANCHES, len(alive)), y=a.fractions[alive].T.ravel(), name=name,
                    marker_color=LAYER_COLOURS[i % len(LAYER_COLOURS)], boxpoints=False)
    fig.update_layout(boxmode="group", height=420, yaxis_title="fraction of the decoder norm in the branch",
                      title="Branch fractions of each SAE's live features (not shares: a feature's four do not sum to 1)",
                      legend=dict(orientation="h", y=-0.15))
    return fig


def agreement_figure(attributed: np.ndarray, ablated: np.ndarray, rho: float) -> go.Figure:
    """Attribution against true ablation, one point per (source, target) edge."""
    fig = go.Figure(go.Scattergl(x=ablated, y=attributed, mode="markers", marker=dict(size=4, opacity=0.6)))
    lim = [float(min(ablated.min(), attributed.min())), float(max(ablated.max(), attributed.max()))]
    fig.add_scatter(x=lim, y=lim, mode="lines", line=dict(dash="dash", color="#888"), showlegend=False)
    fig.update_layout(title=f"Attribution against true ablation (Spearman rank correlation {rho:.3f})",
                      xaxis_title="drop in target pre-activation when the source is removed",
                      yaxis_title="attribution (first order)", showlegend=False, height=420)
    return fig


def save(fig: go.Figure, folder, stem: str) -> list:
    """Write ``stem``.png and .svg (needs kaleido and a Chrome/Chromium); returns the files written."""
    import logging
    from pathlib import Path

    import plotly.io as pio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.png", folder / f"{stem}.svg"]
    quiet = logging.getLogger("choreographer")  # kaleido's browser channel logs harmless decoding errors
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:  # one browser session for both files
        pio.write_images([fig, fig], paths, width=900, height=fig.layout.height or 450)
    except Exception as e:  # no kaleido or no browser: the interactive figure still stands
        logging.getLogger(__name__).warning("could not write %s.png/.svg: %s", stem, e)
        return []
    finally:
        quiet.setLevel(level)
    return paths


def paper_figure(number: int, analyses: dict, highlights=None, controls: dict | None = None) -> go.Figure:
    """Figures 5-10 of the paper from a BranchAnalysis per layer. ``highlights``: {name: feature ids}, or a
    function of the layer giving them; by default the layer's most specialised features. ``controls``: the
    untrained network's BranchAnalysis per layer, drawn as a line."""
    from .branches import PAPER_FIGURES

    layer, branch = PAPER_FIGURES[number]
    a = analyses[layer]
    if highlights is None:
        highlights = {"most specialised (figure 1 pick)": a.most_specialised(branch, 10)}
    elif callable(highlights):  # per layer, e.g. the automatic labels' sets
        highlights = highlights(layer)
    return branch_fraction_figure(a, branch, highlights, title=f"Figure {number}: {layer}, {branch} branch",
                                  control=(controls or {}).get(layer))


def figure1_image(panels: dict, layers, random_weights: bool, thumb: int = 96):
    """The paper's figure 1 as one PNG-ready PIL image: rows are layers, columns branches; each
    cell shows a feature's visualisation followed by its top dataset-example crops.

    panels: {(layer, branch): [(feature, featviz image or None, [crop arrays])]}.
    """
    from PIL import Image, ImageDraw

    from .images import grid

    per_cell = max((len(v) for v in panels.values()), default=1)
    crops_n = max((len(c) for v in panels.values() for _, _, c in v), default=0)
    cell_w, cell_h = (1 + crops_n) * (thumb + 4) + 8, per_cell * (thumb + 18) + 8
    label_w, head_h = 90, 30
    canvas = Image.new("RGB", (label_w + len(BRANCHES) * cell_w, head_h + len(layers) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for c, b in enumerate(BRANCHES):
        draw.text((label_w + c * cell_w + 8, 8), f"{b} branch", fill=BRANCH_COLOURS[b])
    for r, layer in enumerate(layers):
        y0 = head_h + r * cell_h
        draw.text((8, y0 + cell_h // 2), layer, fill="black")
        for c, b in enumerate(BRANCHES):
            for k, (feature, viz, crops) in enumerate(panels.get((layer, b), [])):
                x, y = label_w + c * cell_w + 4, y0 + 4 + k * (thumb + 18)
                draw.text((x, y), f"feature {feature}", fill="black")
                tiles = [viz, *crops]
                canvas.paste(grid(tiles, thumb, len(tiles), gap=4, background=(230, 230, 230)), (x, y + 14))
    if random_weights:
        _stamp(canvas, NOT_A_RESULT)
    return canvas


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


def figure1_layer_image(title: str, entries: list[tuple[str, np.ndarray | None, list[np.ndarray]]],
                        random_weights: bool, thumb: int = 112, columns: int = 2):
    """The paper's figure 1 panel for one layer, legible at page width: ``entries`` (label, feature
    visualisation or None, top crops), ``columns`` to a row, each the visualisation then its crops,
    under a title; the random-weights watermark across it when ``random_weights``."""
    from PIL import Image, ImageDraw

    from .images import grid

    crops_n = max((len(c) for _, _, c in entries), default=0)
    entry_w, entry_h = (1 + crops_n) * (thumb + 4) + 16, thumb + 30
    head = 34
    rows = -(-len(entries) // columns)
    canvas = Image.new("RGB", (columns * entry_w + 8, head + rows * entry_h + 6), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill="black", font=_font(19))
    for k, (label, viz, crops) in enumerate(entries):
        x, y = 8 + (k % columns) * entry_w, head + (k // columns) * entry_h
        draw.text((x, y), label, fill="black", font=_font(15))
        tiles = [viz if viz is not None else np.full((thumb, thumb, 3), 230, np.uint8), *crops]
        canvas.paste(grid(tiles, thumb, len(tiles), gap=4, background=(230, 230, 230)), (x, y + 22))
    if random_weights:
        _stamp(canvas, NOT_A_RESULT)
    return canvas


def _stamp(canvas, text: str, alpha: int = 80) -> None:
    """Write ``text`` across ``canvas`` (a PIL RGB image) along its diagonal, red and translucent
    (``alpha`` of 255), so that it marks the whole figure and hides none of it."""
    import math

    from PIL import Image, ImageDraw

    angle = math.degrees(math.atan2(canvas.height, canvas.width))
    diagonal = math.hypot(canvas.width, canvas.height)
    size = 12  # the largest font whose text spans about 70% of the diagonal
    while size < 400 and _font(size + 4).getbbox(text)[2] <= 0.7 * diagonal:
        size += 4
    font = _font(size)
    box = font.getbbox(text)
    label = Image.new("RGBA", (box[2] - box[0] + 20, box[3] - box[1] + 20), (0, 0, 0, 0))
    ImageDraw.Draw(label).text((10 - box[0], 10 - box[1]), text, font=font, fill=(200, 0, 0, alpha))
    label = label.rotate(angle, expand=True, resample=Image.BICUBIC)
    x, y = (canvas.width - label.width) // 2, (canvas.height - label.height) // 2
    canvas.paste(label, (x, y), label)


def show_image(img, ctx=None, save_as: str | None = None) -> None:
    """Display a PIL image (PNG); with ``save_as``, also write it into the run's ``figures/``."""
    from IPython.display import Image as IPImage, display

    from .files import atomic_write

    if save_as and ctx is not None:
        path = ctx.run_dir / "figures" / f"{save_as}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: img.save(f, format="PNG"))
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    display(IPImage(data=buf.getvalue(), format="png"))


def example_bands_image(rows: list[tuple[str, list[np.ndarray]]], size: int = 96):
    """Labelled rows of crops (e.g. one row per activation band) as one PIL image."""
    from PIL import Image, ImageDraw

    from .images import grid

    width = 110 + max((len(c) for _, c in rows), default=1) * (size + 4)
    canvas = Image.new("RGB", (width, len(rows) * (size + 6) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, crops) in enumerate(rows):
        y = 4 + r * (size + 6)
        draw.text((4, y + size // 2 - 6), label, fill="black")
        if crops:
            canvas.paste(grid(crops, size, len(crops), gap=4, background=(255, 255, 255)), (110, y))
        else:
            draw.text((114, y + size // 2 - 6), "(no sampled example in this band)", fill="#888")
    return canvas


def stamped(img, ctx):
    """``img`` with the random-weights stamp when ``ctx`` says so."""
    if ctx is not None and ctx.random_weights:
        _stamp(img, NOT_A_RESULT)
    return img
