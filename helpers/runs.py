"""A profile's run directory: the one module that knows where artifacts live and how each is made.

``get(ctx, what, layer=None)`` is the one verb: it returns the artifact, made first if it
is missing (a harvest or a training that was interrupted resumes), and remembered for the
rest of the process. What it can get (``ARTIFACTS``)::

    harvest         the harvest's run directory (chapter 02)
    images          the harvest's images, in order (an ImageList)
    model           the profile's InceptionV1 (true ReLU gradients)
    featviz_model   the same with Lucent's redirected ReLU, for feature visualisation
    cell_colours    [images, 14, 14, 3] mean colour around every grid cell
    atlas           the static feature atlas of every layer (its folder)
    sae_dir, sae    the layer's SAE directory / loaded TopKSAE (trained, or the author's)
    spliced         the spliced-in evaluation of the layer's SAE (chapter 03), kept beside it
    slices          the layer's branch slices, as the SAE's cfg.json records them
    feature_stats   each feature's firing frequency and strength on the harvested vectors
    branches        the layer's BranchAnalysis (chapter 04)
    examples        every feature's dataset examples (one streaming pass, for every layer still without them)
    labels          every feature's automatic labels (chapter 07)
    neighbours      each feature's strongest neighbours in the adjacent layers (weights, chapter 05)
    umap            the UMAP fit of the layer's decoder vectors (chapter 06)
    class_names     the names of the network's outputs (None: random weights, or not downloadable)
    probe           what looking into images at the layer needs (an image_features.ImageProbe, chapter 08)
    view            what the atlas and the explorer show of the layer (a dashboard.LayerView)

Six functions take more than a layer: ``first_images``, ``model_inputs`` and ``layer_activations``
(the first images, the network's input for them and their full activation maps), ``featviz`` (visualisations of chosen features, cached as PNG files),
``sae_with_seed`` (the layer's SAE trained from another seed, chapter 09) and
``untrained_control`` (the same profile on the untrained network, chapter 04).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.numpy import load_file, save

from . import branches, circuits, dashboard, embed, labels
from .author import REPO_ID, fetch_author_sae
from .examples import Examples, cell_colours, example_passes
from .featviz import cache_path, render_features, sae_id
from .files import (CFG_FILE, CHECKPOINT, EXAMPLES, EXAMPLES_CHECKPOINT, FEATURE_STATS, MANIFEST, atomic_write,
                    write_json, write_npy)
from .harvest import harvest
from .images import ImageList, generate_images, load_image
from .image_features import ImageProbe
from .inception import LayerCapture, architecture_slices, class_names, load_model, model_input_from_uint8
from .profiles import SAMPLE, Context
from .sae import TopKSAE, firing_stats
from .store import ActivationStore, read_manifest
from .train import train

ARTIFACTS: dict[str, tuple[Callable, bool]] = {}  # name -> (maker, per layer)
FEATURE_STATS_VECTORS = 500_000  # harvested vectors a feature's firing frequency is counted on
LABEL_EXAMPLES = 8  # top examples a feature's automatic labels are read from
_MEMO: dict = {}


def _artifact(name: str, per_layer: bool = True):
    def register(maker):
        ARTIFACTS[name] = (maker, per_layer)
        return maker

    return register


def get(ctx: Context, what: str, layer: str | None = None):
    """The artifact ``what`` (of ``layer``, for per-layer ones), made if missing, remembered after."""
    if what not in ARTIFACTS:
        raise ValueError(f"no artifact {what!r}; choose from {', '.join(ARTIFACTS)}")
    maker, per_layer = ARTIFACTS[what]
    if per_layer and layer not in ctx.profile.layers:
        raise ValueError(f"artifact {what!r} needs a layer of the {ctx.profile.name} profile "
                         f"({', '.join(ctx.profile.layers)}); got {layer!r}")
    key = (what, str(ctx.run_dir), ctx.saes, layer if per_layer else None)
    if key not in _MEMO:
        _MEMO[key] = maker(ctx, layer) if per_layer else maker(ctx)
    return _MEMO[key]


# --- the harvest ------------------------------------------------------------------------------
def image_source(ctx: Context) -> str:
    """The profile's images; for smoke, an even spread of the ImageNet sample, else generated ones."""
    h = ctx.profile.harvest
    if h.images != "sample-or-generated":
        return h.images
    if SAMPLE.is_dir():
        files = sorted(SAMPLE.glob("*.JPEG"))
        step = max(1, len(files) // h.max_images)
        listing = ctx.run_dir / "images.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("\n".join(str(f) for f in files[::step][: h.max_images]) + "\n")
        return str(listing)
    folder = ctx.run_dir / "generated-images"
    generate_images(folder, h.max_images)
    return str(folder)


@_artifact("harvest", per_layer=False)
def _harvest(ctx: Context) -> Path:
    if (ctx.harvest_dir / MANIFEST).exists() and read_manifest(ctx.harvest_dir).complete:
        return ctx.harvest_dir
    cfg = dataclasses.replace(ctx.profile.harvest, images=image_source(ctx), out=str(ctx.harvest_dir),
                              workers=min(4, os.cpu_count() or 1), input_scale=ctx.input_scale)
    return harvest(cfg)


@_artifact("images", per_layer=False)
def _images(ctx: Context) -> ImageList:
    record = read_manifest(get(ctx, "harvest")).images
    return ImageList([Path(p) for p in record["paths"]], record["classes"], record["source"])


@_artifact("cell_colours", per_layer=False)
def _cell_colours(ctx: Context) -> np.ndarray:
    path = get(ctx, "harvest") / "cell_colours.npy"
    if not path.exists():
        colours = []
        for p in get(ctx, "images").paths:
            try:
                colours.append(cell_colours(load_image(p)))
            except Exception:  # skipped by the harvest too
                colours.append(np.zeros((14, 14, 3)))
        write_npy(path, np.stack(colours).astype(np.float32))
    return np.load(path)


@_artifact("model", per_layer=False)
def _model(ctx: Context):
    return load_model(ctx.profile.weights)[0]


@_artifact("class_names", per_layer=False)
def _class_names(ctx: Context) -> list[str] | None:
    return class_names(get(ctx, "model").weights_id)


@_artifact("featviz_model", per_layer=False)
def _featviz_model(ctx: Context):
    """Lucent's redirected ReLU helps feature visualisation start from noise (it changes gradients only)."""
    return load_model(ctx.profile.weights, redirected_relu=True)[0]


def first_images(ctx: Context, n_images: int) -> list[np.ndarray]:
    """The first ``n_images`` harvested images (uint8 [224, 224, 3]), those the harvest skipped left out."""
    manifest = read_manifest(get(ctx, "harvest"))
    skipped = {s[0] for s in manifest.skipped}
    paths = [p for i, p in enumerate(manifest.images["paths"]) if i not in skipped][:n_images]
    return [load_image(Path(p)) for p in paths]


def model_inputs(ctx: Context, n_images: int) -> torch.Tensor:
    """The network's input [n, 3, 224, 224] for the first ``n_images`` harvested images, under the
    harvest's input convention."""
    pixels = torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in first_images(ctx, n_images)])
    return model_input_from_uint8(pixels, read_manifest(get(ctx, "harvest")).input_scale)


def layer_activations(ctx: Context, layers, n_images: int) -> dict[str, torch.Tensor]:
    """Full [n, C, 14, 14] activations of ``layers`` on the first ``n_images`` harvested images."""
    with torch.no_grad():
        return LayerCapture(get(ctx, "model"), layers)(model_inputs(ctx, n_images))


# --- one SAE per layer ------------------------------------------------------------------------
@_artifact("sae_dir")
def _sae_dir(ctx: Context, layer: str) -> Path:
    """Reused when saved; trained (resuming a checkpoint), or fetched for ``saes="author"``, otherwise."""
    directory = ctx.sae_dir(layer)
    if not (directory / CFG_FILE).exists():
        if ctx.saes == "author":
            fetch_author_sae(layer).save(directory, layer=layer, source=f"hf:{REPO_ID}", input_scale="unit",
                                         weights_id="lucent (the author's)", random_weights=False)
        else:
            _train_into(ctx, layer, directory, ctx.profile.train.seed)
    return directory


def _train_into(ctx: Context, layer: str, directory: Path, seed: int) -> None:
    """The profile's training of ``layer`` on the harvest, into ``directory`` (resuming its checkpoint)."""
    train(dataclasses.replace(ctx.profile.train, run=str(get(ctx, "harvest")), layer=layer, out=str(directory),
                              seed=seed, resume=(directory / CHECKPOINT).exists()))


@_artifact("sae")
def _sae(ctx: Context, layer: str) -> TopKSAE:
    directory = get(ctx, "sae_dir", layer)
    sae = TopKSAE.load(directory)
    check_input_scale(sae, read_manifest(get(ctx, "harvest")), directory)
    return sae


class InputScaleMismatch(ValueError):
    """An SAE trained on activations of one input convention, asked to encode another's."""


def check_input_scale(sae: TopKSAE, manifest, where: Path) -> None:
    """Refuse to encode a harvest made under another input convention than the SAE's vectors were:
    the activations of [0, 1] inputs and of ``x*255-117`` inputs are two different distributions."""
    theirs = sae.metadata.get("input_scale")
    if theirs is not None and theirs != manifest.input_scale:
        raise InputScaleMismatch(
            f"the SAE in {where} was trained on activations of {theirs!r} inputs, but the harvest it would encode "
            f"used {manifest.input_scale!r} inputs (inception.INPUT_SCALES). Harvest again with "
            f"--input-scale {theirs} (a new --out), or use an SAE trained on this harvest")


def untrained_control(ctx: Context) -> Context:
    """The same profile on the untrained network: random weights, the same images and SAE settings,
    in the run's ``untrained/`` folder (chapter 04's control: what the pipeline finds without training)."""
    p = ctx.profile
    return dataclasses.replace(ctx, profile=dataclasses.replace(p, harvest=dataclasses.replace(p.harvest, weights="random")),
                               run_dir=ctx.run_dir / "untrained", saes="train")


def sae_with_seed(ctx: Context, layer: str, seed: int) -> TopKSAE:
    """The layer's SAE trained again from another ``seed`` (same vectors and settings), for chapter 09's
    yardstick; the profile's own seed gives the layer's SAE."""
    if seed == ctx.profile.train.seed:
        return get(ctx, "sae", layer)
    directory = ctx.run_dir / f"saes-seed{seed}" / layer
    if not (directory / CFG_FILE).exists():
        _train_into(ctx, layer, directory, seed)
    return TopKSAE.load(directory)


@_artifact("spliced")
def _spliced(ctx: Context, layer: str) -> list[dict]:
    """Chapter 03's spliced-in evaluation of the layer's SAE, kept as ``spliced.json`` beside it (the model card
    of ``python -m helpers publish`` reports it)."""
    from .loss import spliced_evaluation
    from .publish import SPLICED

    path = get(ctx, "sae_dir", layer) / SPLICED
    if not path.exists():
        rows = spliced_evaluation(get(ctx, "model"), layer, get(ctx, "sae", layer),
                                  model_inputs(ctx, ctx.profile.spliced_images), get(ctx, "slices", layer))
        write_json(path, {"images": ctx.profile.spliced_images, "rows": rows})
    return json.loads(path.read_text())["rows"]


@_artifact("slices")
def _slices(ctx: Context, layer: str) -> dict[str, tuple[int, int]]:
    recorded = get(ctx, "sae", layer).metadata.get("branch_slices")
    return {b: tuple(s) for b, s in recorded.items()} if recorded else architecture_slices(layer)


@_artifact("feature_stats")
def _feature_stats(ctx: Context, layer: str) -> dict[str, np.ndarray]:
    path = get(ctx, "sae_dir", layer) / FEATURE_STATS
    if not path.exists():
        vectors = ActivationStore(get(ctx, "harvest"), layer).load(FEATURE_STATS_VECTORS)
        batches = (torch.from_numpy(vectors[i:i + 8192].astype(np.float32)) for i in range(0, len(vectors), 8192))
        data = save({k: v.numpy() for k, v in firing_stats(get(ctx, "sae", layer), batches).items()})
        atomic_write(path, lambda f: f.write(data))
    return load_file(path)


@_artifact("branches")
def _branches(ctx: Context, layer: str) -> branches.BranchAnalysis:
    return branches.analyse_branches(layer, get(ctx, "sae", layer).decoder_directions, get(ctx, "slices", layer),
                                     get(ctx, "feature_stats", layer)["frequency"])


# --- seeing features --------------------------------------------------------------------------
@_artifact("examples")
def _examples(ctx: Context, layer: str):
    path = get(ctx, "sae_dir", layer) / EXAMPLES
    if not path.exists():  # every profile layer still without its examples, from one pass of the network
        missing = [other for other in ctx.profile.layers if not (get(ctx, "sae_dir", other) / EXAMPLES).exists()]
        found = example_passes(get(ctx, "model"), {other: get(ctx, "sae", other) for other in missing},
                               get(ctx, "images"), input_scale=read_manifest(get(ctx, "harvest")).input_scale,
                               checkpoint=ctx.run_dir / EXAMPLES_CHECKPOINT)
        for other, examples in found.items():
            examples.save(get(ctx, "sae_dir", other) / EXAMPLES)
    return Examples.load(path)


@_artifact("labels")
def _labels(ctx: Context, layer: str) -> list[dict]:
    ex, top = get(ctx, "examples", layer), LABEL_EXAMPLES
    return labels.feature_labels(ex.top_image[:, :top], ex.top_y[:, :top], ex.top_x[:, :top],
                                 get(ctx, "images").classes, get(ctx, "cell_colours"))


def featviz(ctx: Context, layer: str, features) -> dict[int, Path]:
    """Feature visualisations (PNG, cached under the run's ``featviz/``) of ``features``."""
    return render_features(get(ctx, "featviz_model"), layer, get(ctx, "sae", layer), get(ctx, "sae_dir", layer),
                           features, ctx.run_dir / "featviz", ctx.profile.featviz)


@_artifact("neighbours")
def _neighbours(ctx: Context, layer: str) -> dict[str, dict[int, list[tuple[int, float]]]]:
    adjacent = [other for other in circuits.adjacent_layers(layer) if other in ctx.profile.layers]
    return circuits.weight_neighbours(get(ctx, "model"), layer, {l: get(ctx, "sae", l) for l in [layer, *adjacent]},
                                      {l: get(ctx, "branches", l).alive for l in adjacent})


@_artifact("umap")
def _umap(ctx: Context, layer: str) -> embed.Embedding:
    return embed.umap_embedding(get(ctx, "sae", layer).decoder_directions)


@_artifact("probe")
def _probe(ctx: Context, layer: str) -> ImageProbe:
    analysis = get(ctx, "branches", layer)
    return ImageProbe(get(ctx, "model"), layer, get(ctx, "sae", layer), analysis.dominant(),
                      analysis.specialised_branch(), get(ctx, "class_names"), read_manifest(get(ctx, "harvest")).input_scale)


@_artifact("view")
def _view(ctx: Context, layer: str) -> dashboard.LayerView:
    analysis = get(ctx, "branches", layer)
    sid = sae_id(get(ctx, "sae_dir", layer))
    rendered = {int(f): cache_path(ctx.run_dir / "featviz", sid, layer, int(f), ctx.profile.featviz)
                for f in np.flatnonzero(analysis.alive)}
    pixels = first_images(ctx, dashboard.ATLAS_IMAGES)
    return dashboard.LayerView(layer, analysis, get(ctx, "examples", layer), get(ctx, "labels", layer),
                               get(ctx, "umap", layer).coords, get(ctx, "neighbours", layer), get(ctx, "images"),
                               {f: p for f, p in rendered.items() if p.exists()}, get(ctx, "spliced", layer),
                               pixels, dashboard.image_records(get(ctx, "probe", layer), pixels))


@_artifact("atlas", per_layer=False)
def _atlas(ctx: Context) -> Path:
    note = ("RANDOM WEIGHTS: NOT A RESULT. These features come from InceptionV1 with random weights."
            if ctx.random_weights else f"{ctx.profile.name} profile")
    return dashboard.write_atlas(ctx.run_dir / "atlas", [get(ctx, "view", layer) for layer in ctx.profile.layers],
                                 note)


def explorer(ctx: Context, layers=None):
    """The live explorer over the profile's layers (a pointer to the atlas in the static book)."""
    return dashboard.show_explorer(list(layers or ctx.profile.layers), lambda layer: get(ctx, "view", layer),
                                   lambda layer, features: featviz(ctx, layer, features), ctx.book_build,
                                   lambda layer: get(ctx, "probe", layer))
