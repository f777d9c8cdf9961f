"""Profiles: one switch that sets the scale of every chapter, from CI smoke to the paper; and the
settings the environment gives a run, read in one place.

A chapter's ``profile`` parameter or ``SAE_PROFILE`` picks one of ``smoke``, ``colab``, ``cpu``,
``gpu``, ``paper``. All chapters of a profile share one run directory (``SAE_RUN_DIR``, default
``runs/<profile>``): the harvest and the SAEs are made once, by whichever chapter needs them
first, and reused after; a run made with the CLI elsewhere can be pointed at instead.
``SAE_SAES=author`` shows the paper's published SAEs instead of training new ones.
``Settings.from_environment`` is the one reader of these variables (the command line reads
``SAE_DEBUG`` itself).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from helpers.config import PAPER_LAYERS, FeatvizConfig, HarvestConfig, SaeConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT.parent / "shared" / "imagenet-sample"
IMAGENET_TRAIN = "/data/imagenet/train"  # the paper profile's images unless $IMAGENET_TRAIN names another folder
# the Distill article's layers (Voss et al. 2021), harvested beside the paper's in the same pass for chapter 10's rows
DISTILL_LAYERS = ("mixed3a", "mixed3b")
WITH_DISTILL = (*DISTILL_LAYERS, *PAPER_LAYERS)


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
    probe_images: int = 2000  # images of chapter 03's sparse probing (the first harvested; their classes)
    # chapter 03's families sweep of one layer (``python -m helpers sweep``); in the book build only where asked
    sweep_layer: str = "mixed4c"
    sweep_l0: tuple[int, ...] = (16, 32, 64, 128)
    sweep_seeds: tuple[int, ...] = (0, 1)
    sweep_in_book: bool = False
    claim_seeds: tuple[int, ...] = (0, 1)  # chapter 10: every claim about a layer's SAE is measured at these seeds
    untrained_control: bool = True  # chapters 04 and 10 run the same pipeline on the untrained network (real weights)

    @property
    def layers(self) -> tuple[str, ...]:
        """The paper's layers of the harvest: those every chapter shows."""
        return tuple(layer for layer in self.harvest.layers if layer in PAPER_LAYERS)

    @property
    def distill_layers(self) -> tuple[str, ...]:
        """The Distill article's layers, where harvested (chapter 10's rows on mixed3a and mixed3b)."""
        return tuple(layer for layer in self.harvest.layers if layer in DISTILL_LAYERS)

    @property
    def weights(self) -> str:
        return self.harvest.weights


AUXK = SaeConfig(aux_k=256)  # the paper's SAE (16x, k = 32, tied) with Gao et al.'s AuxK against dead latents


def _train(vectors_seen: int, batch_size: int = 4096, points: int = 40, **kw) -> TrainConfig:
    """A training config that logs about ``points`` records, so its curves can be drawn."""
    steps = -(-vectors_seen // batch_size)
    return TrainConfig(vectors_seen=vectors_seen, batch_size=batch_size, log_every=max(1, steps // points), **kw)


PROFILES = {
    "smoke": Profile("smoke", "CI and a first look: random weights, 64 images, tiny SAEs; minutes on 2 CPU cores",
                     HarvestConfig(images="sample-or-generated", weights="random", max_images=64, batch_size=16,
                                   layers=WITH_DISTILL, keep_input_of="mixed4a"),
                     _train(24_576, batch_size=1024, sae=SaeConfig(expansion=4, k=16)), FeatvizConfig(steps=4, size=64),
                     circuit_images=4, circuit_sources=48, figure1_per_branch=1,
                     figure1_per_layer=4, spliced_images=8, probe_images=64, sweep_l0=(8, 16, 32), sweep_seeds=(0,),
                     sweep_in_book=True),
    "colab": Profile("colab", "a first look on Colab (each chapter says its cost at its top): real weights, the paper "
                              "author's published SAEs, the ImageNet sample (1,000 images, one per class, 398 of them "
                              "animals)",
                     HarvestConfig(images="imagenet-sample", weights="lucent", batch_size=128),
                     # ours are trained only for chapter 09's comparison: 100 passes over the sample's 10,000 vectors
                     _train(1_000_000, sae=AUXK), FeatvizConfig(steps=256), claim_seeds=(0,), untrained_control=False),
    "cpu": Profile("cpu", "about 2 hours on 2 CPU cores (bench/bench_profile.py): real weights, Imagenette and "
                          "Imagewoof (26,394 images of 20 classes, 12 of them animals), 2M vectors per SAE",
                   # 16 images per forward pass: 1.4-1.7x the images per second of 64 on 2 cores, the same store bit for bit
                   # mixed4a's input kept for chapter 04's example pass (9.9 GB, deleted after it): 6-7 min less
                   HarvestConfig(images="imagenette+imagewoof", weights="lucent", batch_size=16, layers=WITH_DISTILL,
                                 keep_input_of="mixed4a"),
                   _train(2_000_000, sae=AUXK),
                   # 8 images per optimisation: 1.3x the feature-steps per second of 16 on 2 cores (bench/README)
                   FeatvizConfig(batch=8)),
    "gpu": Profile("gpu", "a Colab T4: real weights, Imagenette and Imagewoof (26,394 images, 12 of 20 classes "
                          "animals), 50M vectors per SAE",
                   HarvestConfig(images="imagenette+imagewoof", weights="lucent", batch_size=256, layers=WITH_DISTILL),
                   _train(50_000_000, sae=AUXK)),
    "paper": Profile("paper", "as the paper: ImageNet train ($IMAGENET_TRAIN), ~1e9 vectors per SAE",
                     HarvestConfig(images=IMAGENET_TRAIN, weights="lucent", batch_size=512, layers=WITH_DISTILL),
                     _train(1_000_000_000, sae=AUXK), FeatvizConfig(steps=2048)),
}


@dataclass(frozen=True)
class Settings:
    """What the environment asks of a run: read once, where a run is opened (``from_environment``)."""

    profile: str | None = None  # SAE_PROFILE
    run_dir: str | None = None  # SAE_RUN_DIR
    saes: str | None = None  # SAE_SAES: "train" or "author"
    fallback_reason: str | None = None  # SAE_FALLBACK_REASON: why the book build fell back to smoke
    book_build: bool = False  # SAE_BOOK_BUILD: executed by the book build
    imagenet_train: str | None = None  # IMAGENET_TRAIN: the paper profile's images

    @classmethod
    def from_environment(cls, environ=None) -> "Settings":
        env = os.environ if environ is None else environ
        saes = env.get("SAE_SAES") or None
        if saes not in (None, "train", "author"):
            raise ValueError(f"SAE_SAES={saes!r}; choose 'train' or 'author'")
        return cls(env.get("SAE_PROFILE") or None, env.get("SAE_RUN_DIR") or None, saes,
                   env.get("SAE_FALLBACK_REASON") or None, bool(env.get("SAE_BOOK_BUILD")),
                   env.get("IMAGENET_TRAIN") or None)


def runs_root() -> Path:
    """Where runs go by default: ``runs/`` of the checkout; for an installed package (Colab), ``runs/`` beside the
    notebook (the working directory), never inside site-packages."""
    return (ROOT if (ROOT / "_toc.yml").is_file() else Path.cwd()) / "runs"


def smoke_images(n: int, folder: Path) -> str:
    """The smoke profile's ``n`` images: an even spread of the ImageNet sample where it is beside the checkout
    (a list written into ``folder``), else images generated there."""
    if SAMPLE.is_dir():
        files = sorted(SAMPLE.glob("*.JPEG"))
        step = max(1, len(files) // n)
        listing = folder / "images.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("\n".join(str(f) for f in files[::step][:n]) + "\n")
        return str(listing)
    from helpers.data.images import generate_images

    generate_images(folder / "generated-images", n)
    return str(folder / "generated-images")


def default_profile_name() -> str:
    """colab on Colab (a chapter opened alone reaches its first figure in minutes), gpu with CUDA, else cpu."""
    import sys

    if "google.colab" in sys.modules:
        return "colab"
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def get_profile(name: str | None = None, settings: Settings | None = None) -> Profile:
    """The profile ``name`` (None: the settings', else ``default_profile_name``), its images as the settings say."""
    settings = settings or Settings()
    name = name or settings.profile or default_profile_name()
    if name not in PROFILES:
        raise ValueError(f"profile {name!r} is unknown; choose from {', '.join(PROFILES)}")
    profile = PROFILES[name]
    if name == "paper" and settings.imagenet_train:
        profile = dataclasses.replace(profile, harvest=dataclasses.replace(profile.harvest,
                                                                           images=settings.imagenet_train))
    return profile
