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

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from helpers import __version__
from helpers.allocator import reuse_freed_memory
from helpers.config import HarvestConfig
from helpers.files import HARVEST_LOG, MANIFEST, append_jsonl, exclusive_lock
from helpers.data.images import ImageDataset, collate, decode_on_device, list_images
from helpers.data.kept import KeptWriter, paths_sha256
from helpers.data.inception import (RANDOM_WARNING, LayerCapture, branch_slices, check_layers, is_random, layer_width, load_model,
                        model_input_from_uint8)
from helpers.progress import progress
from helpers.data.sampling import select_positions
from helpers.data.store import (PROVENANCE, Manifest, StoreError, check_shard, read_manifest, read_shard_record,
                    shard_record_path, write_shard)

log = logging.getLogger(__name__)
LOCK = ".harvest.lock"
# the manifest's description of the input, by input_scale (inception.INPUT_SCALES)
INPUT = {"lucent": "Resize(256) CenterCrop(224), RGB in [0,1] -> x*255-117",
         "unit": "Resize(256) CenterCrop(224), RGB in [0,1] as is (the author's convention)"}


def _uniforms(seed: int, shard: int, layer: str, n_images: int, per_image: int) -> torch.Tensor:
    key = int.from_bytes(hashlib.sha256(f"{seed}/{shard}/{layer}".encode()).digest()[:8], "little")
    return torch.rand(n_images, per_image, generator=torch.Generator().manual_seed(key))


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


def _open_run(out: Path, manifest: Manifest) -> Manifest:
    """Write the manifest of a new run, or check it against the one already there (a resume)."""
    if (out / MANIFEST).exists():
        old = read_manifest(out)
        differ = manifest.differs_from(old)
        if differ:
            raise StoreError(
                f"{out} already holds a harvest made with other settings ({', '.join(differ)} differ); "
                "choose another --out, or delete that directory to start over"
            )
        manifest = dataclasses.replace(manifest, started=old.started)
    manifest.save(out)
    return manifest


@reuse_freed_memory()
def harvest(cfg: HarvestConfig, model: torch.nn.Module | None = None) -> Path:
    """Run (or resume) a harvest; returns the run directory. The steps: build the model and the
    manifest, open (or reopen) the run, then for each batch of images forward, select positions
    and buffer them per shard, committing each shard when its last image is in; then finish.

    ``model``: an already built InceptionV1 to use instead of ``cfg.weights`` (a modified or
    instrumented one); its ``weights_id`` attribute names it in the manifest.
    """
    from helpers import distributed

    layers = cfg.layers  # checked and put in network order when the config was made
    cfg = bounded_shards(cfg)
    rank, ranks, device = distributed.setup(cfg.device)
    images = list_images(cfg.images).head(cfg.max_images)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder for the harvest's store")
    new = not out.exists()
    # the lock first: a second harvest into a busy folder stops at once, not after loading the model
    with exclusive_lock(out / LOCK, f"the harvest directory {out}") if rank == 0 else contextlib.nullcontext():
        try:
            model, capture, manifest, weights_id, use_amp = _prepare(cfg, model, images, layers, device)
        except BaseException:  # a setting only the model can check: leave no folder behind that was not there
            if new and rank == 0 and [p.name for p in out.iterdir()] == [LOCK]:
                (out / LOCK).unlink()
                out.rmdir()
            raise
        if rank == 0:
            for stale in [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")]:  # a write a kill cut short: never a result
                stale.unlink()
            manifest = _open_run(out, manifest)
        distributed.barrier()
        if is_random(weights_id):
            log.warning("harvest %s: %s", out, RANDOM_WARNING)
        _harvest_shards(cfg, out, manifest, images, capture, device, use_amp, rank, ranks)
        distributed.barrier()
        if rank == 0:
            _finish(out, manifest)
    return out


SHARD_BYTES = 256 * 2**20  # what a shard's buffer may hold before it is written (it is copied once more then)


def bounded_shards(cfg: HarvestConfig) -> HarvestConfig:
    """``cfg`` with at most as many images per shard as keep a shard's buffer within ``SHARD_BYTES`` (float16
    vectors and their provenance, every layer): 1,000 images at 196 positions once held 5 GiB."""
    from helpers.data.inception import architecture_slices, layer_width

    per_image = cfg.per_image * sum(2 * layer_width(architecture_slices(layer)) + 28 for layer in cfg.layers)
    limit = max(1, SHARD_BYTES // per_image)
    if cfg.shard_images <= limit:
        return cfg
    log.info("harvest: %d images per shard instead of %d, to keep a shard's buffer within %d MiB",
             limit, cfg.shard_images, SHARD_BYTES >> 20)
    return dataclasses.replace(cfg, shard_images=limit)


def _prepare(cfg: HarvestConfig, model, images, layers, device):
    """The network (built, or ``model`` moved to ``device``), its capture of ``layers``, the manifest this harvest
    will write, with the settings only the model can check checked (nothing is written yet)."""
    if model is None:
        model, weights_id = load_model(cfg.weights, device, seed=cfg.seed)
    else:
        model, weights_id = model.to(device).eval(), getattr(model, "weights_id", "custom model")
    use_amp = cfg.amp and device.type == "cuda"
    if use_amp:
        model = model.to(memory_format=torch.channels_last)
    capture = LayerCapture(model, layers)
    manifest = _manifest(cfg, images, weights_id, branch_slices(model, layers), capture, device)
    _check_settings(cfg, manifest)
    return model, capture, manifest, weights_id, use_amp


def _check_settings(cfg: HarvestConfig, manifest: Manifest) -> None:
    """Settings that only the model can check (positions per image against each layer's grid), by
    selecting positions once on an empty layer of each grid: the selection's own checks."""
    for h, w in manifest.grid.values():
        select_positions(torch.zeros(1, 1, h, w), cfg.per_image, cfg.sampling, torch.zeros(1, cfg.per_image))


def _harvest_shards(cfg, out: Path, manifest: Manifest, images, capture, device, use_amp, rank, ranks) -> None:
    """This rank's shards that are not finished (or are damaged, their bytes included, or were made under
    another configuration: those are redone), batch by batch, each committed when its last image is in."""
    n_images, n_shards = len(images), manifest.n_shards
    shard_len = lambda k: min((k + 1) * cfg.shard_images, n_images) - k * cfg.shard_images
    mine = [k for k in range(n_shards) if k % ranks == rank]  # under torchrun, shards by rank
    done = set()
    for k in mine:  # checksums included: a rerun repairs whatever `verify` reports
        _, problems = check_shard(out, manifest, k, checksums=True)
        if not problems:
            done.add(k)
        elif shard_record_path(out, k).exists():
            log.warning("harvest %s: redoing %s", out, "; ".join(problems))
            shard_record_path(out, k).unlink()
    todo = [k for k in mine if k not in done]
    loader = DataLoader(ImageDataset(images, encoded=cfg.decode == "device"),
                        batch_sampler=_ShardBatches(todo, cfg.shard_images, n_images, cfg.batch_size),
                        collate_fn=collate, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    bar = progress(total=sum(map(shard_len, mine)), initial=sum(map(shard_len, done)), unit="img",
               desc=f"harvest {out.name}" + (f" rank {rank}" if ranks > 1 else ""))
    kept = _kept_writer(cfg, out, capture.model, manifest, sum(map(shard_len, todo)), use_amp) if todo else None
    pending: dict[int, _ShardBuffer] = {}
    with kept or contextlib.nullcontext():
        for idx, pixels, bad in loader:
            if isinstance(pixels, list):  # JPEG bytes: decode on the device
                keep, pixels, errors = decode_on_device(pixels, device)
                bad = bad + [(int(idx[j]), err) for j, err in errors]
                idx = idx[keep]
            shard = (int(idx[0]) if len(idx) else bad[0][0]) // cfg.shard_images
            buffer = pending.setdefault(shard, _ShardBuffer(shard, shard * cfg.shard_images, shard_len(shard),
                                                            _shard_uniforms(cfg, shard, manifest.layers)))
            buffer.skipped += [[i, str(images.paths[i]), err] for i, err in bad]
            buffer.seen += len(idx) + len(bad)
            if len(idx):
                _harvest_batch(capture, pixels, idx - buffer.first_image, cfg, device, use_amp, buffer)
            if kept is not None:
                kept = _keep(kept, buffer, idx - buffer.first_image)
            bar.update(len(idx) + len(bad))
            if buffer.complete:
                record = _commit_shard(out, pending.pop(shard), manifest, cfg.per_image)
                append_jsonl(out / HARVEST_LOG, record)
    bar.close()


def _kept_writer(cfg, out: Path, model, manifest: Manifest, n_images: int, use_amp: bool) -> KeptWriter | None:
    """Where ``cfg.keep_input_of`` asks for it and the pass computes what the example pass computes (float32,
    images decoded by PIL), the writer of the kept layer input; else None (said why)."""
    if cfg.keep_input_of is None:
        return None
    if use_amp or cfg.decode != "workers":
        log.warning("harvest %s: not keeping %s's input: under %s it is not the float32 tensor of PIL-decoded images "
                    "the example pass computes", out, cfg.keep_input_of, "bf16 autocast" if use_amp else "--decode device")
        return None
    return KeptWriter.open(out, model, cfg.keep_input_of, manifest, n_images)


def _keep(kept: KeptWriter, buffer: "_ShardBuffer", rows: torch.Tensor) -> KeptWriter | None:
    """The batch's layer inputs appended to its shard's kept file (committed with the shard's last images); on a
    full disk the kept inputs are given up (None), and the harvest goes on."""
    try:
        if len(rows):
            kept.add(buffer.shard, buffer.n_images, rows)
        if buffer.complete:
            kept.commit(buffer.shard, buffer.n_images)
        return kept
    except OSError as e:
        kept.abandon(f"{type(e).__name__}: {e}")
        return None


def _manifest(cfg: HarvestConfig, images, weights_id: str, slices, capture, device) -> Manifest:
    """What the store will hold and what makes it: the record every later step reads."""
    with torch.no_grad():
        probe = capture(torch.zeros(1, 3, 224, 224, device=device))
    layers = tuple(probe)
    return Manifest(
        weights_id=weights_id,
        # decoders differ by up to one grey level, so the decoder is part of what the store is
        input=INPUT[cfg.input_scale] + ("" if cfg.decode == "workers" else f"; JPEGs decoded on {device.type} "
                                        "(torchvision decode_jpeg), tensor resize with antialiasing"),
        input_scale=cfg.input_scale, layers=layers, widths={name: layer_width(slices[name]) for name in layers},
        branch_slices=slices,
        grid={name: list(t.shape[2:]) for name, t in probe.items()},
        per_image=cfg.per_image, sampling=cfg.sampling, seed=cfg.seed, shard_images=cfg.shard_images,
        n_shards=math.ceil(len(images) / cfg.shard_images), images=images.to_record(),
        images_sha256=paths_sha256(images.paths), config=asdict(cfg),
        random_weights=is_random(weights_id), warning=RANDOM_WARNING if is_random(weights_id) else None,
        helpers_version=__version__, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _finish(out: Path, manifest: Manifest) -> None:
    """Mark the harvest complete once every shard is committed, with its totals and skipped files."""
    records = [read_shard_record(out, k) for k in range(manifest.n_shards)]
    manifest = dataclasses.replace(manifest, complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                   vectors=sum(r["vectors"] for r in records),
                                   skipped=tuple(tuple(s) for r in records for s in r["skipped"]))
    manifest.save(out)
    if manifest.skipped:
        log.warning("harvest %s: skipped %d unreadable files (listed in %s)", out, len(manifest.skipped), MANIFEST)


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


@dataclass
class _Kept:
    """One batch's kept positions in one layer: vectors [B, P, C] and, per vector, image, y, x, norm."""

    vectors: torch.Tensor
    image: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    norm: torch.Tensor


@dataclass
class _ShardBuffer:
    """A shard's kept positions per layer until its last image is in, then committed at once."""

    shard: int
    first_image: int
    n_images: int
    uniforms: dict[str, torch.Tensor | None]
    parts: dict[str, list[_Kept]] = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    seen: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def complete(self) -> bool:
        return self.seen == self.n_images

    def arrays(self, layer: str, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The layer's (vectors float16 [n, width], provenance [n]) in image order."""
        parts = self.parts.get(layer, [])
        if not parts:
            return np.zeros((0, width), np.float16), np.empty(0, PROVENANCE)
        vectors = torch.cat([p.vectors.reshape(-1, width) for p in parts]).numpy()
        prov = np.empty(len(vectors), PROVENANCE)
        for name in ("image", "y", "x", "norm"):
            prov[name] = torch.cat([getattr(p, name).reshape(-1) for p in parts]).numpy()
        return vectors, prov


def _harvest_batch(capture, pixels, rows, cfg, device, use_amp, buffer: _ShardBuffer) -> None:
    """Forward one batch, select positions in every layer, keep them in the shard's buffer."""
    x = model_input_from_uint8(pixels.to(device, non_blocking=True), cfg.input_scale)
    if use_amp:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        acts = capture(x)
    for name, a in acts.items():
        u = buffer.uniforms[name]
        vectors, pos, norms = select_positions(a, cfg.per_image, cfg.sampling, None if u is None else u[rows].to(device))
        w = a.shape[3]
        pos = pos.cpu()
        image = (rows + buffer.first_image)[:, None].expand_as(pos)
        buffer.parts.setdefault(name, []).append(_Kept(vectors.half().cpu(), image, pos // w, pos % w, norms.cpu()))


def _commit_shard(out, buffer: _ShardBuffer, manifest: Manifest, per_image: int) -> dict:
    """Write the shard's arrays, then its record (the commit); returns the progress record."""
    arrays = {name: buffer.arrays(name, manifest.widths[name]) for name in manifest.layers}
    record = {"shard": buffer.shard, "images": [buffer.first_image, buffer.first_image + buffer.n_images],
              "vectors": len(arrays[manifest.layers[-1]][0]), "per_image": per_image,
              "skipped": sorted(buffer.skipped), "identity": manifest.identity_hash()}
    write_shard(out, buffer.shard, arrays, record)
    return {**record, "seconds": round(time.perf_counter() - buffer.started, 3)}
