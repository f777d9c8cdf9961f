"""The artifacts of a profile's run directory, made once and reused by every notebook.

``ensure_*`` return what is there when it is finished, resume it when it is not, and make
it otherwise: a harvest, one SAE per layer, each SAE's firing statistics, and the branch
analysis of its decoder vectors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .profiles import SAMPLE, Context


def image_source(ctx: Context) -> str:
    """The profile's images; for smoke, an even spread of the ImageNet sample, else generated ones."""
    p = ctx.profile
    if p.images != "sample-or-generated":
        return p.images
    if SAMPLE.is_dir():
        files = sorted(SAMPLE.glob("*.JPEG"))
        step = max(1, len(files) // p.max_images)
        listing = ctx.run_dir / "images.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("\n".join(str(f) for f in files[::step][: p.max_images]) + "\n")
        return str(listing)
    from .images import generate_images

    folder = ctx.run_dir / "generated-images"
    generate_images(folder, p.max_images)
    return str(folder)


def ensure_harvest(ctx: Context) -> Path:
    """The profile's harvest: reused when finished, resumed when not, made otherwise."""
    from .harvest import HarvestConfig, harvest
    from .store import read_manifest

    manifest = ctx.harvest_dir / "manifest.json"
    if manifest.exists() and read_manifest(ctx.harvest_dir).get("complete"):
        return ctx.harvest_dir
    p = ctx.profile
    return harvest(HarvestConfig(images=image_source(ctx), out=str(ctx.harvest_dir), layers=",".join(p.layers),
                                 per_image=p.per_image, sampling=p.sampling, weights=p.weights,
                                 max_images=p.max_images, batch_size=p.harvest_batch,
                                 workers=min(4, os.cpu_count() or 1)))


def ensure_saes(ctx: Context) -> dict[str, Path]:
    """One SAE per layer: reused when saved, trained (or fetched, for SAE_SAES=author) otherwise."""
    from .train import CHECKPOINT, TrainConfig, train

    p = ctx.profile
    out = {}
    for layer in p.layers:
        directory = ctx.sae_dir(layer)
        if not (directory / "cfg.json").exists():
            if ctx.saes == "author":
                from .author import REPO_ID, fetch_author_sae

                fetch_author_sae(layer).save(directory, layer=layer, source=f"hf:{REPO_ID}",
                                             weights_id="lucent (the author's)", random_weights=False)
            else:
                train(TrainConfig(run=str(ensure_harvest(ctx)), layer=layer, out=str(directory),
                                  expansion=p.expansion, k=p.k, tied=p.tied, aux_k=p.aux_k,
                                  batch_size=p.batch_size, vectors_seen=p.vectors_seen,
                                  resume=(directory / CHECKPOINT).exists()))
        out[layer] = directory
    return out


_MEMO: dict = {}


def _memo(fn):
    """Remember fn(ctx, layer, ...) per SAE directory: what it derives from a finished SAE never
    changes, and notebooks, the atlas and the explorer ask for the same layer many times."""
    import functools

    @functools.wraps(fn)
    def wrapper(ctx: Context, layer: str, *args, **kw):
        key = (fn.__name__, str(ctx.sae_dir(layer)), args, tuple(sorted(kw.items())))
        if key not in _MEMO:
            _MEMO[key] = fn(ctx, layer, *args, **kw)
        return _MEMO[key]

    return wrapper


@_memo
def load_sae(ctx: Context, layer: str):
    from .sae import TopKSAE

    return TopKSAE.load(ensure_saes(ctx)[layer])


def ensure_feature_stats(ctx: Context, layer: str, max_vectors: int = 500_000) -> dict[str, np.ndarray]:
    """Each feature's firing frequency and strength on the layer's harvested vectors (cached)."""
    from safetensors.numpy import load_file, save

    from .files import atomic_write
    from .sae import firing_stats
    from .store import ActivationStore

    path = ensure_saes(ctx)[layer] / "feature_stats.safetensors"
    if not path.exists():
        sae = load_sae(ctx, layer)
        vectors = ActivationStore(ensure_harvest(ctx), layer).load(max_vectors)
        batches = (torch.from_numpy(vectors[i:i + 8192].astype(np.float32)) for i in range(0, len(vectors), 8192))
        stats = {k: v.numpy() for k, v in firing_stats(sae, batches).items()}
        data = save(stats)
        atomic_write(path, lambda f: f.write(data))
    return load_file(path)


@_memo
def branch_analysis(ctx: Context, layer: str, seed: int = 0) -> dict:
    """Fractions per feature and branch (relu and plain), both baselines, and which features live."""
    from .branches import baseline, fraction_in_branch
    from .inception import architecture_slices

    sae = load_sae(ctx, layer)
    cfg = json.loads((ensure_saes(ctx)[layer] / "cfg.json").read_text())
    slices = ({b: tuple(s) for b, s in cfg["branch_slices"].items()} if cfg.get("branch_slices")
              else architecture_slices(layer))
    decoder = sae.decoder_directions.detach()
    stats = ensure_feature_stats(ctx, layer)
    return {"layer": layer, "slices": slices, "fractions": fraction_in_branch(decoder, slices),
            "plain": fraction_in_branch(decoder, slices, positive=False),
            "shuffled": baseline(decoder, slices, "shuffled", seed=seed),
            "gaussian": baseline(decoder, slices, "gaussian", seed=seed),
            "alive": stats["frequency"] > 0, "frequency": stats["frequency"]}


_MODELS: dict = {}


def load_model_for(ctx: Context, redirected_relu: bool = False):
    """The profile's InceptionV1, loaded once per process: with true ReLU gradients, or with
    Lucent's redirected ReLU (which helps feature visualisation start from noise)."""
    from .inception import load_model

    key = (ctx.profile.weights, redirected_relu)
    if key not in _MODELS:
        _MODELS[key] = load_model(ctx.profile.weights, redirected_relu=redirected_relu)[0]
    return _MODELS[key]


def layer_activations(ctx: Context, layers, n_images: int) -> dict[str, torch.Tensor]:
    """Full [n, C, 14, 14] activations of ``layers`` on the first ``n_images`` harvested images."""
    from .images import load_image
    from .inception import LayerCapture, model_input_from_uint8
    from .store import read_manifest

    manifest = read_manifest(ensure_harvest(ctx))
    skipped = {s[0] for s in manifest.get("skipped", [])}
    paths = [p for i, p in enumerate(manifest["images"]["paths"]) if i not in skipped][:n_images]
    pixels = torch.stack([torch.from_numpy(load_image(Path(p))).permute(2, 0, 1) for p in paths])
    with torch.no_grad():
        return LayerCapture(load_model_for(ctx), layers)(model_input_from_uint8(pixels))


def cross_layer_share(ctx: Context, analyses: dict, acts: dict, saes: dict, top: float = 0.01) -> list[dict]:
    """Per adjacent layer pair: of the strongest attribution edges between specialised features,
    the share joining the same branch type, against chance (targets' branches permuted)."""
    from .branches import same_branch_share, specialised_branch
    from .circuits import active_features, attribution, next_layer, strong_edges

    rows = []
    model = load_model_for(ctx)
    for src in list(analyses)[:-1]:
        dst = next_layer(src)
        if dst not in analyses:
            continue
        sources = active_features(saes[src], acts[src])[: ctx.profile.circuit_sources]
        sources, effects = attribution(model, saes[src], saes[dst], src, acts[src], sources=sources)
        a, b = analyses[src], analyses[dst]
        share = same_branch_share(strong_edges(sources, effects, top),
                                  specialised_branch(a["fractions"], a["shuffled"], a["alive"]),
                                  specialised_branch(b["fractions"], b["shuffled"], b["alive"]))
        rows.append({"from": src, "to": dst, **{k: round(v, 3) if isinstance(v, float) else v for k, v in share.items()}})
    return rows


def harvest_images(ctx: Context):
    """The harvest's images, in the harvest's order, as an ImageList."""
    from .images import ImageList
    from .store import read_manifest

    record = read_manifest(ensure_harvest(ctx))["images"]
    return ImageList([Path(p) for p in record["paths"]], record["classes"], record["source"])


@_memo
def ensure_examples(ctx: Context, layer: str):
    """Every feature's dataset examples over the harvest's images (one streaming pass, cached)."""
    from .examples import Examples, example_pass

    path = ensure_saes(ctx)[layer] / "examples.safetensors"
    if not path.exists():
        example_pass(load_model_for(ctx), load_sae(ctx, layer), layer, harvest_images(ctx)).save(path)
    return Examples.load(path)


def ensure_cell_colours(ctx: Context) -> np.ndarray:
    """[n_images, 14, 14, 3] mean colour around every grid cell of every harvested image (cached)."""
    from .examples import cell_colours
    from .images import load_image

    path = ensure_harvest(ctx) / "cell_colours.npy"
    if not path.exists():
        from .files import write_npy

        colours = []
        for p in harvest_images(ctx).paths:
            try:
                colours.append(cell_colours(load_image(p)))
            except Exception:  # skipped by the harvest too
                colours.append(np.zeros((14, 14, 3)))
        write_npy(path, np.stack(colours).astype(np.float32))
    return np.load(path)


@_memo
def feature_labels(ctx: Context, layer: str, top: int = 8) -> list[dict]:
    """Class and colour labels of every feature, from its top examples."""
    from .labels import class_labels, colour_label

    ex = ensure_examples(ctx, layer)
    labels = class_labels(ex.top_image[:, :top], harvest_images(ctx).classes)
    colours = ensure_cell_colours(ctx)
    for f, entry in enumerate(labels):
        ok = ex.top_image[f, :top] >= 0
        rgb = colours[ex.top_image[f, :top][ok], ex.top_y[f, :top][ok], ex.top_x[f, :top][ok]]
        entry["labels"].update(colour_label(rgb) if ok.sum() >= 3 else {})
    return labels


def ensure_featviz(ctx: Context, layer: str, features) -> dict[int, Path]:
    """Feature visualisations (PNG, cached under the run's ``featviz/``) of ``features``."""
    from .featviz import FeatvizConfig, render_features

    cfg = FeatvizConfig(steps=ctx.profile.featviz_steps, size=ctx.profile.featviz_size)
    return render_features(load_model_for(ctx, redirected_relu=True), layer, load_sae(ctx, layer), ensure_saes(ctx)[layer], features,
                           ctx.run_dir / "featviz", cfg)


def figure1_panels(ctx: Context, analyses: dict, crops: int = 3) -> dict:
    """For figure 1: per layer and branch, the most specialised features' visualisation and top crops."""
    from PIL import Image

    from .branches import BRANCHES, most_specialised
    from .examples import crop
    from .images import load_image

    images = harvest_images(ctx)
    panels = {}
    for layer, a in analyses.items():
        ex = ensure_examples(ctx, layer)
        picks = {b: [f for f in most_specialised(a["fractions"], a["shuffled"], b, None, a["alive"])
                     if ex.top_image[f, 0] >= 0][: ctx.profile.figure1_per_branch] for b in BRANCHES}
        viz = ensure_featviz(ctx, layer, [f for fs in picks.values() for f in fs])
        for b, features in picks.items():
            panels[(layer, b)] = [
                (f, np.asarray(Image.open(viz[f]).convert("RGB")),
                 [crop(load_image(images.paths[i]), y, x) for i, y, x in
                  zip(ex.top_image[f, :crops], ex.top_y[f, :crops], ex.top_x[f, :crops]) if i >= 0])
                for f in features]
    return panels


@_memo
def weight_neighbours(ctx: Context, layer: str, top: int = 5) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """Each feature's strongest neighbours through the 1x1 path, in the layers before and after."""
    from .circuits import NEXT, weight_edges
    from .inception import branch_slices

    model = load_model_for(ctx)
    previous = {v: k for k, v in NEXT.items()}
    out = {}
    for other, src, dst in ((NEXT.get(layer), layer, NEXT.get(layer)), (previous.get(layer), previous.get(layer), layer)):
        if other is None or other not in ctx.profile.layers:
            continue
        w = weight_edges(model, dst, load_sae(ctx, src), load_sae(ctx, dst), branch_slices(model, [dst])[dst])
        w = w if src == layer else w.T  # rows: this layer's features
        w = np.where(branch_analysis(ctx, other)["alive"][None, :], w, 0)  # link only to features that fire
        best = np.argsort(-np.abs(w), axis=1)[:, :top]
        out[other] = {i: [(int(j), float(w[i, j])) for j in best[i]] for i in range(len(w))}
    return out


def write_atlas(ctx: Context, layers=None) -> Path:
    """The static feature atlas of every layer, under the run's ``atlas/``."""
    from .dashboard import layer_records, thumbnails, write_index, write_layer_atlas
    from .embed import umap_embedding
    from .featviz import FeatvizConfig, cache_path, sae_id

    layers = list(layers or ctx.profile.layers)
    folder = ctx.run_dir / "atlas"
    note = ("RANDOM WEIGHTS: NOT A RESULT. These features come from InceptionV1 with random weights."
            if ctx.random_weights else f"{ctx.profile.name} profile")
    images = harvest_images(ctx)
    cfg = FeatvizConfig(steps=ctx.profile.featviz_steps, size=ctx.profile.featviz_size)
    for layer in layers:
        a, ex = branch_analysis(ctx, layer), ensure_examples(ctx, layer)
        sid = sae_id(ensure_saes(ctx)[layer])
        features = np.flatnonzero(a["alive"])
        viz = {int(f): cache_path(ctx.run_dir / "featviz", sid, layer, int(f), cfg) for f in features}
        coords = umap_embedding(load_sae(ctx, layer).decoder_directions).coords
        records = layer_records(layer, a, ex, feature_labels(ctx, layer), coords, weight_neighbours(ctx, layer))
        thumbs, crops = thumbnails(ex, images, features, viz)
        write_layer_atlas(folder, layer, records, thumbs, crops, note)
    write_index(folder, layers, f"<p style='color:#b00'>{note}</p>")
    return folder


def feature_bands(ctx: Context, layer: str, feature: int, n_bands: int = 4, per_band: int = 4) -> list:
    """Rows for ``figures.example_bands_image``: the top image with the feature's map as an
    overlay, then crops at a range of activation levels, strongest band first."""
    from .examples import activation_map, crop, overlay
    from .images import load_image

    ex, images = ensure_examples(ctx, layer), harvest_images(ctx)
    rows = []
    if ex.top_image[feature, 0] >= 0:
        img = load_image(images.paths[ex.top_image[feature, 0]])
        amap = activation_map(load_model_for(ctx), load_sae(ctx, layer), layer,
                              torch.from_numpy(img).permute(2, 0, 1), feature)
        rows.append(("top image, map", [img, overlay(img, amap)]))
    for b, items in reversed(list(enumerate(ex.bands(feature, n_bands, per_band)))):
        crops = [crop(load_image(images.paths[i]), y, x) for _, i, y, x in items]
        rows.append((f"band {b + 1}/{n_bands}", crops))
    return rows


def label_table(ctx: Context) -> list[dict]:
    """Per layer: how many features the automatic labels mark, by label."""
    from .labels import highlight_sets

    rows = []
    for layer in ctx.profile.layers:
        sets = highlight_sets(feature_labels(ctx, layer))
        colours = {k.split(": ")[1]: len(v) for k, v in sets.items() if k.startswith("colour")}
        rows.append({"layer": layer, "animal": len(sets.get("animal", [])), "dog": len(sets.get("dog", [])),
                     "colour": ", ".join(f"{c} {n}" for c, n in sorted(colours.items())) or "none"})
    return rows
