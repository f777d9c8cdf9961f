"""Feature visualisation with Lucent: an image optimised to point a layer along a decoder vector.

As the paper: ``objectives.direction(layer, d)`` (cosine with d, averaged over positions),
an FFT, decorrelated image parameterisation, and Lucent's standard jitter / scale / rotate
transforms. ``objective="neuron"`` uses ``objectives.direction_neuron`` (the centre position).

Many features are rendered in one optimisation: a batch of images, one feature each, the
objective a sum of per-batch-element directions. The forward pass stops after the layer
(the rest of the network cannot change the objective). Results are cached as PNG files
keyed by SAE, feature and settings; a rerun renders only what is missing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helpers.allocator import reuse_freed_memory
from helpers.config import FeatvizConfig
from helpers.files import WEIGHTS_FILE, atomic_write, sha256_file
from helpers.data.inception import MIXED_LAYERS, StopForward
from helpers.progress import progress


def _stop_after(model, layer: str):
    """A pre-hook on the first convolution that reads ``layer``'s output."""
    following = MIXED_LAYERS[MIXED_LAYERS.index(layer) + 1] if layer != MIXED_LAYERS[-1] else None
    if following is None:
        return None

    def stop(module, args):
        raise StopForward(f"stopped after {layer}")

    return getattr(model, f"{following}_1x1_pre_relu_conv").register_forward_pre_hook(stop)


def _optvis():
    """Lucent's ``optvis`` (objectives, param, render), imported without its transforms' torch.jit.script warning."""
    with warnings.catch_warnings():  # Lucent's transforms use torch.jit.script, which torch now deprecates
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        from lucent.optvis import objectives, param, render
    return objectives, param, render


def lucent_device() -> torch.device:
    """Where Lucent puts the images it optimises and its transforms' tensors (``param.spatial.device``: its first GPU
    where there is one, chosen at its import); the network must be there too."""
    return _optvis()[1].spatial.device


@reuse_freed_memory()
def render_directions(model, layer: str, directions: torch.Tensor, cfg: FeatvizConfig = FeatvizConfig()) -> np.ndarray:
    """Optimise one image per direction [n, C], all in one batch: float images [n, size, size, 3]."""
    objectives, param, render = _optvis()
    directions = directions.detach().float()
    device = next(model.parameters()).device
    n = len(directions)
    make_objective = objectives.direction if cfg.objective == "direction" else objectives.direction_neuron
    objective = sum(make_objective(layer, directions[i].to(device), batch=i) for i in range(n))
    torch.manual_seed(cfg.seed)
    numpy_state = np.random.get_state()  # Lucent's transforms draw their jitter, scale and angle from numpy's
    np.random.seed(cfg.seed % 2**32)  # global generator: seeded here, so a render is the same in every process
    before = {m: set(m._forward_hooks) for m in model.modules()}
    stop = _stop_after(model, layer)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some layers could not be computed")
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            images = render.render_vis(model, objective, lambda: param.image(cfg.size, batch=n),
                                       optimizer=lambda p: torch.optim.Adam(p, lr=cfg.lr),
                                       thresholds=(cfg.steps,), show_image=False, progress=False)
    finally:
        np.random.set_state(numpy_state)
        if stop is not None:
            stop.remove()
        for module, kept in before.items():  # Lucent leaves its feature hooks on the model
            for handle_id in set(module._forward_hooks) - kept:
                del module._forward_hooks[handle_id]
    return images[-1]


def cache_path(cache_dir: Path, sae_id: str, layer: str, feature: int, cfg: FeatvizConfig) -> Path:
    return Path(cache_dir) / f"{layer}-{sae_id}-{cfg.key()}" / f"{feature:05d}.png"


def sae_id(sae_dir: Path) -> str:
    """A short id of an SAE's weights file, so cached images follow the SAE they show."""
    return sha256_file(Path(sae_dir) / WEIGHTS_FILE)[:10]


@reuse_freed_memory()  # a layer's batches are one job: the memory is given back once
def render_features(model, layer: str, sae, sae_dir: Path, features, cache_dir: Path,
                    cfg: FeatvizConfig = FeatvizConfig()) -> dict[int, Path]:
    """PNG per feature (cached): renders the missing ones, ``cfg.batch`` at a time."""
    sid = sae_id(sae_dir)
    paths = {int(f): cache_path(cache_dir, sid, layer, int(f), cfg) for f in features}
    todo = [f for f, p in paths.items() if not p.exists()]
    directions = sae.decoder_directions.detach()
    for start in progress(range(0, len(todo), cfg.batch), desc=f"featviz {layer}", unit="batch",
                      disable=not todo):
        chunk = todo[start:start + cfg.batch]
        images = render_directions(model, layer, directions[chunk], cfg)
        for f, img in zip(chunk, images):
            png = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
            atomic_write(paths[f], lambda fh, png=png: png.save(fh, format="PNG"))
    return paths
