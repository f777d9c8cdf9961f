"""Seeing all features at once: a static atlas per layer, and a live ipywidgets explorer.

The atlas (``write_atlas``) is plain HTML + JS, one page per layer, working from the file
system with no server and no CDN: every feature of the layer grouped by dominant branch,
each with a thumbnail (its visualisation where one was rendered, else its top dataset
crop, from one sprite image per layer); a click opens the feature's detail: its example
crops, branch fractions, firing frequency, labels, place on the layer's UMAP, and its
strongest neighbours in the adjacent layers (weight view, the 1x1 path), linked.

``Explorer`` is the same in a live notebook, with sorting and filtering.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .branches import BRANCHES, dominant_branch
from .examples import crop
from .files import atomic_write
from .figures import BRANCH_COLOURS

THUMB, CROP, CROPS = 48, 48, 3


def _sprite(tiles: list[np.ndarray], size: int, per_row: int) -> Image.Image:
    rows = max(1, -(-len(tiles) // per_row))
    sheet = Image.new("RGB", (per_row * size, rows * size), (235, 235, 235))
    for i, t in enumerate(tiles):
        if t is not None:
            sheet.paste(Image.fromarray(np.asarray(t, np.uint8)).resize((size, size)), ((i % per_row) * size,
                                                                                        (i // per_row) * size))
    return sheet


def _save_jpeg(img: Image.Image, path: Path) -> None:
    atomic_write(path, lambda f: img.save(f, format="JPEG", quality=80))


def layer_records(layer: str, analysis: dict, examples, labels: list[dict], coords: np.ndarray,
                  neighbours: dict[str, dict[int, list[tuple[int, float]]]]) -> list[dict]:
    """One JSON-ready record per live feature of the layer."""
    dom = dominant_branch(analysis["fractions"], analysis["shuffled"])
    lo, hi = coords.min(0), coords.max(0)
    norm = (coords - lo) / np.where(hi > lo, hi - lo, 1)
    records = []
    for f in np.flatnonzero(analysis["alive"]):
        records.append({
            "id": int(f), "branch": BRANCHES[dom[f]],
            "fractions": [round(float(v), 3) for v in analysis["fractions"][f]],
            "frequency": float(analysis["frequency"][f]),
            "labels": {k: round(v, 2) for k, v in labels[f].get("labels", {}).items()},
            "top_class_share": labels[f].get("top_class_share"),
            "umap": [round(float(v), 4) for v in norm[f]],
            "max": float(examples.top_value[f, 0]),
            "neighbours": {other: [[int(j), round(float(w), 3)] for j, w in pairs.get(int(f), [])]
                           for other, pairs in neighbours.items()},
        })
    return records


def write_layer_atlas(folder: Path, layer: str, records: list[dict], thumbs: dict[int, np.ndarray],
                      crops: dict[int, list[np.ndarray]], title_note: str = "") -> Path:
    """Write ``folder/<layer>/index.html`` with its two sprite sheets."""
    out = Path(folder) / layer
    out.mkdir(parents=True, exist_ok=True)
    per_row = 40
    order = [r["id"] for r in records]
    _save_jpeg(_sprite([thumbs.get(f) for f in order], THUMB, per_row), out / "thumbs.jpg")
    strips = []
    for f in order:
        cs = (crops.get(f) or [])[:CROPS]
        strip = np.full((CROP, CROP * CROPS, 3), 235, np.uint8)
        for k, c in enumerate(cs):
            strip[:, k * CROP:(k + 1) * CROP] = np.asarray(Image.fromarray(c).resize((CROP, CROP)))
        strips.append(strip)
    sheet = Image.new("RGB", (10 * CROP * CROPS, max(1, -(-len(strips) // 10)) * CROP), (235, 235, 235))
    for i, s in enumerate(strips):
        sheet.paste(Image.fromarray(s), ((i % 10) * CROP * CROPS, (i // 10) * CROP))
    _save_jpeg(sheet, out / "crops.jpg")
    for i, r in enumerate(records):
        r["thumb"] = [(i % per_row) * THUMB, (i // per_row) * THUMB]
        r["crops"] = [(i % 10) * CROP * CROPS, (i // 10) * CROP]
    page = (_TEMPLATE.replace("__LAYER__", html.escape(layer)).replace("__NOTE__", title_note)
            .replace("__DATA__", json.dumps(records).replace("</", "<\\/"))
            .replace("__COLOURS__", json.dumps(BRANCH_COLOURS)).replace("__BRANCHES__", json.dumps(list(BRANCHES)))
            .replace("__THUMB__", str(THUMB)).replace("__CROP__", str(CROP)).replace("__NCROPS__", str(CROPS)))
    atomic_write(out / "index.html", lambda f: f.write(page), mode="w")
    return out / "index.html"


def write_index(folder: Path, layers: list[str], note: str = "") -> Path:
    links = "".join(f'<li><a href="{l}/index.html">{l}</a></li>' for l in layers)
    page = (f"<!doctype html><meta charset=utf-8><title>Feature atlas</title>"
            f"<body style='font-family:sans-serif;margin:2em'><h1>Feature atlas</h1>{note}<ul>{links}</ul>")
    path = Path(folder) / "index.html"
    atomic_write(path, lambda f: f.write(page), mode="w")
    return path


def thumbnails(examples, images, features, featviz: dict[int, Path]) -> tuple[dict, dict]:
    """Per feature: a thumbnail (visualisation if rendered, else top crop) and its top crops."""
    from .images import load_image

    cache: dict[int, np.ndarray] = {}

    def image(i):
        if i not in cache:
            cache[i] = load_image(images.paths[i])
        return cache[i]

    thumbs, crops = {}, {}
    for f in features:
        cs = [crop(image(i), y, x) for i, y, x in zip(examples.top_image[f, :CROPS], examples.top_y[f, :CROPS],
                                                        examples.top_x[f, :CROPS]) if i >= 0]
        crops[f] = cs
        if f in featviz and Path(featviz[f]).exists():
            thumbs[f] = np.asarray(Image.open(featviz[f]).convert("RGB"))
        elif cs:
            thumbs[f] = cs[0]
    return thumbs, crops


_TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__LAYER__: feature atlas</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh}
#main{flex:1;overflow:auto;padding:12px}#detail{width:380px;border-left:1px solid #ccc;padding:12px;overflow:auto}
h1{font-size:20px;margin:4px 0}h2{font-size:15px;margin:14px 0 4px}
.grid{display:flex;flex-wrap:wrap;gap:2px}
.f{width:__THUMB__px;height:__THUMB__px;background-image:url(thumbs.jpg);cursor:pointer;border:2px solid transparent}
.f.sel{border-color:#d62728}.bar{height:12px;display:inline-block}
.crops{width:calc(__CROP__px*__NCROPS__);height:__CROP__px;background-image:url(crops.jpg)}
#umap{width:340px;height:240px;border:1px solid #ddd}.note{color:#b00;font-weight:bold}
</style></head><body>
<div id="main"><h1>__LAYER__: every feature, grouped by dominant branch</h1><div class="note">__NOTE__</div>
<p><a href="../index.html">all layers</a> · click a feature for its detail</p><div id="groups"></div></div>
<div id="detail"><p>Select a feature.</p></div>
<script>
const DATA = __DATA__, COLOURS = __COLOURS__, BRANCHES = __BRANCHES__;
const byId = new Map(DATA.map(r => [r.id, r]));
const groups = document.getElementById("groups");
for (const b of BRANCHES) {
  const members = DATA.filter(r => r.branch === b).sort((p, q) => q.fractions[BRANCHES.indexOf(b)] - p.fractions[BRANCHES.indexOf(b)]);
  const h = document.createElement("h2"); h.textContent = `${b} branch (${members.length})`; h.style.color = COLOURS[b];
  const grid = document.createElement("div"); grid.className = "grid";
  for (const r of members) {
    const d = document.createElement("div"); d.className = "f"; d.id = "f" + r.id; d.title = "feature " + r.id;
    d.style.backgroundPosition = `-${r.thumb[0]}px -${r.thumb[1]}px`;
    d.addEventListener("click", () => show(r.id)); grid.appendChild(d);
  }
  groups.append(h, grid);
}
function show(id) {
  const r = byId.get(id);
  if (!r) { document.getElementById("detail").innerHTML = `<h1 id="detail-title">feature ${id}</h1><p>This feature never fired on the images: it has no examples.</p>`; return; }
  document.querySelectorAll(".f.sel").forEach(e => e.classList.remove("sel"));
  const cell = document.getElementById("f" + id); if (cell) { cell.classList.add("sel"); }
  const bars = BRANCHES.map((b, i) => `<div>${b} <span class="bar" style="width:${Math.round(200 * r.fractions[i])}px;background:${COLOURS[b]}"></span> ${r.fractions[i].toFixed(2)}</div>`).join("");
  const labels = Object.entries(r.labels).map(([k, v]) => `${k} (${v})`).join(", ") || "none";
  const nb = Object.entries(r.neighbours).map(([layer, list]) => `<div>${layer}: ` +
      list.map(([j, w]) => `<a href="../${layer}/index.html#f${j}">${j}</a> (${w})`).join(", ") + "</div>").join("");
  document.getElementById("detail").innerHTML =
    `<h1 id="detail-title">feature ${r.id}</h1><div class="f" style="width:__THUMB__px;background-position:-${r.thumb[0]}px -${r.thumb[1]}px"></div>` +
    `<h2>top dataset examples</h2><div class="crops" style="background-position:-${r.crops[0]}px -${r.crops[1]}px"></div>` +
    `<h2>fraction of the decoder norm per branch</h2>${bars}` +
    `<h2>firing</h2>frequency ${(100 * r.frequency).toFixed(2)}% of vectors, max ${r.max.toFixed(3)}` +
    `<h2>labels</h2>${labels}<h2>place on the UMAP of this layer</h2><canvas id="umap" width="340" height="240"></canvas>` +
    `<h2>strongest neighbours (1x1 path)</h2>${nb || "none"}`;
  const c = document.getElementById("umap").getContext("2d");
  c.fillStyle = "#ccc"; for (const o of DATA) c.fillRect(5 + o.umap[0] * 330, 5 + o.umap[1] * 230, 2, 2);
  c.fillStyle = "#d62728"; c.beginPath(); c.arc(5 + r.umap[0] * 330, 5 + r.umap[1] * 230, 5, 0, 7); c.fill();
  history.replaceState(null, "", "#f" + id);
}
const first = location.hash.startsWith("#f") ? Number(location.hash.slice(2)) : null;
if (first !== null) show(first);
</script></body></html>
"""


class Explorer:
    """A live explorer: pick a layer, sort and filter features, see one in detail."""

    def __init__(self, ctx, layers=None):
        import ipywidgets as W

        from . import runs

        self.ctx, self.runs = ctx, runs
        self.layers = list(layers or ctx.profile.layers)
        self.layer = W.Dropdown(options=self.layers, description="layer")
        self.sort = W.Dropdown(options=[f"{b} fraction" for b in BRANCHES] + ["frequency"], description="sort by")
        self.only = W.Dropdown(options=["all"] + [f"{b} dominant" for b in BRANCHES], description="show")
        self.label = W.Text(description="label has", placeholder="animal, dog, red ...")
        self.pick = W.Select(rows=12, description="feature")
        self.out = W.Output()
        for w in (self.layer, self.sort, self.only, self.label):
            w.observe(lambda _: self.refresh(), names="value")
        self.pick.observe(lambda ch: self.detail(ch["new"]), names="value")
        self.widget = W.HBox([W.VBox([self.layer, self.sort, self.only, self.label, self.pick]), self.out])
        self.refresh()

    def _data(self, layer):
        return (self.runs.branch_analysis(self.ctx, layer), self.runs.ensure_examples(self.ctx, layer),
                self.runs.feature_labels(self.ctx, layer))

    def refresh(self) -> None:
        a, _, labels = self._data(self.layer.value)
        ids = np.flatnonzero(a["alive"])
        if self.only.value != "all":
            b = BRANCHES.index(self.only.value.split()[0])
            ids = ids[dominant_branch(a["fractions"][ids], a["shuffled"]) == b]
        if self.label.value.strip():
            ids = np.array([i for i in ids if any(self.label.value.strip() in k for k in labels[i]["labels"])], int)
        key = a["frequency"] if self.sort.value == "frequency" else a["fractions"][:, BRANCHES.index(self.sort.value.split()[0])]
        ids = ids[np.argsort(-key[ids])] if len(ids) else ids
        self.pick.options = [(f"{i}  ({key[i]:.3f})", int(i)) for i in ids[:500]]

    def describe(self, feature: int) -> tuple[list[str], np.ndarray | None]:
        """What the detail view shows: lines of Markdown and a strip of images (visualisation, crops)."""
        layer = self.layer.value
        a, ex, labels = self._data(layer)
        viz = self.runs.ensure_featviz(self.ctx, layer, [feature])
        thumbs, crops = thumbnails(ex, self.runs.harvest_images(self.ctx), [feature], viz)
        fr = ", ".join(f"{b} {a['fractions'][feature, k]:.2f}" for k, b in enumerate(BRANCHES))
        lines = [f"**{layer} feature {feature}**: fraction per branch {fr}; fires on "
                 f"{100 * a['frequency'][feature]:.2f}% of vectors; labels {labels[feature]['labels'] or 'none'}"]
        for other, pairs in self.runs.weight_neighbours(self.ctx, layer).items():
            lines.append(f"strongest {other} neighbours (1x1 path): " +
                         ", ".join(f"{j} ({w:.3f})" for j, w in pairs.get(int(feature), [])))
        for band, items in enumerate(ex.bands(feature)):
            if items:
                lines.append(f"band {band + 1}: activations " + ", ".join(f"{v:.3f}" for v, *_ in items))
        tiles = ([thumbs[feature]] if feature in thumbs else []) + crops[feature]
        strip = (np.concatenate([np.asarray(Image.fromarray(np.asarray(t, np.uint8)).resize((100, 100)))
                                 for t in tiles], axis=1) if tiles else None)
        return lines, strip

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


def show_explorer(ctx, layers=None):
    """The live explorer in a notebook with a kernel; in the static book, a pointer to the atlas."""
    import os

    from .figures import markdown

    if os.environ.get("SAE_BOOK_BUILD"):
        markdown("*The live explorer needs a running kernel (open this notebook in Jupyter or Colab). "
                 "Its static counterpart, the atlas, is linked below.*")
        return None
    from IPython.display import display

    explorer = Explorer(ctx, layers)
    display(explorer.widget)
    return explorer


def atlas_links(ctx, folder: Path, layers) -> None:
    """Links to the atlas pages: inside the book (copied to its ``atlas/``) or on disk."""
    import os

    from IPython.display import HTML, display

    base = "../atlas" if os.environ.get("SAE_BOOK_BUILD") else Path(folder).resolve().as_uri()
    items = "".join(f'<li><a href="{base}/{l}/index.html">{l}: every feature</a></li>' for l in layers)
    display(HTML(f'<ul class="atlas-links">{items}</ul>'))
