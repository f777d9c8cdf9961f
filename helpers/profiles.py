"""Profiles: one switch that sets the scale of every notebook, from CI smoke to the paper.

``SAE_PROFILE`` (environment) or the notebook's ``profile`` parameter picks one of
``smoke``, ``cpu``, ``gpu``, ``paper``. All notebooks of a profile share one run directory
(``SAE_RUN_DIR``, default ``runs/<profile>``): the harvest and the SAEs are made once, by
whichever notebook needs them first, and reused after; a run made with the CLI elsewhere
can be pointed at instead. ``SAE_SAES=author`` uses the paper's published SAEs instead of
training new ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import FeatvizConfig, HarvestConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "imagenet-sample"


@dataclass(frozen=True)
class Profile:
    """One scale of the whole book: a harvest, a training and a feature-visualisation config, and the
    sizes of the analyses that run on every notebook build."""

    name: str
    description: str
    harvest: HarvestConfig  # images "sample-or-generated": the smoke profile's images (see runs.image_source)
    train: TrainConfig
    featviz: FeatvizConfig = FeatvizConfig()
    circuit_images: int = 32  # images whose full activation maps the circuit analyses use
    circuit_sources: int = 512  # source features per layer in the attribution matrix
    figure1_per_branch: int = 2  # features per layer and branch in figure 1's all-branch grid
    figure1_per_layer: int = 6  # features in figure 1's panel of each layer (the paper's branch)
    spliced_images: int = 64  # images of chapter 03's spliced-in evaluation

    @property
    def layers(self) -> tuple[str, ...]:
        return self.harvest.layers

    @property
    def weights(self) -> str:
        return self.harvest.weights


def _train(vectors_seen: int, batch_size: int = 4096, points: int = 40, **kw) -> TrainConfig:
    """A training config that logs about ``points`` records, so its curves can be drawn."""
    steps = -(-vectors_seen // batch_size)
    return TrainConfig(vectors_seen=vectors_seen, batch_size=batch_size, log_every=max(1, steps // points), **kw)


PROFILES = {
    "smoke": Profile("smoke", "CI and a first look: random weights, 64 images, tiny SAEs; minutes on 2 CPU cores",
                     HarvestConfig(images="sample-or-generated", weights="random", max_images=64, batch_size=16),
                     _train(24_576, batch_size=1024, expansion=4, k=16), FeatvizConfig(steps=4, size=64),
                     circuit_images=4, circuit_sources=48, figure1_per_branch=1,
                     figure1_per_layer=4, spliced_images=8),
    "colab": Profile("colab", "a first look on Colab, in minutes: real weights, the paper author's published SAEs, "
                              "the ImageNet sample (1,000 images, one per class, 398 of them animals)",
                     HarvestConfig(images="imagenet-sample", weights="lucent", batch_size=128),
                     _train(5_000_000, aux_k=256), FeatvizConfig(steps=256)),
    "cpu": Profile("cpu", "about 4 hours on 2 CPU cores (bench/bench_profile.py): real weights, Imagenette and "
                          "Imagewoof (26,394 images of 20 classes, 12 of them animals), 2M vectors per SAE",
                   HarvestConfig(images="imagenette+imagewoof", weights="lucent"), _train(2_000_000, aux_k=256)),
    "gpu": Profile("gpu", "a Colab T4: real weights, Imagenette and Imagewoof (26,394 images, 12 of 20 classes "
                          "animals), 50M vectors per SAE",
                   HarvestConfig(images="imagenette+imagewoof", weights="lucent", batch_size=256),
                   _train(50_000_000, aux_k=256)),
    "paper": Profile("paper", "as the paper: ImageNet train ($IMAGENET_TRAIN), ~1e9 vectors per SAE",
                     HarvestConfig(images=os.environ.get("IMAGENET_TRAIN", "/data/imagenet/train"), weights="lucent",
                                   batch_size=512),
                     _train(1_000_000_000, aux_k=256), FeatvizConfig(steps=2048)),
}


def default_profile_name() -> str:
    """colab on Colab (a chapter opened alone reaches its first figure in minutes), gpu with CUDA, else cpu."""
    import sys

    if "google.colab" in sys.modules:
        return "colab"
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def get_profile(name: str | None = None) -> Profile:
    name = name or os.environ.get("SAE_PROFILE") or default_profile_name()
    if name not in PROFILES:
        raise ValueError(f"profile {name!r} is unknown; choose from {', '.join(PROFILES)}")
    return PROFILES[name]


@dataclass
class Context:
    """Where a notebook's artifacts live and what produced them."""

    profile: Profile
    run_dir: Path
    saes: str = "train"  # or "author"
    fallback_reason: str | None = None
    book_build: bool = False  # executed by the book build: figures as plain HTML, no live widgets

    @property
    def input_scale(self) -> str:
        """The input convention of this context's harvest: the author's ("unit") where the author's SAEs
        encode it, since they were trained on activations of [0, 1] inputs; else the profile's."""
        return "unit" if self.saes == "author" else self.profile.harvest.input_scale

    @property
    def harvest_dir(self) -> Path:
        return self.run_dir / ("harvest" if self.input_scale == "lucent" else f"harvest-{self.input_scale}")

    def sae_dir(self, layer: str) -> Path:
        return self.run_dir / ("author-saes" if self.saes == "author" else "saes") / layer

    @property
    def random_weights(self) -> bool:
        """Random weights: asked for, or a stand-in file where the pretrained one would be."""
        if self.profile.weights == "random":
            return True
        from .inception import is_stand_in

        return is_stand_in(self.profile.weights)

    def banner(self) -> str:
        """A MyST admonition naming the profile and weights (a warning for random weights)."""
        p = self.profile
        lines = [f"Built with the **{p.name}** profile ({p.description}); weights: `{p.weights}`; "
                 f"SAEs: {'the paper author' + chr(39) + 's published SAEs' if self.saes == 'author' else 'trained here'}; "
                 f"run directory `{self.run_dir.name}`.",
                 "Images enter the network " + ("in [0, 1] as they are: the author's convention, the one the author's "
                                                "SAEs were trained on (Lucent's `forward` does no preprocessing)."
                                                if self.input_scale == "unit" else
                                                "as `x*255-117` of [0, 1] pixels, as Lucent's `render_vis` feeds them.")]
        if self.fallback_reason:
            lines.append(f"The `cpu` profile could not run here, so this is the smoke profile. What failed:\n\n"
                         f"{self.fallback_reason}")
        if self.random_weights:
            from .inception import RANDOM_WARNING

            lines.insert(0, f"**Not a result.** {RANDOM_WARNING}.")
        kind = "warning" if self.random_weights or self.fallback_reason else "note"
        return f":::{{{kind}}}\n" + "\n\n".join(lines) + "\n:::\n"


def context(profile: str | None = None, run_dir: str | None = None, saes: str | None = None) -> Context:
    p = get_profile(profile)
    run = Path(run_dir or os.environ.get("SAE_RUN_DIR") or ROOT / "runs" / p.name)
    # the colab profile shows the paper's own SAEs unless told otherwise: no training before the first figure
    saes = saes or os.environ.get("SAE_SAES") or ("author" if p.name == "colab" else "train")
    if saes not in ("train", "author"):
        raise ValueError(f"SAE_SAES={saes!r}; choose 'train' or 'author'")
    ctx = Context(p, run, saes, os.environ.get("SAE_FALLBACK_REASON") or None,
                  book_build=bool(os.environ.get("SAE_BOOK_BUILD")))
    if ctx.book_build:  # the pages carry the banner and the watermarks; log lines would only clutter them
        import logging

        logging.getLogger("helpers").setLevel(logging.ERROR)
    return ctx
