"""Figure builders: plotly figures from numbers computed below them (the chapters' analyses, the
harvest's records, training metrics), so a test can check the numbers without drawing. A builder
opens no file and shows nothing; ``page.show`` puts its figure on the page."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from helpers.config import BRANCHES
from helpers.show.style import BRANCH_COLOURS, LAYER_COLOURS, highlight_style


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
        # a set that holds most of the curve singles nothing out: the legend says so, with its size
        label = f"{name} ({len(ids)} of {len(order)}: most features, singles nothing out)" if 2 * len(ids) > len(order) \
            else name
        fig.add_scatter(x=[rank[i] for i in ids], y=analysis.fractions[ids, b], mode="markers", name=label,
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
    # two rows of three (the image, then the four maps), no fixed width: legible from a phone to a wide page
    places = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]
    fig = make_subplots(2, 3, subplot_titles=["the image", *[f"{b}-dominant features" for b in BRANCHES]],
                        horizontal_spacing=0.03, vertical_spacing=0.08)
    fig.add_trace(go.Image(z=image, hoverinfo="skip"), *places[0])
    top = max(float(found.branch_maps.max()), 1e-12)
    for i, b in enumerate(BRANCHES):
        row, col = places[1 + i]
        fig.add_trace(go.Heatmap(z=found.branch_maps[i], zmin=0, zmax=top, showscale=False, text=hover,
                                 colorscale=[[0, "#ffffff"], [1, BRANCH_COLOURS[b]]], xgap=1, ygap=1,
                                 hovertemplate=f"cell (%{{y}}, %{{x}}), {b}-dominant sum %{{z:.3g}}<br>%{{text}}<extra></extra>"),
                      row, col)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{(row - 1) * 3 + col}", row=row, col=col)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, height=620, margin=dict(l=10, r=10, t=60, b=10))
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


def paper_figure(number: int, analyses: dict, highlights=None, controls: dict | None = None) -> go.Figure:
    """Figures 5-10 of the paper from a BranchAnalysis per layer. ``highlights``: {name: feature ids}, or a
    function of the layer giving them; by default the layer's most specialised features. ``controls``: the
    untrained network's BranchAnalysis per layer, drawn as a line."""
    from helpers.analysis.branches import PAPER_FIGURES

    layer, branch = PAPER_FIGURES[number]
    a = analyses[layer]
    if highlights is None:
        highlights = {"most specialised (figure 1 pick)": a.most_specialised(branch, 10)}
    elif callable(highlights):  # per layer, e.g. the automatic labels' sets
        highlights = highlights(layer)
    return branch_fraction_figure(a, branch, highlights, title=f"Figure {number}: {layer}, {branch} branch",
                                  control=(controls or {}).get(layer))


FAMILY_COLOURS = {"topk": "#222222", "batchtopk": "#1f77b4", "matryoshka": "#2ca02c", "jumprelu": "#d62728"}


def frontier_figure(rows: list[dict], layer: str) -> go.Figure:
    """Chapter 03's families sweep: FVU and KL recovered (zero ablation) against the measured L0, and the 5x5
    branch's specialised features over chance, for each family (a line through the seeds' means, a point per
    SAE)."""
    panels = [("FVU", "held-out FVU (lower is better)"), ("KL recovered (zero)", "KL recovered, zero ablation"),
              ("5x5 specialised / chance", "5x5-specialised features / chance")]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in panels], horizontal_spacing=0.08)
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family and r["L0"] is not None]
        ks = sorted({r["k"] for r in mine})
        for col, (key, _) in enumerate(panels, 1):
            values = [r[key] for r in mine]
            fig.add_scatter(x=[r["L0"] for r in mine], y=values, mode="markers", row=1, col=col, showlegend=False,
                            marker=dict(color=FAMILY_COLOURS.get(family), size=6, opacity=0.6), name=family,
                            hovertext=[f"{family}, k {r['k']}, seed {r['seed']}" for r in mine])
            means = [(np.mean([r["L0"] for r in mine if r["k"] == k]), np.mean([r[key] for r in mine if r["k"] == k]))
                     for k in ks]
            fig.add_scatter(x=[m[0] for m in means], y=[m[1] for m in means], mode="lines", row=1, col=col,
                            line=dict(color=FAMILY_COLOURS.get(family)), name=family, showlegend=col == 1,
                            legendgroup=family)
    fig.add_hline(y=1, line=dict(color="#999999", dash="dot"), row=1, col=3)
    fig.update_xaxes(title="L0 (held out)", type="log")
    fig.update_layout(height=380, title=f"{layer}: SAE families and sparsities", legend=dict(orientation="h", y=-0.25),
                      margin=dict(l=40, r=10, t=70, b=60))
    return fig
