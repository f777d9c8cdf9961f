"""A profile's run directory: the one module that knows where artifacts live and how each is made.

``run = open_run(profile)`` in a chapter; then each artifact is a method of ``Run``, which returns
it, made first if it is missing (a harvest or a training that was interrupted resumes) and kept
for the rest of the process: ``run.harvest()``, ``run.sae("mixed4c")``, ``run.branches(layer)``,
``run.examples(layer)`` ... Facts about the harvest (its input convention, its images) come from
its manifest, the one record of what was made.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save

from helpers.analysis import circuits, embed, labels
from helpers.analysis.branches import BranchAnalysis
from helpers.analysis.examples import Examples, cell_colours, example_passes
from helpers.analysis.featviz import cache_path, lucent_device, render_features, sae_id
from helpers.analysis.image_features import ImageProbe
from helpers.config import HarvestConfig
from helpers.data.harvest import harvest
from helpers.data.images import ImageList, load_image
from helpers.data.kept import KeptInputs
from helpers.data.inception import (LayerCapture, architecture_slices, class_names, classifier_stats, is_stand_in,
                                    load_model, model_input_from_uint8, standardise_classifier_)
from helpers.data.store import Manifest, read_manifest
from helpers.files import (CFG_FILE, CHECKPOINT, EXAMPLES, EXAMPLES_CHECKPOINT, MANIFEST, atomic_write, write_json,
                           write_npy)
from helpers.run.author import AuthorSAEMissing, fetch_author_sae
from helpers.run.evaluations import Evaluations, kept_branches
from helpers.run.memo import made_once
from helpers.run.profiles import Profile, Settings, get_profile, runs_root, smoke_images
from helpers.sae.model import TopKSAE, check_input_scale
from helpers.sae.train import train
from helpers.show import atlas, explorer

log = logging.getLogger(__name__)
LABEL_EXAMPLES = 8  # top examples a feature's automatic labels are read from
CLASSIFIER_IMAGES = 64  # a random network's classifier is standardised on the run's first images
CLASSIFIER = "classifier-standardisation.json"  # its statistics, kept in the run


@dataclass(eq=False)
class Run(Evaluations):
    """Where a profile's artifacts live, what produced them, and a method that makes each."""

    profile: Profile
    run_dir: Path
    saes: str = "train"  # or "author": the paper author's published SAEs
    fallback_reason: str | None = None  # why the book build fell back to this (smoke) profile
    book_build: bool = False  # executed by the book build: figures as plain HTML, no live widgets
    _made: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        if self.saes not in ("train", "author"):
            raise ValueError(f"saes={self.saes!r}; choose 'train' or 'author'")

    # --- what the run is ---------------------------------------------------------------------
    @property
    def random_weights(self) -> bool:
        """Random weights: asked for, or a stand-in file where the pretrained one would be."""
        return self.profile.weights == "random" or is_stand_in(self.profile.weights)

    def harvest_config(self) -> HarvestConfig:
        """What the run's harvest is asked to be (its manifest records what it was). A run showing the author's
        SAEs harvests as the author did (``shared/PAPER.md``): [0, 1] inputs (the convention their SAEs were
        trained on), positions drawn in proportion to the norm with replacement, float32 throughout (no bf16
        autocast on CUDA); its held-out vectors are then drawn as theirs were."""
        h = self.profile.harvest
        if self.saes == "author":
            h, folder = dataclasses.replace(h, input_scale="unit", sampling="norm-weighted", amp=False), "harvest-author"
        else:
            folder = "harvest" if h.input_scale == "lucent" else f"harvest-{h.input_scale}"
        return dataclasses.replace(h, out=str(self.run_dir / folder), workers=min(4, os.cpu_count() or 1))

    @property
    def harvest_dir(self) -> Path:
        return Path(self.harvest_config().out)

    def sae_path(self, layer: str) -> Path:
        """Where the layer's SAE lives (nothing is made: ``sae_dir`` makes it)."""
        return self.run_dir / ("author-saes" if self.saes == "author" else "saes") / layer

    def banner(self) -> str:
        """A MyST admonition: what a reader needs in a few lines (a warning, for random weights: not a result, and
        how to get the real network), the build's settings and any technical reason folded away below."""
        p, author = self.profile, self.saes == "author"
        settings = [f"Built with the **{p.name}** profile ({p.description}); weights: `{p.weights}`; "
                    f"SAEs: {'the paper author' + chr(39) + 's published SAEs' if author else 'trained here'}; "
                    f"run directory `{self.run_dir.name}`.",
                    "Images enter the network " + ("in [0, 1] as they are: the author's convention, the one the "
                                                   "author's SAEs were trained on (Lucent's `forward` does no "
                                                   "preprocessing)." if self.harvest_config().input_scale == "unit" else
                                                   "as `x*255-117` of [0, 1] pixels, as Lucent's `render_vis` feeds them.")]
        if self.fallback_reason:
            settings.append(f"The `cpu` profile could not run where this book was built, so this is the smoke "
                            f"profile. What failed:\n\n{self.fallback_reason}")
        if not (self.random_weights or self.fallback_reason):
            return ":::{note}\n" + "\n\n".join(settings) + "\n:::\n"
        head = ("**Not a result.** These pages come from an InceptionV1 with random weights: they test the "
                "pipeline and say nothing about the trained network. With internet, `make book PROFILE=cpu` builds "
                "them with the real weights (or open a chapter on Colab)." if self.random_weights else
                f"**The {p.name} profile** stands in for the `cpu` profile, which could not run here.")
        return (":::{warning}\n" + head + "\n\n<details><summary>What this build used, and why</summary>\n\n"
                + "\n\n".join(settings) + "\n\n</details>\n:::\n")

    def _layer(self, layer: str) -> str:
        if layer not in self.profile.harvest.layers:
            raise ValueError(f"{layer!r} is not a layer of the {self.profile.name} profile; choose from "
                             f"{', '.join(self.profile.harvest.layers)}")
        return layer

    # --- other runs ----------------------------------------------------------------------------
    def with_saes(self, saes: str) -> "Run":
        """This run showing other SAEs ("train": ours; "author": the paper's); itself if it already does."""
        return self if saes == self.saes else dataclasses.replace(self, saes=saes, _made={})

    @made_once
    def untrained_control(self) -> "Run":
        """The same profile on the untrained network: random weights, the same images and SAE settings,
        in the run's ``untrained/`` folder (chapter 04's control: what the pipeline finds without training)."""
        p = self.profile
        harvest = dataclasses.replace(p.harvest, weights="random", keep_input_of=None)  # it runs no example pass
        return dataclasses.replace(self, profile=dataclasses.replace(p, harvest=harvest),
                                   run_dir=self.run_dir / "untrained", saes="train", _made={})

    # --- the harvest (chapter 02) --------------------------------------------------------------
    def image_source(self) -> str:
        """The profile's images (for smoke: ``profiles.smoke_images`` in the run folder)."""
        h = self.profile.harvest
        return h.images if h.images != "sample-or-generated" else smoke_images(h.max_images, self.run_dir)

    @made_once
    def harvest(self) -> Path:
        """The harvest's run directory: made (or resumed) unless complete."""
        folder = self.harvest_dir
        if (folder / MANIFEST).exists() and read_manifest(folder).complete:
            return folder
        return harvest(dataclasses.replace(self.harvest_config(), images=self.image_source()))

    @made_once
    def manifest(self) -> Manifest:
        return read_manifest(self.harvest())

    @property
    def input_scale(self) -> str:
        """The input convention the harvest used (its manifest's)."""
        return self.manifest().input_scale

    @made_once
    def images(self) -> ImageList:
        record = self.manifest().images
        return ImageList([Path(p) for p in record["paths"]], record["classes"], record["source"])

    @made_once
    def cell_colours(self) -> np.ndarray:
        """[images, 14, 14, 3] mean colour around every grid cell (kept beside the harvest)."""
        path = self.harvest() / "cell_colours.npy"
        if not path.exists():
            colours = []
            for p in self.images().paths:
                try:
                    colours.append(cell_colours(load_image(p)))
                except Exception:  # skipped by the harvest too
                    colours.append(np.zeros((14, 14, 3)))
            write_npy(path, np.stack(colours).astype(np.float32))
        return np.load(path)

    def first_images(self, n_images: int, start: int = 0) -> list[np.ndarray]:
        """The first ``n_images`` harvested images (uint8 [224, 224, 3]), those the harvest skipped left out (from
        the ``start``-th of them on)."""
        manifest = self.manifest()
        skipped = {s[0] for s in manifest.skipped}
        paths = [p for i, p in enumerate(manifest.images["paths"]) if i not in skipped][start:n_images]
        return [load_image(Path(p)) for p in paths]

    def model_inputs(self, n_images: int, start: int = 0) -> torch.Tensor:
        """The network's input [n, 3, 224, 224] for the first ``n_images`` harvested images (from the ``start``-th
        on), in the harvest's input convention."""
        pixels = torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in self.first_images(n_images, start)])
        return model_input_from_uint8(pixels, self.input_scale)

    def layer_activations(self, layers, n_images: int) -> dict[str, torch.Tensor]:
        """Full [n, C, 14, 14] activations of ``layers`` on the first ``n_images`` harvested images."""
        with torch.no_grad():
            return LayerCapture(self.model(), layers)(self.model_inputs(n_images))

    @made_once
    def circuit_activations(self) -> dict[str, torch.Tensor]:
        """The profile's layers' activations on its ``circuit_images`` images: what chapters 05 and 10 trace."""
        return self.layer_activations(self.profile.layers, self.profile.circuit_images)

    # --- the network -----------------------------------------------------------------------------
    @made_once
    def model(self):
        """The profile's InceptionV1 (true ReLU gradients); with random weights its classifier standardised on the
        run's first images (``standardise_classifier_``), so its outputs differ across images."""
        model = load_model(self.profile.weights)[0]
        if self.random_weights:  # the standardisation's statistics kept in the run: each chapter's kernel reads them
            path = self.run_dir / CLASSIFIER
            kept = json.loads(path.read_text()) if path.exists() else {}
            if kept.get("weights_id") != model.weights_id or kept.get("images") != CLASSIFIER_IMAGES:
                mean, scale = classifier_stats(model, self.model_inputs(CLASSIFIER_IMAGES))
                kept = {"weights_id": model.weights_id, "images": CLASSIFIER_IMAGES, "scale": scale,
                        "mean": mean.tolist()}
                write_json(path, kept)
            standardise_classifier_(model, stats=(torch.tensor(kept["mean"], dtype=torch.float32), kept["scale"]))
        return model

    @made_once
    def featviz_model(self):
        """The same with Lucent's redirected ReLU, which helps feature visualisation start from noise
        (it changes gradients only), on the device Lucent optimises its images on (a GPU where there is one)."""
        return load_model(self.profile.weights, lucent_device(), redirected_relu=True)[0]

    @made_once
    def class_names(self) -> list[str] | None:
        """The names of the network's outputs (None: random weights, or not downloadable)."""
        return class_names(self.model().weights_id)

    # --- one SAE per layer (chapter 03) ------------------------------------------------------------
    @made_once
    def sae_dir(self, layer: str) -> Path:
        """The layer's SAE folder: reused when saved; trained (resuming a checkpoint), or fetched for the
        author's SAEs, otherwise."""
        directory = self.sae_path(self._layer(layer))
        if not (directory / CFG_FILE).exists():
            if self.saes == "author":
                try:
                    found = fetch_author_sae(layer)
                except AuthorSAEMissing as e:  # the author published none that passes: ours, on the author's harvest
                    self._train_into(layer, directory, self.profile.train.seed, in_place_of_the_authors=str(e))
                    return directory
                found.sae.save(directory, layer=layer, source=found.source, chosen=found.why, input_scale="unit",
                               weights_id="lucent (the author's)", random_weights=False,
                               branch_slices=architecture_slices(layer))
            else:
                self._train_into(layer, directory, self.profile.train.seed)
        return directory

    def sae_origin(self, layer: str) -> str:
        """Where the layer's SAE comes from, in a line: the author's file, or trained here (and why, where the
        author's was asked for)."""
        meta = self.sae(layer).metadata
        if meta.get("in_place_of_the_authors"):
            return f"trained here, in place of the author's: {meta['in_place_of_the_authors']}"
        source = str(meta.get("source") or "")
        return f"the author's ({source.removeprefix('hf:')})" if source.startswith("hf:") else "trained here"

    def _train_into(self, layer: str, directory: Path, seed: int, **note) -> None:
        """The profile's training of ``layer`` on the harvest, into ``directory`` (resuming its checkpoint);
        ``note`` is added to the SAE's recorded metadata."""
        train(dataclasses.replace(self.profile.train, run=str(self.harvest()), layer=layer, out=str(directory),
                                  seed=seed, resume=(directory / CHECKPOINT).exists()))
        if note:
            cfg = json.loads((directory / CFG_FILE).read_text())
            cfg["metadata"].update(note)
            write_json(directory / CFG_FILE, cfg)

    @made_once
    def sae(self, layer: str) -> TopKSAE:
        directory = self.sae_dir(layer)
        sae = TopKSAE.load(directory)
        check_input_scale(sae, self.input_scale, directory)
        return sae

    def seed_dir(self, layer: str, seed: int) -> Path:
        """Where the layer's SAE trained from another ``seed`` is kept."""
        return self.run_dir / f"saes-seed{seed}" / self._layer(layer)

    @made_once
    def sae_with_seed(self, layer: str, seed: int) -> TopKSAE:
        """The layer's SAE trained again from another ``seed`` (same vectors and settings), for chapter 09's
        yardstick; the profile's own seed gives the layer's SAE."""
        if seed == self.profile.train.seed:
            return self.sae(layer)
        directory = self.seed_dir(layer, seed)
        if not (directory / CFG_FILE).exists():
            self._train_into(layer, directory, seed)
        return TopKSAE.load(directory)

    @made_once
    def slices(self, layer: str) -> dict[str, tuple[int, int]]:
        """The layer's branch slices, as the SAE's cfg.json records them."""
        recorded = self.sae(layer).metadata.get("branch_slices")
        return {b: tuple(s) for b, s in recorded.items()} if recorded else architecture_slices(layer)

    # --- what the features are (chapters 04-08) ------------------------------------------------------
    @made_once
    def branches(self, layer: str) -> BranchAnalysis:
        """The layer's branch analysis (chapter 04), kept beside its SAE (``evaluations.kept_branches``)."""
        return kept_branches(layer, self.sae_dir(layer), self.sae(layer), self.slices(layer),
                             self.feature_stats(layer)["frequency"])

    @made_once
    def examples(self, layer: str) -> Examples:
        """Every feature's dataset examples: one streaming pass of the network serves every profile layer
        still without them."""
        path = self.sae_dir(layer) / EXAMPLES
        if not path.exists():
            missing = [other for other in self.profile.layers if not (self.sae_dir(other) / EXAMPLES).exists()]
            kept = KeptInputs.find(self.harvest(), self.manifest())  # the harvest's, where it kept a layer's input
            found = example_passes(self.model(), {other: self.sae(other) for other in missing}, self.images(),
                                   input_scale=self.input_scale, checkpoint=self.run_dir / EXAMPLES_CHECKPOINT,
                                   kept=kept)
            for other, examples in found.items():
                examples.save(self.sae_dir(other) / EXAMPLES)
            if kept is not None:  # the one pass over this harvest they were kept for is done
                log.info("examples: removed the harvest's kept input of %s (%.1f GB)", kept.layer, kept.remove() / 1e9)
        return Examples.load(path)

    @made_once
    def labels(self, layer: str) -> list[dict]:
        """Every feature's automatic labels (chapter 07)."""
        ex, top = self.examples(layer), LABEL_EXAMPLES
        return labels.feature_labels(ex.top_image[:, :top], ex.top_y[:, :top], ex.top_x[:, :top],
                                     self.images().classes, self.cell_colours())

    def featviz(self, layer: str, features) -> dict[int, Path]:
        """Feature visualisations (PNG, cached under the run's ``featviz/``) of ``features``."""
        return render_features(self.featviz_model(), layer, self.sae(layer), self.sae_dir(layer), features,
                               self.run_dir / "featviz", self.profile.featviz)

    @made_once
    def neighbours(self, layer: str) -> dict[str, dict[int, list[tuple[int, float]]]]:
        """Each feature's strongest neighbours in the adjacent layers (weights, chapter 05)."""
        adjacent = [other for other in circuits.adjacent_layers(layer) if other in self.profile.layers]
        return circuits.weight_neighbours(self.model(), layer, {l: self.sae(l) for l in [layer, *adjacent]},
                                          {l: self.branches(l).alive for l in adjacent})

    @made_once
    def umap(self, layer: str) -> embed.Embedding:
        """The UMAP fit of the layer's decoder vectors (chapter 06), kept beside the SAE under its id (chapter 08's
        atlas reads chapter 06's fits instead of fitting again)."""
        path = self.sae_dir(layer) / f"umap-{sae_id(self.sae_dir(layer))}.safetensors"
        if not path.exists():
            fit = embed.umap_embedding(self.sae(layer).decoder_directions)
            atomic_write(path, lambda f: f.write(save({"coords": fit.coords, "live": fit.live.astype(np.uint8),
                                                       "n_neighbors": np.asarray(fit.n_neighbors, np.int64)})))
        kept = load_file(str(path))
        vectors = self.sae(layer).decoder_directions.detach().cpu().float().numpy()
        return embed.Embedding(kept["coords"], vectors, kept["live"].astype(bool), int(kept["n_neighbors"]))

    @made_once
    def probe(self, layer: str) -> ImageProbe:
        """What looking into images at the layer needs (chapter 08)."""
        analysis = self.branches(layer)
        return ImageProbe(self.model(), layer, self.sae(layer), analysis.dominant(), analysis.specialised_branch(),
                          self.class_names(), self.input_scale)

    # --- seeing all features at once -----------------------------------------------------------------
    @made_once
    def view(self, layer: str) -> atlas.LayerView:
        """What the atlas and the explorer show of the layer."""
        analysis = self.branches(layer)
        sid = sae_id(self.sae_dir(layer))
        rendered = {int(f): cache_path(self.run_dir / "featviz", sid, layer, int(f), self.profile.featviz)
                    for f in np.flatnonzero(analysis.alive)}
        pixels = self.first_images(atlas.ATLAS_IMAGES)
        return atlas.LayerView(layer, analysis, self.examples(layer), self.labels(layer), self.umap(layer).coords,
                               self.neighbours(layer), self.images(), {f: p for f, p in rendered.items() if p.exists()},
                               self.spliced(layer), pixels, atlas.image_records(self.probe(layer), pixels),
                               self.sae_origin(layer), self.sae(layer).metadata.get("held_out") or {},
                               self.coherence(layer)["summary"], self.probing(layer), self.absorption(layer))

    @made_once
    def atlas(self) -> Path:
        """The static feature atlas of every layer (its folder)."""
        note = ("RANDOM WEIGHTS: NOT A RESULT. These features come from InceptionV1 with random weights."
                if self.random_weights else f"{self.profile.name} profile")
        return atlas.write_atlas(self.run_dir / "atlas", [self.view(layer) for layer in self.profile.layers], note)

    def explorer(self, layers=None):
        """The live explorer over the profile's layers (a pointer to the atlas in the static book)."""
        return explorer.show_explorer(list(layers or self.profile.layers), self.view, self.featviz, self.book_build,
                                      self.probe)


def open_run(profile: str | None = None, run_dir: str | None = None, saes: str | None = None,
             settings: Settings | None = None) -> Run:
    """The run a chapter works in: the arguments, else the environment's ``Settings``; the colab profile shows
    the paper's own SAEs unless told otherwise (no training before the first figure)."""
    settings = settings or Settings.from_environment()
    p = get_profile(profile, settings)
    run = Path(run_dir or settings.run_dir or runs_root() / p.name)
    saes = saes or settings.saes or ("author" if p.name == "colab" else "train")
    opened = Run(p, run, saes, settings.fallback_reason, settings.book_build)
    if opened.book_build:  # the pages carry the banner and the watermarks; log lines would only clutter them
        logging.getLogger("helpers").setLevel(logging.ERROR)
    return opened

