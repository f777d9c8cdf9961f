"""A layer's input kept by the harvest, so that a later pass over the same images runs only the layers from it on.

Chapter 04's dataset examples need every feature's activation at every grid position of every image: a second
pass of the network over the harvest's images. On a CPU the layers before mixed4a (the stem at 112 and 56 px,
mixed3a and mixed3b at 28 px) are about two thirds of that pass's arithmetic, and they compute the same tensor
the harvest computed already: mixed4a's input, the pooled mixed3b output (480 x 14 x 14 float32 numbers, 376 KB
an image). With ``HarvestConfig.keep_input_of`` the harvest writes that tensor beside its store, as the forward
pass made it; the example pass then starts there (``suffix.forward_from``) and gets the same numbers bit for bit
(tests/test_kept.py compares the two passes' results).

Layout, beside the store::

    kept-maxpool4/kept.json            what is kept: the layer, the tensor's name and shape, the images
    kept-maxpool4/000123.npy           float32 [images of shard 123, C, H, W], in image order (zeros for a
                                       file the harvest could not read)

A shard's file is written before the shard's commit record, atomically. Nothing depends on the files being
there: where one is missing or does not fit, or the disk has no room for them (checked before the harvest
writes any), the example pass runs the whole network, as without them. They are an accelerator of one pass,
deleted by the run once that pass is done (``KeptInputs.remove``).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from helpers.files import read_json, write_json
from helpers.data.folded import forward_tree
from helpers.data.inception import StopForward

log = logging.getLogger(__name__)
RECORD = "kept.json"
SPARE_BYTES = 2 << 30  # what the disk must keep free beyond the kept files (the store, the SAEs, the book)


@functools.lru_cache(maxsize=None)
def input_name(cls: type, layer: str) -> str:
    """The name ``cls.forward`` gives the tensor ``layer``'s branches read (mixed4a: ``maxpool4``, the pooled
    mixed3b): the argument of the layer's 1x1 convolution."""
    conv = f"{layer}_1x1_pre_relu_conv"
    for s in forward_tree(cls).body:
        call = s.value if isinstance(s, ast.Assign) else None
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == conv
                and len(call.args) == 1 and isinstance(call.args[0], ast.Name)):
            return call.args[0].id
    raise ValueError(f"{cls.__name__}.forward has no statement applying self.{conv} to a named tensor")


class InputWatch:
    """Within ``with``: ``watch.value`` is ``layer``'s input in the model's latest forward pass (a pre-hook on its
    1x1 convolution); with ``stop=True`` the pass stops there (nothing after it is computed)."""

    def __init__(self, model, layer: str, stop: bool = False):
        self.model, self.layer, self.stop, self.value = model, layer, stop, None

    def __enter__(self) -> "InputWatch":
        def hook(module, args):
            self.value = args[0]
            if self.stop:
                raise StopForward

        self.handle = getattr(self.model, f"{self.layer}_1x1_pre_relu_conv").register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s input on ``x`` (with ``stop=True``: the layers after it are not run)."""
        try:
            self.model(x)
        except StopForward:
            pass
        return self.value


def paths_sha256(paths) -> str:
    """The hash a harvest's manifest keeps of its images' paths (file names need not be UTF-8: undecodable bytes
    travel as surrogates and go back to bytes here)."""
    return hashlib.sha256("\n".join(str(p) for p in paths).encode("utf-8", "surrogateescape")).hexdigest()


class KeptWriter:
    """The harvest's side: each shard's rows appended in image order as its batches come, then committed. Within
    ``with``, it watches the model's passes for the layer's input (``InputWatch``); leaving on an exception discards
    the files of shards not committed (the interrupted harvest redoes them)."""

    def __init__(self, out: Path, model, layer: str, shape: tuple[int, ...], manifest):
        name = input_name(type(model), layer)
        self.folder, self.shape, self.watch = Path(out) / f"kept-{name}", tuple(shape), InputWatch(model, layer)
        self.files: dict[int, tuple] = {}  # shard -> (file, rows written, rows it holds)
        self.folder.mkdir(exist_ok=True)
        write_json(self.folder / RECORD, {"layer": layer, "name": name, "shape": list(shape), "dtype": "float32",
                                          "weights_id": manifest.weights_id, "input_scale": manifest.input_scale,
                                          "images_sha256": manifest.images_sha256})

    @classmethod
    def open(cls, out: Path, model, layer: str, manifest, images_to_do: int) -> "KeptWriter | None":
        """A writer, or None (with the reason logged) where the disk lacks the room for ``images_to_do`` images."""
        with torch.no_grad(), InputWatch(model, layer, stop=True) as watch:
            shape = tuple(watch.run(torch.zeros(1, 3, 224, 224, device=next(model.parameters()).device)).shape[1:])
        need, free = images_to_do * 4 * int(np.prod(shape)), shutil.disk_usage(out).free
        if need + SPARE_BYTES > free:
            log.warning("harvest %s: not keeping %s's input for the example pass: it needs %.1f GB and %.1f GB are "
                        "free (with %.0f GB to spare); that pass will run the whole network", out, layer, need / 1e9,
                        free / 1e9, SPARE_BYTES / 2**30)
            return None
        return cls(out, model, layer, shape, manifest)

    def __enter__(self) -> "KeptWriter":
        self.watch.__enter__()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.watch.__exit__()
        if exc_type is not None:
            self.discard_unfinished()

    def add(self, shard: int, n_rows: int, rows: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Rows ``rows`` (ascending, of the shard's ``n_rows``) of shard ``shard`` are ``values`` (None: the layer
        input of the model's latest pass); rows skipped before them (unreadable files) are zeros."""
        values = self.watch.value if values is None else values
        if shard not in self.files:
            f = open(self.folder / f".{shard:06d}.npy.tmp", "wb")
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                     "shape": (n_rows, *self.shape)})
            self.files[shard] = (f, 0, n_rows)
        f, written, n = self.files[shard]
        for row, value in zip(rows.tolist(), values.detach().float().cpu().contiguous()):
            written = self._zeros(f, written, row)
            f.write(memoryview(value.numpy()).cast("B"))
            written += 1
        self.files[shard] = (f, written, n)

    def _zeros(self, f, written: int, until: int) -> int:
        if until > written:
            f.write(bytes(4 * int(np.prod(self.shape)) * (until - written)))
        return max(written, until)

    def commit(self, shard: int, n_rows: int) -> None:
        """The shard's file complete (zeros for trailing skipped rows), synced and renamed into place."""
        if shard not in self.files:  # every image of the shard unreadable
            self.add(shard, n_rows, torch.empty(0, dtype=torch.long), torch.empty(0, *self.shape))
        f, written, n = self.files.pop(shard)
        self._zeros(f, written, n)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(self.folder / f".{shard:06d}.npy.tmp", self.folder / f"{shard:06d}.npy")

    def discard_unfinished(self) -> None:
        """Close and delete the files of shards not committed (the harvest was interrupted: they are redone)."""
        for shard, (f, _, _) in self.files.items():
            f.close()
            (self.folder / f".{shard:06d}.npy.tmp").unlink(missing_ok=True)
        self.files.clear()

    def abandon(self, why: str) -> None:
        """Stop keeping (a full disk): the folder is removed, the harvest goes on."""
        self.discard_unfinished()
        shutil.rmtree(self.folder, ignore_errors=True)
        log.warning("harvest: no longer keeping layer inputs for the example pass (%s); that pass will run the whole "
                    "network", why)


class KeptInputs:
    """The example pass's side: a finished harvest's kept input of ``layer``, batch by batch."""

    def __init__(self, folder: Path, record: dict, shards: list[np.ndarray], skipped: set[int]):
        self.folder, self.shards, self.skipped = folder, shards, skipped
        self.layer, self.name, self.input_scale = record["layer"], record["name"], record["input_scale"]
        self.images_sha256 = record["images_sha256"]
        self.starts = np.cumsum([0] + [len(s) for s in shards])

    @classmethod
    def find(cls, harvest_dir: Path, manifest) -> "KeptInputs | None":
        """The layer input a complete harvest kept (``HarvestConfig.keep_input_of``), or None (the reason logged at
        debug level) where it kept none or they do not fit its manifest: a file missing, of another shape, or of
        other weights or images."""
        layer = manifest.config.get("keep_input_of")
        folders = [p for p in Path(harvest_dir).glob("kept-*") if (p / RECORD).is_file()]
        record = next((r for r in (read_json(p / RECORD) for p in folders) if r.get("layer") == layer), None)
        why = None
        if not manifest.complete:
            why = "the harvest is not complete"
        elif record is None:
            why = f"no kept input of {layer}"
        elif (record["weights_id"], record["input_scale"], record["images_sha256"]) != (
                manifest.weights_id, manifest.input_scale, manifest.images_sha256):
            why = "kept from other weights, input scale or images"
        if why is not None:
            log.debug("%s: %s", harvest_dir, why)
            return None
        folder, shape = Path(harvest_dir) / f"kept-{record['name']}", tuple(record["shape"])
        shards = []
        for k in range(manifest.n_shards):
            rows = min((k + 1) * manifest.shard_images, manifest.n_images) - k * manifest.shard_images
            try:
                a = np.load(folder / f"{k:06d}.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                log.debug("%s: kept shard %d unreadable (%s)", harvest_dir, k, e)
                return None
            if a.shape != (rows, *shape) or a.dtype != np.float32:
                log.debug("%s: kept shard %d is %s %s", harvest_dir, k, a.dtype, a.shape)
                return None
            shards.append(a)
        return cls(folder, record, shards, {int(s[0]) for s in manifest.skipped})

    def rows(self, first: int, stop: int) -> torch.Tensor:
        """The kept tensors of images ``first`` to ``stop - 1``: [stop - first, C, H, W]."""
        parts, i = [], first
        while i < stop:
            k = int(np.searchsorted(self.starts, i, side="right")) - 1
            end = min(stop, int(self.starts[k + 1]))
            parts.append(np.asarray(self.shards[k][i - self.starts[k]:end - self.starts[k]]))
            i = end
        return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else np.array(parts[0]))

    def batches(self, start: int, n_images: int, batch_size: int):
        """``(indices, tensors or None)`` of images ``start``..``n_images - 1``, ``batch_size`` images a batch (the
        files the harvest could not read left out), as the example pass's loader gives its batches."""
        for s in range(start, n_images, batch_size):
            idx = torch.tensor([i for i in range(s, min(s + batch_size, n_images)) if i not in self.skipped],
                               dtype=torch.long)
            if not len(idx):
                yield idx, None
                continue
            x = self.rows(int(idx[0]), int(idx[-1]) + 1)
            yield idx, x[idx - idx[0]] if len(idx) < len(x) else x

    def remove(self) -> int:
        """Delete the kept files; the bytes freed (none where another pass over the same harvest deleted them first:
        this pass's maps of them stay readable until it ends)."""
        freed = 0
        for p in self.folder.glob("*"):  # nothing where the folder is gone
            with contextlib.suppress(FileNotFoundError):  # a file deleted meanwhile by that other pass
                freed += p.stat().st_size
        self.shards = []
        shutil.rmtree(self.folder, ignore_errors=True)
        return freed
