"""Atomic writes and machine-readable records.

Every artifact is written to a temporary file next to its destination and renamed into
place, so a crash or a full disk never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


# Every on-disk name, once (as SAELens' constants.py): an SAE directory, a training run, a harvest.
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"  # SAELens' layout
CHECKPOINT, METRICS, TRAIN_RECORD = "checkpoint.safetensors", "metrics.jsonl", "train.json"
MANIFEST, HARVEST_LOG = "manifest.json", "harvest.jsonl"
FEATURE_STATS, EXAMPLES = "feature_stats.safetensors", "examples.safetensors"
SPLICED = "spliced.json"  # beside an SAE: chapter 03's spliced-in evaluation of it
ABSORPTION = "absorption.json"  # beside an SAE: chapter 03's feature absorption along the class hierarchy
PROBING = "probing.json"  # beside an SAE: chapter 03's sparse probing of its features
COHERENCE = "coherence.json"  # beside an SAE: chapter 03's spatial coherence (Moran's I) of its features
EXAMPLES_CHECKPOINT = "examples.partial.safetensors"  # in the run directory: an interrupted example pass

_UMASK = os.umask(0)
os.umask(_UMASK)


class DiskFullError(OSError):
    """Raised when a write fails for lack of space; nothing partial is left behind."""


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(fileobj)`` on a temporary file, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; give it the usual mode
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                e.errno,
                f"disk full while writing {path}: free some space (or choose another --out) "
                "and run the same command again; finished work is kept and resumes",
            ) from e
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n"
    return atomic_write(path, lambda f: f.write(text), mode="w")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


class _Stream:
    """A file seen only through ``write`` (numpy then writes arrays in chunks with ``write``, whose
    failures carry their errno, instead of ``tofile``, whose OSError on a full disk has none),
    hashing what goes through."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += memoryview(data).nbytes
        return self.f.write(data)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> dict:
    """Write ``array`` as .npy atomically; returns its ``{"sha256", "bytes"}`` for a commit record."""
    streams = []

    def save(f):
        streams.append(_Stream(f))
        np.save(streams[-1], array, allow_pickle=False)

    atomic_write(path, save)
    return {"sha256": streams[-1].sha256.hexdigest(), "bytes": streams[-1].bytes}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str):
    """Hold an exclusive lock on ``path`` (created if missing) while the block runs; if another
    process holds it, stop at once with a ``LockedError`` naming ``what`` and the lock file."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            import time

            holder = ""
            for _ in range(20):  # the holder writes its pid just after it takes the lock: give it a moment
                f.seek(0)
                holder = f.read().strip()
                if holder:
                    break
                time.sleep(0.05)
            holder = holder or "another process"
            raise LockedError(f"{what} is in use by {holder} (lock {path}); wait for it to finish, "
                              "or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class LockedError(RuntimeError):
    """Another process holds the lock of a run directory."""


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (a record of progress). Appends are line-atomic for small lines."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=_jsonable) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, slice):
        return [obj.start, obj.stop]
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
