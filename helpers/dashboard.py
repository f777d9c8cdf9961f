"""Seeing all features at once: a static atlas per layer, and a live ipywidgets explorer.

The atlas (``write_atlas``) is plain HTML + JS (the template ``atlas.html``), one page per
layer, working from the file system with no server and no CDN: every feature of the layer
grouped by dominant branch, each with a thumbnail (its visualisation where one was rendered,
else its top dataset crop, from one sprite image per layer); a click opens the feature's
detail: its example crops, branch fractions, firing frequency, labels, place on the layer's
UMAP, and its strongest neighbours in the adjacent layers (weight view, the 1x1 path), linked.
Below the features, the atlas looks into the run's first images (chapter 08): each grid cell's
features, the top classes, and their move when features are switched off (computed in advance).

``Explorer`` is the same in a live notebook, with sorting and filtering, and a second tab
(``ImageExplorer``) for any image, uploaded ones included, with switching computed live. Both read a
``LayerView`` per layer, which ``runs`` assembles; this module knows no run directory.
"""

from __future__ import annotations

import dataclasses
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .branches import BRANCHES, BranchAnalysis
from .examples import Examples, crop
from .files import atomic_write
from .figures import BRANCH_COLOURS
from .image_features import ImageProbe
from .inception import class_label
from .images import ImageList, grid, load_image

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
    """Per feature: a thumbnail (visualisation if rendered, else top crop) and its top crops."""
    ex, cache = view.examples, {}

    def image(i):
        if i not in cache:
            cache[i] = load_image(view.images.paths[i])
        return cache[i]

    thumbs, crops = {}, {}
    for f in features:
        crops[f] = [crop(image(i), y, x) for i, y, x in zip(ex.top_image[f, :CROPS], ex.top_y[f, :CROPS],
                                                             ex.top_x[f, :CROPS]) if i >= 0]
        if f in view.featviz and Path(view.featviz[f]).exists():
            thumbs[f] = np.asarray(Image.open(view.featviz[f]).convert("RGB"))
        elif crops[f]:
            thumbs[f] = crops[f][0]
    return thumbs, crops


def write_layer_atlas(folder: Path, view: LayerView, note: str = "") -> Path:
    """Write ``folder/<layer>/index.html`` with its two sprite sheets (thumbnails; top crops)."""
    out = Path(folder) / view.layer
    out.mkdir(parents=True, exist_ok=True)
    records = layer_records(view)
    order = [r["id"] for r in records]
    thumbs, crops = thumbnails(view, order)
    per_row, strips_per_row = 40, 4
    _save_jpeg(grid([thumbs.get(f) for f in order], THUMB, per_row, gap=GAP), out / "thumbs.jpg")
    # each feature's crops side by side in a strip, the strips with a gap between them
    strips = [np.asarray(grid((crops[f][:CROPS] + [None] * CROPS)[:CROPS], CROP, CROPS)) for f in order]
    sheet = grid(strips, CROP, strips_per_row, gap=GAP, width=CROP * CROPS)
    _save_jpeg(sheet, out / "crops.jpg")
    if view.image_pixels:  # the images the atlas looks into, side by side
        _save_jpeg(grid(view.image_pixels, 224, len(view.image_pixels), gap=GAP), out / "images.jpg")
    for i, r in enumerate(records):
        r["thumb"] = [(i % per_row) * (THUMB + GAP), (i // per_row) * (THUMB + GAP)]
        r["crops"] = [(i % strips_per_row) * (CROP * CROPS + GAP), (i // strips_per_row) * (CROP + GAP)]
    page = (TEMPLATE.read_text().replace("__LAYER__", html.escape(view.layer))
            .replace("__NOTE__", html.escape(note) + spliced_summary(view.spliced))
            .replace("__DENSITY__", density_svg(view.analysis.frequency))
            .replace("__DATA__", json.dumps(records).replace("</", "<\\/"))
            .replace("__IMAGES__", json.dumps(view.image_records).replace("</", "<\\/")).replace("__GAP__", str(GAP))
            .replace("__COLOURS__", json.dumps(BRANCH_COLOURS)).replace("__BRANCHES__", json.dumps(list(BRANCHES)))
            .replace("__THUMB__", str(THUMB)).replace("__CROP__", str(CROP)).replace("__NCROPS__", str(CROPS))
            .replace("__DETAIL__", str(CROP * CROPS + 40)))
    atomic_write(out / "index.html", lambda f: f.write(page), mode="w")
    return out / "index.html"


def spliced_summary(rows: list[dict]) -> str:
    """One line of the layer header: how much of the network the SAE keeps (chapter 03's spliced-in rows)."""
    whole = next((r for r in rows if r["spliced in"] == "SAE reconstruction"), None)
    if whole is None:
        return ""
    return (f"<div class='spliced'>Spliced in (this layer's output replaced by the SAE's reconstruction): top-1 "
            f"agreement with the network {whole['top-1 agreement']:.2f}, KL {whole['KL']:.3g}, KL recovered "
            f"{whole['KL recovered']:.2f} against the mean-vector floor (chapter 03).</div>")


def write_atlas(folder: Path, views: list[LayerView], note: str = "") -> Path:
    """The static atlas: a page per layer and an index linking them; returns ``folder``."""
    for view in views:
        write_layer_atlas(folder, view, note)
    links = "".join(f'<li><a href="{v.layer}/index.html">{v.layer}</a></li>' for v in views)
    page = (f"<!doctype html><meta charset=utf-8><title>Feature atlas</title>"
            f"<body style='font-family:sans-serif;margin:2em'><h1>Feature atlas</h1>"
            f"<p style='color:#b00'>{html.escape(note)}</p><ul>{links}</ul>")
    atomic_write(Path(folder) / "index.html", lambda f: f.write(page), mode="w")
    return Path(folder)


class Explorer:
    """A live explorer: pick a layer, sort and filter features, see one in detail.

    ``view(layer)`` gives a layer's LayerView; ``render(layer, features)`` the paths of the
    features' visualisations (rendered if missing).
    """

    def __init__(self, layers, view: Callable[[str], LayerView],
                 render: Callable[[str, list[int]], dict[int, Path]] | None = None,
                 probe: Callable[[str], ImageProbe] | None = None):
        import ipywidgets as W

        self.layers, self.view, self.render = list(layers), view, render
        self.layer = W.Dropdown(options=self.layers, description="layer")
        self.sort = W.Dropdown(options=[f"{b} fraction" for b in BRANCHES] + ["frequency"], description="sort by")
        self.only = W.Dropdown(options=["all"] + [f"{b} dominant" for b in BRANCHES], description="show")
        self.label = W.Text(description="label has", placeholder="animal, dog, red ...")
        self.pick = W.Select(rows=12, description="feature")
        self.header = W.HTML()  # the layer's spliced-in line (chapter 03), as the atlas's header shows it
        self.out = W.Output()
        for w in (self.layer, self.sort, self.only, self.label):
            w.observe(lambda _: self.refresh(), names="value")
        self.pick.observe(lambda ch: self.detail(ch["new"]), names="value")
        self.widget = W.VBox([self.header, W.HBox([W.VBox([self.layer, self.sort, self.only, self.label, self.pick]),
                                                   self.out])])
        self.image = None
        if probe is not None:  # a second tab: one image, its features, switching them off
            self.image = ImageExplorer(self.layer, view, probe)
            self.widget = W.Tab(children=[self.widget, self.image.widget])
            for i, title in enumerate(["features", "an image"]):
                self.widget.set_title(i, title)
        self.refresh()

    def refresh(self) -> None:
        v = self.view(self.layer.value)
        self.header.value = spliced_summary(v.spliced)
        a = v.analysis
        ids = np.flatnonzero(a.alive)
        if self.only.value != "all":
            ids = ids[a.dominant(ids) == BRANCHES.index(self.only.value.split()[0])]
        if self.label.value.strip():
            ids = np.array([i for i in ids if any(self.label.value.strip() in k for k in v.labels[i]["labels"])], int)
        key = a.frequency if self.sort.value == "frequency" else a.fractions[:, BRANCHES.index(self.sort.value.split()[0])]
        ids = ids[np.argsort(-key[ids])] if len(ids) else ids
        self.pick.options = [(f"{i}  ({key[i]:.3f})", int(i)) for i in ids[:500]]

    def describe(self, feature: int) -> tuple[list[str], np.ndarray | None]:
        """What the detail view shows: lines of Markdown and a strip of images (visualisation, crops)."""
        v = self.view(self.layer.value)
        a, ex = v.analysis, v.examples
        if self.render is not None:
            v = dataclasses.replace(v, featviz={**v.featviz, **self.render(v.layer, [feature])})
        thumbs, crops = thumbnails(v, [feature])
        fr = ", ".join(f"{b} {a.fractions[feature, k]:.2f}" for k, b in enumerate(BRANCHES))
        lines = [f"**{v.layer} feature {feature}**: fraction per branch {fr}; fires on "
                 f"{100 * a.frequency[feature]:.2f}% of vectors; labels {v.labels[feature]['labels'] or 'none'}"]
        for other, pairs in v.neighbours.items():
            lines.append(f"strongest {other} neighbours (1x1 path): " +
                         ", ".join(f"{j} ({w:.3f})" for j, w in pairs.get(int(feature), [])))
        for band, items in enumerate(ex.bands(feature)):
            if items:
                lines.append(f"band {band + 1}: activations " + ", ".join(f"{value:.3f}" for value, *_ in items))
        tiles = ([thumbs[feature]] if feature in thumbs else []) + crops[feature]
        return lines, (np.asarray(grid(tiles, 100, len(tiles))) if tiles else None)

    def detail(self, feature) -> None:
        from IPython.display import display

        from .figures import markdown

        if feature is None:
            return
        lines, strip = self.describe(feature)
        self.out.clear_output()
        with self.out:
            markdown(lines[0])
            if strip is not None:  # its visualisation, then its top dataset crops
                display(Image.fromarray(strip))
            for line in lines[1:]:
                markdown(line)


class ImageExplorer:
    """One image at a time (chapter 08): one of the run's images or an uploaded one; its maps per branch, the
    features at a chosen grid position with their thumbnails, and the top classes' move when chosen features
    (or every feature specialised to a branch) are switched off or scaled. ``layer`` is the explorer's layer
    dropdown; ``probe(layer)`` gives the layer's ``ImageProbe``."""

    def __init__(self, layer, view: Callable[[str], LayerView], probe: Callable[[str], ImageProbe]):
        import ipywidgets as W

        self.layer, self.view, self.probe = layer, view, probe
        paths = view(layer.value).images.paths[:500]
        self.choice = W.Dropdown(options=[(Path(p).name, i) for i, p in enumerate(paths)], description="image")
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="or upload")
        self.position = W.Dropdown(description="position")
        self.features = W.SelectMultiple(rows=6, description="switch")
        self.branch = W.Dropdown(options=[("only those", None)] + [(f"all {b}-specialised", b) for b in BRANCHES],
                                 description="or")
        self.scale = W.FloatSlider(value=0.0, min=0.0, max=3.0, step=0.25, description="scale by")
        self.go = W.Button(description="switch and compare")
        self.maps, self.at, self.moves = W.Output(), W.Output(), W.Output()
        self.pixels = self.found = None
        self.choice.observe(lambda ch: self.select(ch["new"]), names="value")
        self.upload.observe(lambda ch: self.use_upload(ch["new"]), names="value")
        layer.observe(lambda _: self.show_image(), names="value")
        self.position.observe(lambda ch: self.show_position(ch["new"]), names="value")
        self.go.on_click(lambda _: self.show_moves())
        controls = W.VBox([self.choice, self.upload, self.position, self.features, self.branch, self.scale, self.go])
        self.widget = W.VBox([W.HBox([controls, self.at]), self.maps, self.moves])
        if paths:
            self.select(0)

    def select(self, index: int) -> None:
        self.use(load_image(self.view(self.layer.value).images.paths[index]))

    def use_upload(self, value) -> None:
        import io

        items = list(value.values()) if isinstance(value, dict) else list(value)  # ipywidgets 7 / 8
        if items:
            self.use(load_image(io.BytesIO(bytes(items[0]["content"]))))

    def use(self, pixels: np.ndarray) -> None:
        self.pixels = pixels
        self.show_image()

    def show_image(self) -> None:
        """Encode the image at the current layer; fill the position and feature lists; draw the maps."""
        from IPython.display import HTML, display

        from .figures import figure_html, image_features_figure

        probe = self.probe(self.layer.value)
        self.found = probe.features(probe.input([self.pixels]))[0]
        f = self.found
        cells = sorted(((float(f.values[y, x, 0]), y, x) for y in range(f.ids.shape[0]) for x in range(f.ids.shape[1])
                        if f.ids[y, x, 0] >= 0), reverse=True)
        self.position.options = [(f"row {y}, col {x}: feature {f.ids[y, x, 0]} ({v:.3g})", (y, x)) for v, y, x in cells]
        self.features.options = [(f"{i} ({BRANCHES[probe.dominant[i]]}-dominant, sum {s:.3g})", i) for i, s in f.strongest]
        self.features.value = tuple(self.features.options[0][1:]) if self.features.options else ()
        self.maps.clear_output()
        with self.maps:
            display(HTML(figure_html(image_features_figure(self.pixels, f, f"{self.layer.value}: where each branch's "
                                                                           "features fire (hover a cell)"))))

    def at_position(self, y: int, x: int) -> tuple[list[str], np.ndarray | None]:
        """Lines naming the features at grid position (y, x), strongest first, and a strip of their thumbnails."""
        probe, view = self.probe(self.layer.value), self.view(self.layer.value)
        here = self.found.features_at(y, x)
        thumbs, _ = thumbnails(view, [f for f, _ in here])
        lines = [f"**row {y}, col {x}**: " + (", ".join(f"feature {f} ({BRANCHES[probe.dominant[f]]}-dominant) {v:.3g}"
                                                          for f, v in here) or "no feature fires")]
        tiles = [thumbs.get(f) for f, _ in here]
        return lines, (np.asarray(grid(tiles, 72, len(tiles), gap=GAP)) if any(t is not None for t in tiles) else None)

    def show_position(self, where) -> None:
        from IPython.display import display

        from .figures import markdown

        if where is None:
            return
        lines, strip = self.at_position(*where)
        self.at.clear_output()
        with self.at:
            markdown(lines[0])
            if strip is not None:  # each feature's thumbnail, in the order named
                display(Image.fromarray(strip))

    def chosen(self) -> list[int]:
        """The features to switch: those selected, or every feature specialised to the chosen branch."""
        if self.branch.value is not None:
            return self.probe(self.layer.value).specialised_to(self.branch.value)
        return [int(f) for f in self.features.value]

    def compare(self) -> list[dict]:
        """``class_moves`` of the image when the chosen features are scaled by the slider's value."""
        probe = self.probe(self.layer.value)
        return probe.switch(probe.input([self.pixels]), self.chosen(), self.scale.value, found=[self.found])[0]

    def show_moves(self) -> None:
        from .figures import markdown, moves_table

        rows, features = self.compare(), self.chosen()
        self.moves.clear_output()
        with self.moves:
            markdown(f"{len(features)} features of {self.layer.value} scaled by {self.scale.value:g}:")
            markdown(moves_table(rows))


def show_explorer(layers, view, render=None, book_build: bool = False, probe=None):
    """The live explorer in a notebook with a kernel; in the static book, a pointer to the atlas."""
    from .figures import markdown

    if book_build:
        markdown("*The live explorer needs a running kernel (open this notebook in Jupyter or Colab). "
                 "Its static counterpart, the atlas, is linked below.*")
        return None
    from IPython.display import display

    explorer = Explorer(layers, view, render, probe)
    display(explorer.widget)
    return explorer


def atlas_links(folder: Path, layers, book_build: bool = False) -> None:
    """Links to the atlas pages: inside the book (copied to its ``atlas/``) or on disk."""
    from IPython.display import HTML, display

    base = "../atlas" if book_build else Path(folder).resolve().as_uri()
    items = "".join(f'<li><a href="{base}/{layer}/index.html">{layer}: every feature</a></li>' for layer in layers)
    display(HTML(f'<ul class="atlas-links">{items}</ul>'))
