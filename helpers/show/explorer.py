"""The live explorer (ipywidgets): a layer's features sorted and filtered, one in detail, and a second
tab that looks into any image (an upload too) at a layer, with switching features off computed live.
It reads the same ``LayerView`` per layer as the static atlas (``atlas``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from helpers.analysis.branches import BRANCHES
from helpers.analysis.image_features import ImageProbe
from helpers.data.images import grid, load_image
from helpers.show.atlas import GAP, LayerView, spliced_summary, thumbnails
from helpers.show.page import figure_html, markdown, moves_table
from helpers.show.plots import image_features_figure


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
        self.pixels = self.found = self.message = None
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

    def use_upload(self, value) -> bool:
        """Look into an uploaded file; one that is not an image PIL can read (empty, text, SVG, truncated, a
        decompression bomb) leaves the current image and says why in the tab. Returns whether it was used."""
        import io
        import warnings

        items = list(value.values()) if isinstance(value, dict) else list(value)  # ipywidgets 7 / 8
        if not items:
            return False
        name = items[0].get("name", "the upload")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # > 89M pixels: refused too
                pixels = load_image(io.BytesIO(bytes(items[0]["content"])))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            self.message = (f"**{name}** could not be read as an image ({type(e).__name__}: {str(e)[:200]}); "
                            "upload a JPEG or PNG photograph")
            self.at.clear_output()
            with self.at:
                markdown(self.message)
            return False
        self.message = None
        self.use(pixels)
        return True

    def use(self, pixels: np.ndarray) -> None:
        self.pixels = pixels
        self.show_image()

    def show_image(self) -> None:
        """Encode the image at the current layer; fill the position and feature lists; draw the maps."""
        from IPython.display import HTML, display


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
        rows, features = self.compare(), self.chosen()
        self.moves.clear_output()
        with self.moves:
            markdown(f"{len(features)} features of {self.layer.value} scaled by {self.scale.value:g}:")
            markdown(moves_table(rows))


def show_explorer(layers, view, render=None, book_build: bool = False, probe=None):
    """The live explorer in a notebook with a kernel; in the static book, a pointer to the atlas."""
    if book_build:
        markdown("*The live explorer needs a running kernel (open this notebook in Jupyter or Colab). "
                 "Its static counterpart, the atlas, is linked below.*")
        return None
    from IPython.display import display

    explorer = Explorer(layers, view, render, probe)
    display(explorer.widget)
    return explorer
