"""The on-disk activation store a harvest writes: shards, their records, the manifest, and checks.

(Training reads it through ``batches``: shuffled, resumable streams of its rows.)

Layout of a run directory::

    manifest.json                      what produced the store (model, weights, layers,
                                       branch slices, sampling, seed, images and labels)
    shards/000123.json                 the commit record of shard 123: its image range,
                                       vectors per layer and skipped files
    mixed4c/000123.vectors.npy         float16 [n, d]: the harvested activation vectors
    mixed4c/000123.provenance.npy      [n] (image, y, x, norm) of each vector
    harvest.jsonl                      one progress record per finished shard

A shard counts only once its record exists; the record is written last, atomically, so a
crash or a full disk never leaves a partial shard that looks complete. The record carries the
identity of the configuration that made the shard and each file's length and SHA-256:
opening a store checks every shard against the manifest, the record and the files' lengths
(``check_shard``; a damaged or foreign shard is refused, and a rerun of the harvest redoes
it), and ``verify`` (``python -m helpers verify --run DIR``) checks the checksums too.
Arrays are plain ``.npy`` files, memory-mapped on reading: nothing loads a whole store into
memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from helpers.files import MANIFEST, read_json, sha256_file, write_json, write_npy

PROVENANCE = np.dtype([("image", "<i4"), ("y", "<i2"), ("x", "<i2"), ("norm", "<f4")])


class StoreError(RuntimeError):
    """The run directory is missing, unreadable or does not hold what was asked for."""


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


def shard_record_path(run: Path, shard: int) -> Path:
    return Path(run) / "shards" / f"{shard_name(shard)}.json"


def finished_shards(run: Path) -> list[int]:
    folder = Path(run) / "shards"
    return sorted(int(p.stem) for p in folder.glob("[0-9]*.json")) if folder.is_dir() else []


def read_shard_record(run: Path, shard: int) -> dict:
    return read_json(shard_record_path(run, shard))


def shard_file(run: Path, layer: str, shard: int, kind: str) -> Path:
    """``kind``: "vectors" or "provenance"."""
    return Path(run) / layer / f"{shard_name(shard)}.{kind}.npy"


def write_shard(run: Path, shard: int, arrays: dict[str, tuple[np.ndarray, np.ndarray]], record: dict) -> dict:
    """Write every layer's (vectors, provenance) for a shard, then its record (the commit), which
    lists each file's rows, bytes and SHA-256; returns the record."""
    files = {}
    for layer, (vectors, provenance) in arrays.items():
        for kind, array in (("vectors", vectors), ("provenance", provenance)):
            path = shard_file(run, layer, shard, kind)
            files[f"{layer}/{path.name}"] = {"rows": len(array), **write_npy(path, array)}
    record = {**record, "files": files}
    write_json(shard_record_path(run, shard), record)
    return record


VECTORS_DTYPE = np.dtype("<f2")  # a store's vectors: float16, little-endian


def _npy_header(path: Path) -> tuple[int, int | None, np.dtype]:
    """The row count, width and dtype of an .npy file from its header (the data is not read)."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return (shape[0] if shape else 0), (shape[1] if len(shape) > 1 else None), dtype


def _file_problem(file: Path, expected: dict | None, rows: int, width: tuple[str, int] | None,
                  checksums: bool, dtype: np.dtype) -> str | None:
    """What is wrong with one file of a shard against its record's entry (None: nothing)."""
    if expected is None or not file.is_file():
        return "is missing"
    size = file.stat().st_size
    if size != expected["bytes"]:
        return f"has {size} bytes, its record says {expected['bytes']} (truncated or replaced)"
    if not isinstance(expected, dict) or not all(isinstance(expected.get(k), t) for k, t in
                                                  (("bytes", int), ("rows", int), ("sha256", str))):
        return "has a damaged entry in its shard's commit record"
    try:
        found, found_width, found_dtype = _npy_header(file)
    except (OSError, ValueError, SyntaxError) as e:
        return f"is not a readable .npy ({e})"
    if found_dtype != dtype:
        return f"holds {found_dtype} numbers, the store holds {dtype} (its header was changed)"
    if found != expected["rows"] or found != rows:
        return f"has {found} rows, its record says {rows}"
    if width is not None and found_width != width[1]:
        return f"is {found_width} wide, {width[0]} is {width[1]}"
    if checksums and sha256_file(file) != expected["sha256"]:
        return "differs from its checksum (corrupted)"
    return None


def check_shard(run: Path, manifest: "Manifest", shard: int, layers=None,
                checksums: bool = False) -> tuple[dict | None, list[str]]:
    """(the shard's commit record, what is wrong with the shard): problems are a record missing or made
    under another configuration, a file missing or of another length, row count or width than its record
    and the manifest say, or (with ``checksums``) a file whose SHA-256 differs from the record's."""
    path = shard_record_path(run, shard)
    if not path.is_file():
        return None, [f"shard {shard}: no commit record ({path.name} missing: never finished, or deleted)"]
    try:
        record = read_json(path)
    except ValueError as e:
        return None, [f"shard {shard}: unreadable commit record {path} ({e})"]
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict) \
            or not isinstance(record.get("vectors"), int):
        return None, [f"shard {shard}: damaged commit record {path} (not this package's record of a shard)"]
    if record.get("identity") != manifest.identity_hash():
        return record, [f"shard {shard}: made under another configuration than {MANIFEST} describes "
                        "(or by an older version of this package)"]
    problems = []
    for layer in layers or manifest.layers:
        for kind in ("vectors", "provenance"):
            file = shard_file(run, layer, shard, kind)
            expected = record.get("files", {}).get(f"{layer}/{file.name}")
            width = (layer, manifest.widths[layer]) if kind == "vectors" else None
            dtype = VECTORS_DTYPE if kind == "vectors" else PROVENANCE
            problem = _file_problem(file, expected, record["vectors"], width, checksums, dtype)
            if problem:
                problems.append(f"shard {shard}: {file.relative_to(run)} {problem}")
    return record, problems


def verify(run: str | Path, checksums: bool = True) -> list[str]:
    """Every problem of a harvest's store (all shards, all layers, checksums included), or []."""
    manifest = read_manifest(run)
    problems = [p for k in range(manifest.n_shards) for p in check_shard(Path(run), manifest, k,
                                                                           checksums=checksums)[1]]
    return problems if manifest.complete or not problems else \
        [f"the harvest is not finished ({manifest.n_shards} shards planned)"] + problems


@dataclass(frozen=True)
class Manifest:
    """What a harvest's store holds and what made it (``manifest.json``), as saev's ``Metadata``:
    written when the harvest starts, completed when its last shard is committed, read by every
    later step. ``identity()`` is what a resumed harvest must agree on."""

    weights_id: str
    input: str  # the image convention and decoder
    layers: tuple[str, ...]
    widths: dict[str, int]
    branch_slices: dict[str, dict[str, tuple[int, int]]]
    grid: dict[str, list[int]]  # [H, W] per layer
    per_image: int
    sampling: str
    seed: int
    shard_images: int
    n_shards: int
    images: dict  # paths, labels, classes, source (images.ImageList.to_record)
    images_sha256: str
    config: dict  # the HarvestConfig, as given
    model: str = "InceptionV1 (Lucid inception5h via Lucent)"
    input_scale: str = "lucent"  # inception.INPUT_SCALES; part of the identity through ``input``
    random_weights: bool = False
    warning: str | None = None
    helpers_version: str = ""
    kind: str = "harvest"
    started: str = ""
    complete: bool = False
    finished: str | None = None
    vectors: int | None = None
    skipped: tuple = ()  # [image index, path, error] of each unreadable file

    IDENTITY: ClassVar[tuple[str, ...]] = ("layers", "per_image", "sampling", "weights_id", "seed", "shard_images",
                                           "images_sha256", "input")

    def identity(self) -> dict:
        """The settings that define the store's content, as JSON values."""
        return json.loads(json.dumps({k: getattr(self, k) for k in self.IDENTITY}))

    def identity_hash(self) -> str:
        """A short hash of ``identity()``, written into every shard's commit record."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def differs_from(self, other: "Manifest") -> list[str]:
        """The identity settings on which two manifests disagree."""
        mine, theirs = self.identity(), other.identity()
        return [k for k in self.IDENTITY if mine[k] != theirs[k]]

    @property
    def n_images(self) -> int:
        return len(self.images["paths"])

    @classmethod
    def load(cls, run: str | Path) -> "Manifest":
        path = Path(run) / MANIFEST
        if not path.is_file():
            raise StoreError(f"{run} has no {MANIFEST}, so it is not a harvest run directory; "
                             "make one with `python -m helpers harvest --out DIR ...`")
        try:
            data = read_json(path)
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__}, not an object")
            known = {f.name for f in dataclasses.fields(cls)}
            data = {k: v for k, v in data.items() if k in known}
            data["layers"] = tuple(data["layers"])
            data["skipped"] = tuple(tuple(s) for s in data.get("skipped", ()))
            data["branch_slices"] = {layer: {b: tuple(s) for b, s in sl.items()}
                                     for layer, sl in data["branch_slices"].items()}
            manifest = cls(**data)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(f"{path} is not a readable harvest manifest ({type(e).__name__}: {e}); "
                             "rerun the harvest into a fresh --out") from e
        planned = -(-manifest.n_images // manifest.shard_images) if manifest.shard_images > 0 else None
        if manifest.n_shards != planned:
            raise StoreError(f"{path} says {manifest.n_shards} shards, but its {manifest.n_images} images make "
                             f"{planned} of {manifest.shard_images} images (the manifest was edited or damaged); "
                             "rerun the harvest into a fresh --out")
        return manifest

    def save(self, run: str | Path) -> None:
        write_json(Path(run) / MANIFEST, dataclasses.asdict(self))


def read_manifest(run: str | Path) -> Manifest:
    return Manifest.load(run)


class ActivationStore:
    """The vectors of one layer of a harvest run, shard by shard, memory-mapped.

    >>> store = ActivationStore("runs/smoke/harvest", "mixed4c")
    >>> store.d, len(store)           # width, number of vectors
    >>> store.vectors(0)[:5]          # float16 memmap [n, d] of shard 0
    >>> store.provenance(0)["image"]  # which image each vector came from
    """

    def __init__(self, run: str | Path, layer: str, *, allow_partial: bool = False):
        self.run = Path(run)
        self.manifest = read_manifest(self.run)
        layers = self.manifest.layers
        if layer not in layers:
            raise StoreError(f"layer {layer!r} was not harvested in {self.run}; it holds {', '.join(layers)}")
        if not self.manifest.complete and not allow_partial:
            raise StoreError(
                f"the harvest in {self.run} is not finished; run the same harvest command again to "
                "complete it (it resumes), or pass allow_partial=True to read the finished shards"
            )
        self.layer = layer
        checked = {k: check_shard(self.run, self.manifest, k, [layer]) for k in range(self.manifest.n_shards)}
        bad = [p for k, (record, problems) in checked.items() for p in problems
               if not (allow_partial and not shard_record_path(self.run, k).exists())]
        if bad:
            raise StoreError(
                f"the store in {self.run} is damaged ({len(bad)} problem{'s' * (len(bad) > 1)}):\n  "
                + "\n  ".join(bad[:10]) + ("\n  ..." if len(bad) > 10 else "")
                + "\nRepair it by running the same harvest command again (same --out): it redoes exactly the "
                "missing and damaged shards and keeps the rest")
        self.records = {k: record for k, (record, problems) in checked.items() if not problems}
        self.shards = sorted(self.records)
        self.d = int(self.manifest.widths[layer])
        self.branch_slices = dict(self.manifest.branch_slices[layer])
        self.weights_id = self.manifest.weights_id

    def __len__(self) -> int:
        return sum(r["vectors"] for r in self.records.values())

    def _path(self, shard: int, kind: str) -> Path:
        return self.run / self.layer / f"{shard_name(shard)}.{kind}.npy"

    def _open(self, shard: int, kind: str) -> np.ndarray:
        path = self._path(shard, kind)
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read {path} ({e}); delete {shard_record_path(self.run, shard)} "
                             "and rerun the harvest to rewrite that shard") from e

    def vectors(self, shard: int) -> np.ndarray:
        """float16 memmap [n, d]."""
        return self._open(shard, "vectors")

    def provenance(self, shard: int) -> np.ndarray:
        """Structured memmap [n] with fields image, y, x, norm."""
        return self._open(shard, "provenance")

    def vector_arrays(self) -> list[np.ndarray]:
        return [self.vectors(k) for k in self.shards]

    def load(self, max_vectors: int | None = None) -> np.ndarray:
        """The first ``max_vectors`` vectors (all by default) as one float16 array."""
        out, n = [], 0
        for k in self.shards:
            if max_vectors is not None and n >= max_vectors:
                break
            v = self.vectors(k)
            take = v if max_vectors is None else v[: max_vectors - n]
            out.append(np.asarray(take))
            n += len(take)
        return np.concatenate(out) if out else np.zeros((0, self.d), np.float16)

    def load_provenance(self) -> np.ndarray:
        return np.concatenate([np.asarray(self.provenance(k)) for k in self.shards])


def summary(run: str | Path) -> list[dict]:
    """Per layer: width, vectors, images used and skipped, for a finished harvest."""
    m = read_manifest(run)
    return [{"layer": layer, "width": m.widths[layer], "vectors": len(ActivationStore(run, layer)),
             "images": m.n_images - len(m.skipped), "skipped": len(m.skipped),
             "per image": m.per_image, "sampling": m.sampling} for layer in m.layers]


def norms_by_layer(run: str | Path) -> dict[str, np.ndarray]:
    return {layer: ActivationStore(run, layer).load_provenance()["norm"] for layer in read_manifest(run).layers}


def main(argv=None) -> int:
    """``python -m helpers verify --run DIR``: check every shard of a harvest, checksums included."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m helpers verify", description=main.__doc__.split(":")[1].strip())
    parser.add_argument("--run", required=True, help="harvest run directory")
    args = parser.parse_args(argv)
    try:
        problems = verify(args.run)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if problems:
        print(f"{args.run}: {len(problems)} problems\n  " + "\n  ".join(problems) + "\nrun the same harvest command "
              "again (same --out) to redo the damaged shards", file=sys.stderr)
        return 1
    manifest = read_manifest(args.run)
    print(f"{args.run}: all {manifest.n_shards} shards of {len(manifest.layers)} layers match their records and checksums")
    return 0
