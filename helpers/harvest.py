"""Harvest activation vectors from InceptionV1's mixed layers into a sharded store.

For every image, one forward pass captures all requested layers. From each layer's
[C, H, W] output, ``per_image`` grid positions are kept:

* ``top-norm`` (the paper's text, default): the positions whose activation vector has the
  largest L2 norm;
* ``norm-weighted`` (the paper's released code): positions drawn with probability
  proportional to the norm, with replacement, as ``torch.multinomial`` does. The uniforms
  behind each draw come from (seed, shard, layer), so the draws do not depend on the batch
  size or device.

Images are split into shards of ``shard_images``; a finished shard is committed
atomically (see ``store``), so a killed harvest rerun with the same command resumes at the
first unfinished shard and ends with the same store as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import __version__
from .files import append_jsonl
from .images import ImageDataset, collate, decode_on_device, list_images
from .inception import (PAPER_LAYERS, RANDOM_WARNING, LayerCapture, branch_slices, check_layers, is_random,
                        layer_width, load_model, model_input_from_uint8)
from .store import (PROVENANCE, StoreError, finished_shards, read_manifest, read_shard_record, save_manifest,
                    write_shard)

log = logging.getLogger(__name__)
SAMPLINGS = ("top-norm", "norm-weighted")
DECODES = ("workers", "device")
INPUT = "Resize(256) CenterCrop(224), RGB in [0,1] -> x*255-117"


@dataclass
class HarvestConfig:
    images: str = field(default="imagenette", metadata={"help": "folder of images, .txt list of paths, or 'imagenette'"})
    out: str = field(default="runs/harvest", metadata={"help": "run directory to write (or resume)"})
    layers: str = field(default=",".join(PAPER_LAYERS), metadata={"help": "comma-separated mixed layers"})
    per_image: int = field(default=10, metadata={"help": "grid positions kept per image and layer"})
    sampling: str = field(default="top-norm", metadata={"help": "top-norm (paper text) or norm-weighted (paper code)",
                                                                  "choices": SAMPLINGS})
    weights: str = field(default="lucent", metadata={"help": "lucent, random, or a path to a .pth state dict"})
    max_images: int | None = field(default=None, metadata={"help": "use only the first N images"})
    batch_size: int = field(default=64, metadata={"help": "images per forward pass"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    seed: int = field(default=0, metadata={"help": "seeds norm-weighted sampling and random weights"})
    shard_images: int = field(default=1000, metadata={"help": "images per shard (the unit of resume)"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes reading (and decoding) images"})
    decode: str = field(default="workers", metadata={"help": "workers: PIL decodes in the DataLoader workers; device: "
                                                     "JPEGs are decoded, resized and cropped on --device (nvJPEG on "
                                                     "CUDA), other formats by PIL", "choices": DECODES})
    amp: bool = field(default=True, metadata={"help": "bfloat16 autocast and channels-last on CUDA"})


# settings that define the store's content; a resumed run must agree on all of them
_IDENTITY = ("layers", "per_image", "sampling", "weights_id", "seed", "shard_images", "images_sha256", "input")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def select_positions(acts: torch.Tensor, per_image: int, sampling: str, uniforms: torch.Tensor | None = None):
    """Pick ``per_image`` grid positions per image from one layer's output.

    acts: [B, C, H, W]. Returns (vectors [B, P, C], positions [B, P] as y * W + x,
    norms [B, P] float32). ``uniforms`` [B, P] in [0, 1) drive norm-weighted sampling.
    """
    b, c, h, w = acts.shape
    if sampling == "top-norm" and per_image > h * w:
        raise ValueError(f"--per-image {per_image} exceeds the {h}x{w} grid of positions")
    flat = acts.flatten(2).transpose(1, 2)  # [B, HW, C]
    norms = flat.float().norm(dim=-1)  # [B, HW]
    if sampling == "top-norm":
        pos = norms.topk(per_image, dim=1).indices
    elif sampling == "norm-weighted":
        # inverse-CDF sampling in proportion to the norm, with replacement (= torch.multinomial)
        cdf = norms.cumsum(dim=1)
        pos = torch.searchsorted(cdf, uniforms.to(cdf) * cdf[:, -1:], right=True).clamp_max(h * w - 1)
    else:
        raise ValueError(f"sampling {sampling!r} is unknown; choose from {', '.join(SAMPLINGS)}")
    vectors = flat.gather(1, pos.unsqueeze(-1).expand(-1, -1, c))
    return vectors, pos, norms.gather(1, pos)


def _uniforms(seed: int, shard: int, layer: str, n_images: int, per_image: int) -> torch.Tensor:
    key = int.from_bytes(hashlib.sha256(f"{seed}/{shard}/{layer}".encode()).digest()[:8], "little")
    return torch.rand(n_images, per_image, generator=torch.Generator().manual_seed(key))


def _sha256_lines(lines) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class _ShardBatches:
    """Batches of image indices that never cross a shard boundary, over the shards to do."""

    def __init__(self, shards, shard_images: int, n_images: int, batch_size: int):
        self.batches = [list(range(s, min(s + batch_size, end)))
                        for k in shards
                        for end in [min((k + 1) * shard_images, n_images)]
                        for s in range(k * shard_images, end, batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _open_run(out: Path, manifest: dict) -> None:
    if (out / "manifest.json").exists():
        old = read_manifest(out)
        differ = [k for k in _IDENTITY if old.get(k) != manifest.get(k)]
        if differ:
            raise StoreError(
                f"{out} already holds a harvest made with other settings ({', '.join(differ)} differ); "
                "choose another --out, or delete that directory to start over"
            )
        manifest["started"] = old.get("started", manifest["started"])
    save_manifest(out, manifest)


def harvest(cfg: HarvestConfig, model: torch.nn.Module | None = None) -> Path:
    """Run (or resume) a harvest; returns the run directory.

    ``model``: an already built InceptionV1 to use instead of ``cfg.weights`` (a modified or
    instrumented one); its ``weights_id`` attribute names it in the manifest.
    """
    layers = check_layers(cfg.layers)
    if cfg.sampling not in SAMPLINGS:
        raise ValueError(f"sampling {cfg.sampling!r} is unknown; choose from {', '.join(SAMPLINGS)}")
    if cfg.decode not in DECODES:
        raise ValueError(f"decode {cfg.decode!r} is unknown; choose from {', '.join(DECODES)}")
    from . import distributed

    rank, ranks, device = distributed.setup(resolve_device(cfg.device))
    cuda = device.type == "cuda"
    images = list_images(cfg.images).head(cfg.max_images)
    if model is None:
        model, weights_id = load_model(cfg.weights, device, seed=cfg.seed)
    else:
        model, weights_id = model.to(device).eval(), getattr(model, "weights_id", "custom model")
    slices = branch_slices(model, layers)
    use_amp = cfg.amp and cuda
    if use_amp:
        model = model.to(memory_format=torch.channels_last)
    capture = LayerCapture(model, layers)
    with torch.no_grad():
        probe = capture(torch.zeros(1, 3, 224, 224, device=device))
    grid = {name: list(t.shape[2:]) for name, t in probe.items()}

    out = Path(cfg.out)
    n_images = len(images)
    n_shards = math.ceil(n_images / cfg.shard_images)
    manifest = {
        "kind": "harvest",
        "helpers_version": __version__,
        "config": asdict(cfg),
        "model": "InceptionV1 (Lucid inception5h via Lucent)",
        "weights_id": weights_id,
        "random_weights": is_random(weights_id),
        "warning": RANDOM_WARNING if is_random(weights_id) else None,
        # decoders differ by up to one grey level, so the decoder is part of what the store is
        "input": INPUT + ("" if cfg.decode == "workers" else f"; JPEGs decoded on {device.type} (torchvision "
                          "decode_jpeg), tensor resize with antialiasing"),
        "layers": list(layers),
        "widths": {name: layer_width(slices[name]) for name in layers},
        "branch_slices": slices,
        "grid": grid,
        "per_image": cfg.per_image,
        "sampling": cfg.sampling,
        "seed": cfg.seed,
        "shard_images": cfg.shard_images,
        "n_shards": n_shards,
        "images": images.to_record(),
        "images_sha256": _sha256_lines(str(p) for p in images.paths),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": False,
    }
    if rank == 0:
        _open_run(out, manifest)
    distributed.barrier()

    done = set(finished_shards(out))
    todo = [k for k in range(n_shards) if k not in done and k % ranks == rank]  # under torchrun, shards by rank
    sampler = _ShardBatches(todo, cfg.shard_images, n_images, cfg.batch_size)
    loader = DataLoader(ImageDataset(images, encoded=cfg.decode == "device"), batch_sampler=sampler, collate_fn=collate,
                        num_workers=cfg.workers, pin_memory=cuda, persistent_workers=False)
    if is_random(weights_id):
        log.warning("harvest %s: %s", out, RANDOM_WARNING)

    shard_len = lambda k: min((k + 1) * cfg.shard_images, n_images) - k * cfg.shard_images
    mine = [k for k in range(n_shards) if k % ranks == rank]
    bar = tqdm(total=sum(map(shard_len, mine)), initial=sum(shard_len(k) for k in mine if k in done), unit="img",
               desc=f"harvest {out.name}" + (f" rank {rank}" if ranks > 1 else ""))
    pending: dict[int, dict] = {}
    t_shard = time.perf_counter()
    for idx, pixels, bad in loader:
        if isinstance(pixels, list):  # JPEG bytes: decode on the device
            keep, pixels, errors = decode_on_device(pixels, device)
            bad = bad + [(int(idx[j]), err) for j, err in errors]
            idx = idx[keep]
        first = int(idx[0]) if len(idx) else bad[0][0]
        shard = first // cfg.shard_images
        state = pending.setdefault(shard, {"parts": {name: [] for name in layers}, "skipped": [], "seen": 0,
                                           "uniforms": _shard_uniforms(cfg, shard, layers),
                                           "first_image": shard * cfg.shard_images})
        state["skipped"] += [[i, str(images.paths[i]), err] for i, err in bad]
        state["seen"] += len(idx) + len(bad)
        if len(idx):
            _harvest_batch(capture, pixels, idx - shard * cfg.shard_images, cfg, device, use_amp, state)
        bar.update(len(idx) + len(bad))
        start, end = shard * cfg.shard_images, min((shard + 1) * cfg.shard_images, n_images)
        if state["seen"] == end - start:
            record = _commit_shard(out, shard, start, end, pending.pop(shard), layers, cfg.per_image, slices)
            record["seconds"] = round(time.perf_counter() - t_shard, 3)
            append_jsonl(out / "harvest.jsonl", record)
            t_shard = time.perf_counter()
    bar.close()
    distributed.barrier()
    if rank != 0:
        return out
    records = [read_shard_record(out, k) for k in range(n_shards)]
    manifest["complete"] = True
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest["vectors"] = sum(r["vectors"] for r in records)
    manifest["skipped"] = [s for r in records for s in r["skipped"]]
    save_manifest(out, manifest)
    if manifest["skipped"]:
        log.warning("harvest %s: skipped %d unreadable files (listed in manifest.json)", out, len(manifest["skipped"]))
    return out


def memory_estimate(model: torch.nn.Module, layers, batch: int, *, amp: bool = False, size: int = 224) -> dict[str, int]:
    """Bytes a harvest's forward pass needs on its device, by part.

    Lucent's InceptionV1 keeps every intermediate tensor until ``forward`` returns (we stop
    it after the last requested layer), so activation memory is ``batch`` times the bytes
    of every distinct tensor a module takes or gives up to that layer (the padded copies
    and concatenations included; counted with hooks on one image; 2 bytes per value under
    bf16 autocast, else 4), plus the weights and the uint8/float input.
    """
    layers = check_layers(layers)
    x = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
    seen = {x.data_ptr(): 0}

    def count(module, inputs, output):
        for t in (*inputs, output):
            if isinstance(t, torch.Tensor):
                seen.setdefault(t.data_ptr(), t.numel())

    handles = [m.register_forward_hook(count) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            LayerCapture(model, layers)(x)
    finally:
        for h in handles:
            h.remove()
    return {"weights": sum(p.numel() * p.element_size() for p in model.parameters()),
            "activations": batch * sum(seen.values()) * (2 if amp else 4),
            "input": batch * 3 * size * size * (1 + 4)}


def _shard_uniforms(cfg, shard, layers) -> dict[str, torch.Tensor | None]:
    if cfg.sampling != "norm-weighted":
        return dict.fromkeys(layers)
    return {name: _uniforms(cfg.seed, shard, name, cfg.shard_images, cfg.per_image) for name in layers}


def _harvest_batch(capture, pixels, rows, cfg, device, use_amp, state) -> None:
    """Forward one batch, select positions in every layer, keep them in the shard's state."""
    x = model_input_from_uint8(pixels.to(device, non_blocking=True))
    if use_amp:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        acts = capture(x)
    for name, a in acts.items():
        u = state["uniforms"][name]
        vectors, pos, norms = select_positions(a, cfg.per_image, cfg.sampling, None if u is None else u[rows].to(device))
        w = a.shape[3]
        pos = pos.cpu()
        image = (rows + state["first_image"])[:, None].expand_as(pos)
        state["parts"][name].append((vectors.half().cpu(), image, pos // w, pos % w, norms.cpu()))


def _commit_shard(out, shard, start, end, state, layers, per_image, slices) -> dict:
    arrays = {}
    n = 0
    for name in layers:
        parts = state["parts"][name]
        d = layer_width(slices[name])
        if parts:
            vectors = torch.cat([p[0].reshape(-1, d) for p in parts]).numpy()
            prov = np.empty(len(vectors), PROVENANCE)
            prov["image"] = torch.cat([p[1].reshape(-1) for p in parts]).numpy()
            prov["y"] = torch.cat([p[2].reshape(-1) for p in parts]).numpy()
            prov["x"] = torch.cat([p[3].reshape(-1) for p in parts]).numpy()
            prov["norm"] = torch.cat([p[4].reshape(-1) for p in parts]).numpy()
        else:
            vectors, prov = np.zeros((0, d), np.float16), np.empty(0, PROVENANCE)
        arrays[name] = (vectors, prov)
        n = len(vectors)
    record = {"shard": shard, "images": [start, end], "vectors": n, "per_image": per_image,
              "skipped": sorted(state["skipped"])}
    write_shard(out, shard, arrays, record)
    return record
