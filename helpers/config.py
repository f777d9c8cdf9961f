"""What each long job is asked to do: one dataclass per job, checked when it is made.

``HarvestConfig``, ``TrainConfig`` and ``FeatvizConfig`` describe a harvest, an SAE's
training and a batch of feature visualisations; a training nests the SAE's shape
(``SaeConfig``) and the switches of its fast kernels (``Kernels``), as sparsify nests its coder
config. The command line is generated from them (``cli``; nested fields are flags of their
own, ``--k``, ``--screen``), they are written next to every artifact, and a profile
(``run.profiles``) is one of each. Choices are ``Literal`` fields and numbers have ranges,
both checked in ``__post_init__``, so a bad value stops before anything runs or is written.

This module imports no torch: ``python -m helpers --help`` reads it alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Literal

MIXED_LAYERS = ("mixed3a", "mixed3b", "mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e", "mixed5a", "mixed5b")
PAPER_LAYERS = ("mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e")
BRANCHES = ("1x1", "3x3", "5x5", "pool")

Sampling = Literal["top-norm", "norm-weighted"]
Decode = Literal["workers", "device"]
InputScale = Literal["lucent", "unit"]
Tied = Literal["full", "init"]
Architecture = Literal["topk", "batchtopk", "matryoshka", "jumprelu"]
StoreMode = Literal["auto", "disk", "device"]
Screen = Literal["auto", "on", "off"]
Scatter = Literal["dense", "bag"]
Objective = Literal["direction", "neuron"]


def check_layers(layers) -> tuple[str, ...]:
    """Layer names (a list, or one comma-separated string) checked and put in network order."""
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    layers = list(layers)
    unknown = [name for name in layers if name not in MIXED_LAYERS]
    if unknown:
        raise ValueError(f"layer {unknown[0]!r} is not a layer of InceptionV1; choose from {', '.join(MIXED_LAYERS)}")
    if not layers:
        raise ValueError(f"no layers given; choose from {', '.join(MIXED_LAYERS)}")
    return tuple(name for name in MIXED_LAYERS if name in layers)


def option(name: str) -> str:
    """A field's name as its command-line flag."""
    return "--" + name.replace("_", "-")


def choices(cls, name: str) -> tuple | None:
    """The allowed values of a ``Literal`` field (also inside ``X | None``), else None."""
    hint = typing.get_type_hints(cls)[name]
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def _validate(cfg) -> None:
    """Check every Literal field's value and every numeric field's range (``min`` in its metadata)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        allowed = choices(type(cfg), f.name)
        if allowed and value is not None and value not in allowed:
            raise ValueError(f"{option(f.name)} {value!r} is not a choice; choose from {', '.join(map(str, allowed))}")
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if low is not None and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                      or not math.isfinite(value) or value < low):
            raise ValueError(f"{option(f.name)} {value!r} is out of range: it must be a finite number >= {low}")
        if high is not None and value is not None and value > high:
            raise ValueError(f"{option(f.name)} {value!r} is out of range: at most {high}{f.metadata.get('why', '')}")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class HarvestConfig:
    images: str = field(default="imagenette", metadata=_help(
        "folder of images, .txt list of paths, or a download: imagenette, imagenette+imagewoof, imagenet-sample"))
    out: str = field(default="runs/harvest", metadata=_help("run directory to write (or resume)"))
    layers: tuple[str, ...] = field(default=PAPER_LAYERS, metadata=_help("comma-separated mixed layers"))
    per_image: int = field(default=10, metadata=_help("grid positions kept per image and layer", min=1, max=1024,
                                                      why=" (mixed3a's grid, the largest, has 784 cells)"))
    sampling: Sampling = field(default="top-norm", metadata=_help("top-norm (paper text) or norm-weighted (paper code)"))
    weights: str = field(default="lucent", metadata=_help("lucent, random, or a path to a .pth state dict"))
    max_images: int | None = field(default=None, metadata=_help("use only the first N images", min=1))
    batch_size: int = field(default=64, metadata=_help("images per forward pass", min=1))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:1, ..."))
    seed: int = field(default=0, metadata=_help("seeds norm-weighted sampling and random weights", min=0, max=2**63 - 1))
    shard_images: int = field(default=1000, metadata=_help("images per shard (the unit of resume)", min=1))
    workers: int = field(default=2, metadata=_help("DataLoader worker processes reading (and decoding) images", min=0))
    decode: Decode = field(default="workers", metadata=_help(
        "workers: PIL decodes in the DataLoader workers; device: JPEGs are decoded, resized and cropped on "
        "--device (nvJPEG on CUDA), other formats by PIL"))
    amp: bool = field(default=True, metadata=_help("bfloat16 autocast and channels-last on CUDA"))
    input_scale: InputScale = field(default="lucent", metadata=_help(
        "lucent: RGB in [0,1] mapped by x*255-117, as Lucent's render_vis feeds the model; unit: [0,1] as is, "
        "the paper author's harvest (ToTensor() images into Lucent's forward, which does no preprocessing), "
        "which the author's published SAEs were trained on"))
    keep_input_of: str | None = field(default=None, metadata=_help(
        "a harvested layer whose input (mixed4a: the pooled mixed3b output, 376 KB an image) is kept beside the store "
        "for the example pass, which then runs only the layers from it on, to the same numbers (helpers/data/kept.py; "
        "not under --amp on CUDA or --decode device; not where the disk lacks the room)"))

    def __post_init__(self):
        self.layers = check_layers(self.layers)  # a comma string from the CLI becomes a tuple, once
        _validate(self)
        keep = self.keep_input_of
        if keep is not None and (keep not in MIXED_LAYERS or MIXED_LAYERS.index(keep) > MIXED_LAYERS.index(self.layers[-1])):
            raise ValueError(f"--keep-input-of {keep!r} is not a mixed layer the harvest's pass reaches (it stops after "
                             f"{self.layers[-1]}); name one of {', '.join(MIXED_LAYERS[:MIXED_LAYERS.index(self.layers[-1]) + 1])}, "
                             "or leave it out")


@dataclass(frozen=True)
class SaeConfig:
    """The SAE's shape: how many latents, how many kept per vector, how the decoder is tied, and AuxK."""

    expansion: int = field(default=16, metadata=_help("latents = expansion x layer width", min=1))
    latents: int | None = field(default=None, metadata=_help(
        "the number of latents, instead of expansion x layer width (any whole number)", min=1))
    k: int = field(default=32, metadata=_help("latents kept per vector", min=1))
    architecture: Architecture = field(default="topk", metadata=_help(
        "the SAE family (chapter 03): topk (the paper's), batchtopk, matryoshka (BatchTopK code, nested prefixes) or "
        "jumprelu (per-latent thresholds; k is its target L0)"))
    tied: Tied = field(default="full", metadata=_help("full (paper's code: W_dec = W_enc^T) or init (Gao et al.)"))
    prefixes: int = field(default=4, metadata=_help(
        "matryoshka: the number of nested prefixes (sizes latents/2^(P-1), ..., latents/2, latents)", min=1, max=16))
    aux_k: int = field(default=0, metadata=_help("AuxK latents against dead latents (0: off; Gao: d_in/2)", min=0))
    aux_coef: float = field(default=1 / 32, metadata=_help("weight of the AuxK loss", min=0))

    def __post_init__(self):
        _validate(self)
        if self.aux_k and self.architecture != "topk":
            raise ValueError(f"--aux-k is TopK's (Gao et al.'s AuxK); the {self.architecture} family trains without it: "
                             "drop --aux-k or use --architecture topk")


@dataclass(frozen=True)
class Kernels:
    """How the SAE computes, never what: its fast paths, each exact, switched here for benchmarks and checks."""

    screen: Screen = field(default="auto", metadata=_help(
        "the CPU's exact TopK from a bf16 screen: auto (where the CPU multiplies bf16 in hardware: AMX or AVX512-BF16), on, off"))
    cpu_topk: bool = field(default=True, metadata=_help(
        "where the screen is off, the CPU's TopK by block maxima (a Numba kernel) instead of torch.topk"))
    triton: bool = field(default=True, metadata=_help("the Triton sparse decoder on CUDA"))
    scatter: Scatter = field(default="dense", metadata=_help(
        "the decoder's weight gradient on CUDA: dense (a coefficient matrix product) or bag (embedding_bag's backward)"))

    def __post_init__(self):
        _validate(self)


def _nested(value, cls):
    """A nested config given as a dict (read back from JSON) made into ``cls``."""
    return cls(**value) if isinstance(value, dict) else value


@dataclass
class TrainConfig:
    run: str | None = field(default=None, metadata=_help("harvest run directory (with --layer)"))
    layer: str | None = field(default=None, metadata=_help(
        "layer of the run to train on, e.g. mixed4c; several (mixed4a,mixed4b,...) train at once, one process each"))
    vectors: str | None = field(default=None, metadata=_help("instead of --run: an .npy file of shape [N, d]"))
    out: str = field(default="runs/sae", metadata=_help("directory for the SAE, metrics and checkpoints"))
    sae: SaeConfig = field(default_factory=SaeConfig, metadata=_help("the SAE's shape"))
    lr: float | None = field(default=None, metadata=_help(
        "Adam learning rate (default 2e-4 / sqrt(latents / 2^14))", min=1e-12))
    batch_size: int = field(default=4096, metadata=_help("vectors per step", min=1))
    vectors_seen: int = field(default=10_000_000, metadata=_help("training budget in vectors (paper: ~1e9)", min=1))
    dead_after: int = field(default=1_000_000, metadata=_help("a latent silent for this many vectors is dead", min=1))
    holdout: int = field(default=16384, metadata=_help("vectors held out for the final FVU", min=0))
    log_every: int = field(default=25, metadata=_help("steps between metrics records", min=1))
    checkpoint_every: int = field(default=5_000_000, metadata=_help("vectors between checkpoints", min=1))
    store: StoreMode = field(default="auto", metadata=_help(
        "where training batches come from: disk (shuffled stream of memmaps), device (all vectors copied to the "
        "device once, shuffled there), auto (device on CUDA when it fits)"))
    device: str = field(default="auto", metadata=_help(
        "auto, cpu, cuda, ...; with several layers, a comma list (cuda:0,cuda:1,...) used in turn"))
    seed: int = field(default=0, metadata=_help("seeds initialisation and data order", min=0, max=2**63 - 1))
    resume: bool = field(default=False, metadata=_help("continue from --out's checkpoint"))
    kernels: Kernels = field(default_factory=Kernels, metadata=_help("the fast paths' switches"))

    def __post_init__(self):
        self.sae, self.kernels = _nested(self.sae, SaeConfig), _nested(self.kernels, Kernels)
        _validate(self)


@dataclass(frozen=True)
class FeatvizConfig:
    steps: int = field(default=512, metadata=_help("optimisation steps (the author: ~2500)", min=1))
    size: int = field(default=224, metadata=_help("image side in pixels", min=16))
    lr: float = field(default=0.05, metadata=_help("Adam learning rate", min=1e-12))
    objective: Objective = field(default="direction", metadata=_help(
        "direction (cosine with the decoder vector, mean over positions) or neuron (the centre position)"))
    batch: int = field(default=16, metadata=_help("features per optimisation", min=1))
    seed: int = field(default=0, metadata=_help("seeds the image parameterisation", min=0, max=2**63 - 1))

    def __post_init__(self):
        _validate(self)

    def key(self) -> str:
        """A short hash of the settings, naming the cache folder of the images they make."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]
