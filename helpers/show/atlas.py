"""Seeing all features at once, offline: a static atlas page per layer (``write_atlas``).

The atlas (``write_atlas``) is plain HTML + JS (the template ``atlas.html``), one page per
layer, working from the file system with no server and no CDN: every feature of the layer
grouped by dominant branch, each with a thumbnail (its visualisation where one was rendered,
else its top dataset crop, from one sprite image per layer); a click opens the feature's
detail: its example crops, branch fractions, firing frequency, labels, place on the layer's
UMAP, and its strongest neighbours in the adjacent layers (weight view, the 1x1 path), linked.
Below the features, the atlas looks into the run's first images (chapter 08): each grid cell's
features, the top classes, and their move when features are switched off (computed in advance).

The live explorer (``explorer``) shows the same in a notebook. Both read a ``LayerView`` per layer,
which the run layer assembles; this module knows no run directory.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from helpers.analysis.branches import BRANCHES, BranchAnalysis
from helpers.config import check_layers
from helpers.analysis.examples import Examples, crop
from helpers.files import atomic_write
from helpers.show.style import BRANCH_COLOURS
from helpers.analysis.image_features import ImageProbe
from helpers.data.inception import class_label
from helpers.data.images import ImageList, grid, load_image

THUMB, CROP, CROPS, GAP = 48, 96, 3, 2  # px; GAP keeps JPEG bleed of a neighbouring tile out of view
TEMPLATE = Path(__file__).with_name("atlas.html")


@dataclass
class LayerView:
    """What the atlas and the explorer show of one layer."""

    layer: str
    analysis: BranchAnalysis
    examples: Examples
    labels: list[dict]  # per feature, from labels.feature_labels
    coords: np.ndarray  # [n, 2] UMAP of the decoder vectors
    neighbours: dict[str, dict[int, list[tuple[int, float]]]]  # adjacent layer -> feature -> [(j, weight)]
    images: ImageList  # the images the examples index
    featviz: dict[int, Path]  # rendered visualisations that exist
    spliced: list[dict] = dataclasses.field(default_factory=list)  # chapter 03's spliced-in rows of the layer's SAE
    image_pixels: list = dataclasses.field(default_factory=list)  # the images the atlas looks into (uint8 [224, 224, 3])
    image_records: list[dict] = dataclasses.field(default_factory=list)  # ``image_records`` of them
    origin: str = ""  # whose SAE this is: the author's file, or trained here (and why)
    measures: dict = dataclasses.field(default_factory=dict)  # the SAE's held-out measures (cfg.json metadata.held_out)
    coherence: dict = dataclasses.field(default_factory=dict)  # chapter 03's spatial coherence summary
    probing: list = dataclasses.field(default_factory=list)  # chapter 03's sparse probing rows
    absorption: list | None = None  # chapter 03's absorption rows (None: WordNet not on the machine)


def _save_jpeg(img: Image.Image, path: Path) -> None:
    atomic_write(path, lambda f: img.save(f, format="JPEG", quality=80))


def layer_records(view: LayerView) -> list[dict]:
    """One JSON-ready record per live feature of the layer."""
    a, ex = view.analysis, view.examples
    dom = a.dominant()
    lo, hi = view.coords.min(0), view.coords.max(0)
    norm = (view.coords - lo) / np.where(hi > lo, hi - lo, 1)
    return [{
        "id": int(f), "branch": BRANCHES[dom[f]],
        "fractions": [round(float(v), 3) for v in a.fractions[f]],
        "excess": [round(float(v), 3) for v in a.fractions[f] - a.shuffled.mean],  # over chance, per branch
        "frequency": float(a.frequency[f]),
        "labels": {k: round(v, 2) for k, v in view.labels[f].get("labels", {}).items()},
        "top_class_share": view.labels[f].get("top_class_share"),
        "umap": [round(float(v), 4) for v in norm[f]],
        "max": float(ex.top_value[f, 0]),
        "hist": activation_histogram(ex, int(f)),
        "neighbours": {other: [[int(j), round(float(w), 3)] for j, w in pairs.get(int(f), [])]
                       for other, pairs in view.neighbours.items()},
    } for f in np.flatnonzero(a.alive)]


HIST_BINS = 10


def activation_histogram(ex: Examples, feature: int) -> list[int]:
    """Counts, in ``HIST_BINS`` equal bins from 0 to the feature's maximum, of its activation over the uniform
    sample of images where it fires (each image's strongest position; the example pass's reservoir)."""
    values = ex.sample_value[feature][ex.sample_image[feature] >= 0]
    top = float(ex.top_value[feature, 0])
    if top <= 0 or len(values) == 0:
        return [0] * HIST_BINS
    return [int(c) for c in np.histogram(np.clip(values, 0, top), bins=HIST_BINS, range=(0, top))[0]]


def density_svg(frequency: np.ndarray, width: int = 360, height: int = 90) -> str:
    """The layer's feature density: a histogram of log10 firing frequency over its live features, as inline
    SVG, with the dead features (which never fire) counted beside it."""
    live = frequency[frequency > 0]
    dead = int((frequency <= 0).sum())
    if len(live) == 0:
        return f"<div id='density'>no feature fires ({dead} dead)</div>"
    lo = np.floor(np.log10(live.min()))
    counts, edges = np.histogram(np.log10(live), bins=20, range=(lo, 0))
    w = width / len(counts)
    bars = "".join(f"<rect x='{i * w:.1f}' y='{height - 16 - (height - 20) * c / counts.max():.1f}' width='{w - 1:.1f}' "
                   f"height='{(height - 20) * c / counts.max():.1f}' fill='#4C78A8'><title>{c} features, frequency "
                   f"10^{edges[i]:.1f} to 10^{edges[i + 1]:.1f}</title></rect>" for i, c in enumerate(counts))
    return (f"<div id='density'><b>feature density</b>: how often each live feature fires (log10 of the share of "
            f"vectors), {len(live)} live, {dead} dead<br><svg width='{width}' height='{height}'>{bars}"
            f"<text x='0' y='{height - 2}' font-size='10'>10^{lo:.0f}</text>"
            f"<text x='{width - 16}' y='{height - 2}' font-size='10'>1</text></svg></div>")


ATLAS_IMAGES, ATLAS_SWITCHED = 6, 2  # images the atlas looks into; their strongest features switched off one by one


def _sig(v: float) -> float:
    return float(f"{v:.3g}")


def image_records(probe: ImageProbe, images: list[np.ndarray], top: int = 5, switched: int = ATLAS_SWITCHED) -> list[dict]:
    """What the atlas shows of each image at the probe's layer (chapter 08): each grid cell's strongest features
    and their activations, the image's top classes, and the classes' move when each of its ``switched``
    strongest features is switched off, and when every feature specialised to a branch is."""
    if not images:
        return []
    x = probe.input(images)
    found = probe.features(x, top)
    by_branch = {b: probe.specialised_to(b) for b in BRANCHES}
    branch_moves = {b: probe.switch(x, ids, found=found) for b, ids in by_branch.items() if ids}
    records = []
    for i, f in enumerate(found):
        switches = [{"what": f"feature {j} off", "rows": probe.switch(x[i:i + 1], [j], found=[f])[0]}
                    for j, _ in f.strongest[:switched]]
        switches += [{"what": f"all {len(by_branch[b])} {b}-specialised features off", "rows": moves[i]}
                     for b, moves in branch_moves.items()]
        for sw in switches:
            sw["rows"] = [{**r, "before": _sig(r["before"]), "after": _sig(r["after"]), "change": _sig(r["change"])}
                          for r in sw["rows"]]
        probs = np.exp(f.log_probs)
        records.append({"ids": f.ids.tolist(), "values": np.vectorize(_sig)(f.values).tolist(),
                        "branch": {int(j): BRANCHES[probe.dominant[j]] for j in np.unique(f.ids[f.ids >= 0])},
                        "classes": [[class_label(int(c), probe.names), _sig(probs[c])] for c in np.argsort(-probs)[:5]],
                        "strongest": [[j, _sig(v)] for j, v in f.strongest], "switches": switches})
    return records


def thumbnails(view: LayerView, features) -> tuple[dict, dict]:
    """Per feature: a thumbnail (visualisation if rendered, else top crop) and its top crops (a window that several
    features share is one array)."""
    ex, cache, windows = view.examples, {}, {}

    def image(i):
        if i not in cache:
            cache[i] = load_image(view.images.paths[i])
        return cache[i]

    def window(i, y, x):
        if (i, y, x) not in windows:
            windows[i, y, x] = crop(image(i), y, x)
        return windows[i, y, x]

    thumbs, crops = {}, {}
    for f in features:
        crops[f] = [window(i, y, x) for i, y, x in zip(ex.top_image[f, :CROPS], ex.top_y[f, :CROPS],
                                                        ex.top_x[f, :CROPS]) if i >= 0]
        if f in view.featviz and Path(view.featviz[f]).exists():
            thumbs[f] = np.asarray(Image.open(view.featviz[f]).convert("RGB"))
        elif crops[f]:
            thumbs[f] = crops[f][0]
    return thumbs, crops


def script_json(value) -> str:
    """``value`` as JSON that can stand inside a <script> element: no '<', '>' or '&' (so no '</script>' or
    '<!--' in a class name or a label can end or blank the script)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def fill(template: str, values: dict[str, str]) -> str:
    """The template's ``__NAME__`` markers replaced in one pass: a value that holds a marker (a note saying
    ``__IMAGES__``) stays as it is. Every marker of the template must be given."""
    missing = set(re.findall(r"__([A-Z_]+?)__", template)) - set(values)
    if missing:
        raise ValueError(f"the atlas template's markers {sorted(missing)} were given no value")
    return re.sub(r"__([A-Z_]+?)__", lambda m: values[m.group(1)], template)


def write_layer_atlas(folder: Path, view: LayerView, note: str = "") -> Path:
    """Write ``folder/<layer>/index.html`` with its two sprite sheets (thumbnails; top crops)."""
    check_layers([view.layer])  # a layer name of InceptionV1, never a path ("../../x")
    out = Path(folder) / view.layer
    out.mkdir(parents=True, exist_ok=True)
    records = layer_records(view)
    order = [r["id"] for r in records]
    thumbs, crops = thumbnails(view, order)
    per_row, strips_per_row = 40, 4
    _save_jpeg(grid([thumbs.get(f) for f in order], THUMB, per_row, gap=GAP), out / "thumbs.jpg")
    # each feature's crops side by side in a strip, the strips with a gap between them
    sized = {}  # a window's array id -> the window at the sheet's size: one shared by several features resized once

    def small(window):
        if id(window) not in sized:
            sized[id(window)] = np.asarray(grid([window], CROP, 1))
        return sized[id(window)]

    strips = [np.asarray(grid([small(c) for c in crops[f]] + [None] * (CROPS - len(crops[f])), CROP, CROPS))
              for f in order]
    sheet = grid(strips, CROP, strips_per_row, gap=GAP, width=CROP * CROPS)
    _save_jpeg(sheet, out / "crops.jpg")
    if view.image_pixels:  # the images the atlas looks into, side by side
        _save_jpeg(grid(view.image_pixels, 224, len(view.image_pixels), gap=GAP), out / "images.jpg")
    for i, r in enumerate(records):
        r["thumb"] = [(i % per_row) * (THUMB + GAP), (i // per_row) * (THUMB + GAP)]
        r["crops"] = [(i % strips_per_row) * (CROP * CROPS + GAP), (i // strips_per_row) * (CROP + GAP)]
    page = fill(TEMPLATE.read_text(), {
        "LAYER": html.escape(view.layer), "LAYER_JS": script_json(view.layer),
        "NOTE": html.escape(note) + origin_line(view.origin) + spliced_summary(view.spliced)
                + measures_line(view.measures, view.coherence) + probing_line(view.probing, view.absorption),
        "DENSITY": density_svg(view.analysis.frequency), "DATA": script_json(records),
        "IMAGES": script_json(view.image_records), "GAP": str(GAP), "COLOURS": script_json(BRANCH_COLOURS),
        "BRANCHES": script_json(list(BRANCHES)), "CHANCE": script_json([round(float(v), 3) for v in view.analysis.shuffled.mean]), "THUMB": str(THUMB), "CROP": str(CROP), "NCROPS": str(CROPS),
        "DETAIL": str(CROP * CROPS + 40)})
    atomic_write(out / "index.html", lambda f: f.write(page), mode="w")
    return out / "index.html"


def origin_line(origin: str) -> str:
    """One line of the layer header: whose SAE the page shows."""
    return f"<div class='origin'>This layer's SAE: {html.escape(origin)}.</div>" if origin else ""


def spliced_summary(rows: list[dict]) -> str:
    """One line of the layer header: how much of the network the SAE keeps (chapter 03's spliced-in rows)."""
    whole = next((r for r in rows if r["spliced in"] == "SAE reconstruction"), None)
    if whole is None:
        return ""
    return (f"<div class='spliced'>Spliced in (this layer's output replaced by the SAE's reconstruction): top-1 "
            f"agreement with the network {whole['top-1 agreement']:.2f}, KL {whole['KL']:.3g}, KL recovered "
            f"{whole['KL recovered']:.2f} against the mean-vector floor, "
            f"{whole.get('KL recovered (zero)', float('nan')):.2f} against zero ablation (the field's convention; "
            f"chapter 03).</div>")


def measures_line(measures: dict, coherence: dict) -> str:
    """One line of the layer header: the SAE's held-out measures and its features' spatial coherence (chapter 03)."""
    parts = [f"{name} {measures[name]:.3g}" for name in ("L0", "FVU", "cosine", "L2 ratio", "relative reconstruction bias",
                                                        "dead fraction") if isinstance(measures.get(name), (int, float))]
    if coherence.get("features measured"):
        moran = coherence["mean Moran's I"]
        parts.append(f"Moran's I {moran:.2f} (shuffled {coherence['shuffled positions']:.2f}; "
                     f"{coherence['above the shuffled 99th percentile']:.0%} of features above its 99th percentile)")
    return f"<div class='measures'>Held out: {html.escape(', '.join(parts))} (chapter 03).</div>" if parts else ""


def probing_line(probing: list[dict], absorption: list[dict] | None) -> str:
    """One line of the layer header: sparse probing's mean balanced accuracy per basis, and absorption (chapter 03)."""
    parts = []
    for basis in ("SAE features", "neurons", "random directions"):
        mine = [r for r in probing if r["basis"] == basis]
        if mine:
            parts.append(f"{basis} {sum(r['k=1'] for r in mine) / len(mine):.2f}")
    text = f"1-sparse probes over {len(mine)} classes (balanced accuracy): {', '.join(parts)}." if parts else ""
    if absorption:
        rate = sum(r["absorption rate"] for r in absorption) / len(absorption)
        text += f" Absorption over {len(absorption)} parent concepts: mean rate {rate:.2f}."
    return f"<div class='probing'>{html.escape(text)} (chapter 03)</div>" if text else ""


def write_atlas(folder: Path, views: list[LayerView], note: str = "") -> Path:
    """The static atlas: a page per layer and an index linking them; returns ``folder``."""
    for view in views:
        write_layer_atlas(folder, view, note)
    links = "".join(f'<li><a href="{html.escape(v.layer)}/index.html">{html.escape(v.layer)}</a></li>' for v in views)
    page = (f"<!doctype html><meta charset=utf-8><meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>Feature atlas</title><body style='font-family:sans-serif;margin:2em'><h1>Feature atlas</h1>"
            f"<p style='color:#b00'>{html.escape(note)}</p><ul>{links}</ul>"
            f"<p><a id='book' href='../index.html'>Back to the book</a> (where the atlas was built with it)</p>")
    atomic_write(Path(folder) / "index.html", lambda f: f.write(page), mode="w")
    return Path(folder)


def atlas_links(folder: Path, layers, book_build: bool = False) -> None:
    """Links to the atlas pages: inside the book (copied to its ``atlas/``) or on disk."""
    from IPython.display import HTML, display

    base = "../atlas" if book_build else Path(folder).resolve().as_uri()
    items = "".join(f'<li><a href="{base}/{layer}/index.html">{layer}: every feature</a></li>' for layer in layers)
    display(HTML(f'<ul class="atlas-links">{items}</ul>'))
