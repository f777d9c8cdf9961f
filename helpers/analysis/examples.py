"""Dataset examples: the images, and the places in them, where each SAE feature fires.

One streaming pass over an image set computes every feature's activation at every grid
position (not only the harvested ones) and keeps, per feature,

* the ``top`` images where it fires most (value, image, y, x at its strongest position);
* a uniform random sample of ``reservoir`` images where it fires at all, from which
  ``bands`` examples are drawn at a range of activation levels, as the paper shows.

All of it on the device with batched top-k merges ([images, features] at a time), no
per-feature Python loop, and for several layers from one forward pass of the network
(``example_passes``), which saves its state as it goes so that an interrupted pass goes on where
it stopped. Crops are cut around the activating grid cell (16 px at 224 input; a window of
about 100 px, as the author used), with the feature's map as an overlay.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from helpers.allocator import reuse_freed_memory
from helpers.config import MIXED_LAYERS
from helpers.files import atomic_write
from helpers.data.images import ImageDataset, collate
from helpers.data.inception import LayerCapture, model_input_from_uint8
from helpers.data.kept import InputWatch, KeptInputs, paths_sha256
from helpers.progress import progress
from helpers.analysis.selection import activation_bands
from helpers.analysis.streaming import image_maxima, merge_top
from helpers.sae.model import InputScaleMismatch, input_scale_for

CELL = 16  # pixels per grid cell at 224 px input (224 / 14)


@dataclass
class Examples:
    """Per feature (rows): ``top_*`` [n, top] sorted by value; ``sample_*`` [n, reservoir] unsorted.
    Unused slots have value 0 and image -1. Positions are grid cells (y, x)."""

    top_value: np.ndarray
    top_image: np.ndarray
    top_y: np.ndarray
    top_x: np.ndarray
    sample_value: np.ndarray
    sample_image: np.ndarray
    sample_y: np.ndarray
    sample_x: np.ndarray
    images_seen: int

    def save(self, path: Path) -> None:
        from safetensors.numpy import save

        data = save({k: np.ascontiguousarray(v) for k, v in self.__dict__.items() if isinstance(v, np.ndarray)},
                    metadata={"images_seen": str(self.images_seen)})
        atomic_write(path, lambda f: f.write(data))

    @classmethod
    def load(cls, path: Path) -> "Examples":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
            seen = int(f.metadata()["images_seen"])
        return cls(**arrays, images_seen=seen)

    def bands(self, feature: int, n_bands: int = 4, per_band: int = 3) -> list[list[tuple[float, int, int, int]]]:
        """The feature's sampled examples in ``n_bands`` bands of activation (``selection.activation_bands``)."""
        top = float(self.top_value[feature, 0]) if self.top_image[feature, 0] >= 0 else 0.0
        return activation_bands(self.sample_value[feature], self.sample_image[feature], self.sample_y[feature],
                                self.sample_x[feature], top, n_bands, per_band)


@torch.no_grad()
def example_pass(model, sae, layer: str, images, top: int = 16, reservoir: int = 64, batch_size: int = 32,
                 device: str | torch.device = "cpu", seed: int = 0, workers: int = 0,
                 input_scale: str | None = None) -> Examples:
    """Stream ``images`` (an ImageList) once; keep each feature's top and sampled examples.
    ``input_scale``: the convention to feed the network (``inception.INPUT_SCALES``); None: the one the SAE's
    vectors were harvested under (its ``cfg.json`` says); another than that is refused."""
    return example_passes(model, {layer: sae}, images, top, reservoir, batch_size, device, seed, workers,
                          input_scale)[layer]


@reuse_freed_memory()
@torch.no_grad()
def example_passes(model, saes: dict, images, top: int = 16, reservoir: int = 64, batch_size: int = 32,
                   device: str | torch.device = "cpu", seed: int = 0, workers: int = 0,
                   input_scale: str | None = None, checkpoint: str | Path | None = None,
                   checkpoint_seconds: float = 300.0, kept: KeptInputs | None = None) -> dict[str, Examples]:
    """``example_pass`` for several layers ({layer: sae}) from one forward pass per batch of images: the
    network runs once, not once per layer (on a CPU the forward pass is most of the work). Each layer's
    result is the one its own ``example_pass`` gives (its reservoir draws from its own generator).

    With ``checkpoint`` (a file path) the state is saved there every ``checkpoint_seconds``; a pass started
    again after an interruption goes on from the last save, to the result an uninterrupted pass gives, and
    removes the file when done. A checkpoint of other SAEs, images or settings is ignored, with a warning.

    ``kept``: the harvest's kept input of a layer at or before these (``helpers.data.kept``): the network then runs
    from it, to the same numbers (checked bit for bit on the first images; where they differ, or the kept tensors
    are of another input convention, the whole network runs, with a warning)."""
    dev = torch.device(device)
    scales = {input_scale_for(sae, input_scale, f"the SAE of {layer}") for layer, sae in saes.items()}
    if len(scales) > 1:
        raise InputScaleMismatch(f"the SAEs of {', '.join(saes)} were trained on activations of different input "
                                 f"conventions ({', '.join(sorted(scales))}); pass the layers of one run at a time")
    input_scale = scales.pop()
    running = {layer: _Running(sae.d_sae, top, reservoir, dev, seed) for layer, sae in saes.items()}
    what = _fingerprint(saes, images, top, reservoir, batch_size, seed, input_scale)
    done = _resume(Path(checkpoint), what, running, len(images)) if checkpoint is not None else 0
    capture = LayerCapture(model, list(saes))
    if kept is not None and not _kept_fits(kept, model, capture.layers[0], images, done, dev, input_scale):
        kept = None
    batches = _activations(model, capture, images, done, batch_size, workers, dev, input_scale, kept)
    saved = time.monotonic()
    for idx, acts in progress(batches, desc=f"examples {', '.join(saes)}", unit="batch",
                              initial=done // batch_size, total=-(-len(images) // batch_size)):
        done = min(done + batch_size, len(images))
        if acts is not None:  # {layer: [B, C, H, W]}
            for layer, sae in saes.items():
                # per image and feature: the strongest position, from dense codes a few images at a time
                value, position = _image_maxima(sae, acts[layer].flatten(2).transpose(1, 2))
                running[layer].add(idx.to(dev), value, position, acts[layer].shape[2] * acts[layer].shape[3])
        if checkpoint is not None and done < len(images) and time.monotonic() - saved >= checkpoint_seconds:
            try:
                _save(Path(checkpoint), what, running, done)
            except OSError as e:  # a read-only folder, a folder in the file's place: the pass goes on without
                warnings.warn(f"cannot save the example pass's checkpoint to {checkpoint} ({e}); going on without "
                              "one (an interruption would start the pass over)")
                checkpoint = None
            saved = time.monotonic()
    found = {layer: r.examples(len(images)) for layer, r in running.items()}
    if checkpoint is not None and Path(checkpoint).is_file():
        Path(checkpoint).unlink()
    return found


def _activations(model, capture, images, done: int, batch_size: int, workers: int, dev, input_scale: str, kept):
    """``(indices, {layer: output} or None)`` for each batch of ``batch_size`` images from image ``done`` on (the
    files that cannot be read left out): from the kept layer input where there is one, else from the images."""
    if kept is not None:
        for idx, x in kept.batches(done, len(images), batch_size):
            yield idx, None if x is None else capture(None, start=(kept.name, x.to(dev)))
        return
    from torch.utils.data import DataLoader, Subset

    dataset = ImageDataset(images)
    loader = DataLoader(Subset(dataset, range(done, len(dataset))) if done else dataset, batch_size=batch_size,
                        collate_fn=collate, num_workers=workers)
    for idx, pixels, _bad in loader:
        yield idx, None if pixels is None else capture(model_input_from_uint8(pixels.to(dev), input_scale))


def _kept_fits(kept: KeptInputs, model, first_layer: str, images, start: int, dev, input_scale: str,
               n: int = 2) -> bool:
    """Whether the pass may start from ``kept``: of this input convention, at or before ``first_layer``, of these
    images, and, for the first ``n`` readable images from ``start`` on, bit for bit what the network makes of them
    now (the same weights and decoder)."""
    if kept.input_scale != input_scale or MIXED_LAYERS.index(kept.layer) > MIXED_LAYERS.index(first_layer):
        return False  # another convention (the author's SAEs) or a later layer: not for this pass
    why = None
    if kept.images_sha256 != paths_sha256(images.paths):
        why = "they were kept for other images"
    else:
        first = list(itertools.islice((i for i in range(start, len(images)) if i not in kept.skipped), n))
        idx, pixels, bad = collate([ImageDataset(images)[i] for i in first])
        if bad:
            why = f"image {bad[0][0]} cannot be read now ({bad[0][1]})"
        elif len(idx):
            with torch.no_grad(), InputWatch(model, kept.layer, stop=True) as watch:
                now = watch.run(model_input_from_uint8(pixels.to(dev), input_scale)).cpu()
            if not torch.equal(now, torch.cat([kept.rows(i, i + 1) for i in first])):
                why = "they differ from what the network computes now (other weights or another image decoder)"
    if why is not None:
        warnings.warn(f"not using the harvest's kept input of {kept.layer} ({kept.folder}): {why}; the example pass "
                      "runs the whole network")
    return why is None


def _fingerprint(saes: dict, images, *settings) -> str:
    """What a checkpoint of the pass must match: the layers, each SAE's weights, the images and the settings."""
    h = hashlib.sha256(json.dumps([list(saes), [str(p) for p in images.paths], settings]).encode())
    for sae in saes.values():
        for p in (sae.encoder_weight, sae.b_enc, sae.b_dec):
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _save(path: Path, what: str, running: dict, done: int) -> None:
    from safetensors.torch import save

    tensors = {f"{layer}/{k}": v for layer, r in running.items() for k, v in r.state().items()}
    data = save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata={"what": what, "done": str(done)})
    atomic_write(path, lambda f: f.write(data))


def _resume(path: Path, what: str, running: dict, n_images: int) -> int:
    """Load a checkpoint into ``running``; the number of images it had done (0: none, not this pass's, or one
    whose numbers do not fit this pass: damaged)."""
    from safetensors import safe_open

    if not path.exists():
        return 0
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("what") != what:
                warnings.warn(f"{path} is the checkpoint of another example pass (other SAEs, images or "
                              f"settings); starting over")
                return 0
            done = int(meta["done"])
            if not 0 <= done <= n_images:
                raise ValueError(f"it says {done} of the {n_images} images are done")
            states = {layer: {k: f.get_tensor(f"{layer}/{k}") for k in r.state()} for layer, r in running.items()}
            for layer, r in running.items():
                r.check(states[layer], n_images, layer)
            for layer, r in running.items():
                r.load(states[layer])
            return done
    except Exception as e:  # a truncated or foreign file
        warnings.warn(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); starting over")
        return 0


class _Running:
    """One layer's examples so far: the top ``top`` and a reservoir of ``reservoir`` images per feature, a row per
    feature ([n, top]: ``merge_top`` inserts along it); a checkpoint's state holds them as [top, n]."""

    def __init__(self, n: int, top: int, reservoir: int, dev: torch.device, seed: int):
        self.hw = None
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.best_v = torch.zeros(n, top, device=dev)
        self.best_loc = torch.full((n, top), -1, dtype=torch.long, device=dev)
        self.res_key = torch.full((n, reservoir), -1.0, device=dev)
        self.res_v = torch.zeros(n, reservoir, device=dev)
        self.res_loc = torch.full((n, reservoir), -1, dtype=torch.long, device=dev)

    def state(self) -> dict[str, torch.Tensor]:
        return {"best_v": self.best_v.T, "best_loc": self.best_loc.T, "res_key": self.res_key.T, "res_v": self.res_v.T,
                "res_loc": self.res_loc.T, "gen": self.gen.get_state(), "hw": torch.tensor(self.hw or 0)}

    def check(self, state: dict[str, torch.Tensor], n_images: int, layer: str) -> None:
        """A ValueError unless ``state`` fits this pass: the same shapes and kinds, finite values, grid positions
        of images that exist."""
        for k, mine in self.state().items():
            if k in ("gen", "hw"):
                continue
            theirs = state[k]
            if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
                raise ValueError(f"{layer}/{k} is {theirs.dtype} {tuple(theirs.shape)}, not {mine.dtype} {tuple(mine.shape)}")
            if theirs.is_floating_point() and not torch.isfinite(theirs).all():
                raise ValueError(f"{layer}/{k} holds NaN or infinite numbers")
        hw = int(state["hw"])
        if not 0 <= hw <= 1 << 16:
            raise ValueError(f"{layer}: a grid of {hw} positions")
        for k in ("best_loc", "res_loc"):
            loc = state[k]
            if ((loc < -1) | (loc >= n_images * max(hw, 1))).any():
                raise ValueError(f"{layer}/{k} points at images that are not among the {n_images}")

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for k in ("best_v", "best_loc", "res_key", "res_v", "res_loc"):
            setattr(self, k, state[k].T.contiguous().to(getattr(self, k).device))
        self.gen.set_state(state["gen"])
        self.hw = int(state["hw"]) or None

    def add(self, idx: torch.Tensor, value: torch.Tensor, position: torch.Tensor, hw: int) -> None:
        """A batch: its images' indices [B], each feature's maximum per image [B, n] and its position."""
        self.hw = hw
        loc = idx[:, None] * hw + position  # global (image, position) id
        merge_top(self.best_v, self.best_loc, value, loc)  # the running top: the m largest so far, sorted
        # reservoir: keep the images with the largest random keys among those where it fires
        key = torch.rand(value.shape, generator=self.gen).to(value.device).masked_fill(value <= 0, -1.0)
        merge_top(self.res_key, self.res_loc, key, loc, self.res_v, value)

    def examples(self, images_seen: int) -> Examples:
        hw = self.hw or 196
        side = int(round(hw ** 0.5))

        def split(v, loc):
            v, loc = v.cpu().numpy(), loc.cpu().numpy()
            image = np.where(loc >= 0, loc // hw, -1)
            pos = np.where(loc >= 0, loc % hw, 0)
            return v, image, pos // side, pos % side

        tv, ti, ty, tx = split(self.best_v, torch.where(self.best_v > 0, self.best_loc, -1))
        sv, si, sy, sx = split(self.res_v, torch.where(self.res_key >= 0, self.res_loc, -1))
        return Examples(tv, ti, ty, tx, sv, si, sy, sx, images_seen=images_seen)


def _image_maxima(sae, positions: torch.Tensor, budget: int = 1 << 26):
    """positions [B, HW, C] -> (max activation [B, n], its position [B, HW index]) per feature: the dense codes'
    ``max(dim=1)`` (the first position of the maximum; position 0 where the feature is 0 everywhere), read from
    the kept latents alone, a few images at a time."""
    b, hw, c = positions.shape
    step = max(1, budget // (hw * sae.d_sae))
    values, where = [], []
    for s in range(0, b, step):
        code = sae.encode_topk(positions[s:s + step].reshape(-1, c))
        best, at = image_maxima(code.values, code.indices, hw, sae.d_sae)
        values.append(best)
        where.append(at)
    return torch.cat(values), torch.cat(where)


def crop(image: np.ndarray, y: int, x: int, window: int = 100) -> np.ndarray:
    """A ``window`` px square of a 224 px image around grid cell (y, x), clamped to the image."""
    size = image.shape[0]
    cy, cx = y * CELL + CELL // 2, x * CELL + CELL // 2
    top = int(np.clip(cy - window // 2, 0, size - window))
    left = int(np.clip(cx - window // 2, 0, size - window))
    return image[top:top + window, left:left + window]


@torch.no_grad()
def activation_map(model, sae, layer: str, pixels: torch.Tensor, feature: int,
                   input_scale: str | None = None) -> np.ndarray:
    """The feature's activation at every grid cell of one uint8 image [3, 224, 224]: [14, 14]. ``input_scale``
    as ``example_pass``'s (None: the SAE's own convention)."""
    input_scale = input_scale_for(sae, input_scale, f"the SAE of {layer}")
    acts = LayerCapture(model, [layer])(model_input_from_uint8(pixels[None], input_scale))[layer][0]
    c, h, w = acts.shape
    z = sae.encode(acts.reshape(c, -1).T)[:, feature]
    return z.reshape(h, w).cpu().numpy()


def overlay(image: np.ndarray, amap: np.ndarray) -> np.ndarray:
    """Where the feature fires on the image, uint8 [224, 224, 3]: the image dimmed where the map
    ``amap`` [14, 14] is zero, tinted red in proportion to the activation, and the strongest cell
    framed in yellow. A map that is zero everywhere leaves the image dimmed, with no frame."""
    m = amap / amap.max() if amap.max() > 0 else np.zeros_like(amap)
    up = np.kron(m, np.ones((CELL, CELL)))[: image.shape[0], : image.shape[1]][..., None]
    red = np.array([255.0, 40.0, 40.0])
    out = image * (0.35 + 0.65 * up) * (1 - 0.45 * up) + red * 0.45 * up
    if amap.max() > 0:
        y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
        y0, x0 = y * CELL, x * CELL
        frame = np.zeros(out.shape[:2], bool)
        frame[max(y0 - 2, 0):y0 + CELL + 2, max(x0 - 2, 0):x0 + CELL + 2] = True
        frame[y0 + 1:y0 + CELL - 1, x0 + 1:x0 + CELL - 1] = False
        out[frame] = (255, 230, 0)
    return np.clip(out, 0, 255).astype(np.uint8)


def cell_colours(image: np.ndarray, radius: int = 1) -> np.ndarray:
    """Mean RGB of the (2 radius + 1)^2 cells around each grid cell of a 224 px image: [14, 14, 3]."""
    g = image.shape[0] // CELL
    cells = image[: g * CELL, : g * CELL].reshape(g, CELL, g, CELL, 3).mean(axis=(1, 3))
    padded = np.pad(cells, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    k = 2 * radius + 1
    return sum(padded[dy:dy + g, dx:dx + g] for dy in range(k) for dx in range(k)) / k**2
