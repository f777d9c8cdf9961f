"""What an SAE trains on: a harvested layer or a bring-your-own ``.npy`` of vectors, checked before
anything runs, and the held-out slice that gives the final FVU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers.config import TrainConfig
from helpers.data.store import ActivationStore, StoreError

FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def open_source(cfg: TrainConfig) -> tuple[list[np.ndarray], dict]:
    """The arrays to train on and what is known about them (layer, branch slices, weights)."""
    if (cfg.run is None) == (cfg.vectors is None):
        raise ValueError("give either --run DIR --layer NAME (a harvest) or --vectors FILE.npy, not both or neither")
    if cfg.run is not None:
        if cfg.layer is None:
            raise ValueError("--run needs --layer (e.g. --layer mixed4c)")
        store = ActivationStore(cfg.run, cfg.layer)
        return store.vector_arrays(), {"layer": cfg.layer, "branch_slices": store.branch_slices,
                                       "weights_id": store.weights_id, "source": str(Path(cfg.run).resolve()),
                                       "input_scale": store.manifest.input_scale,
                                       "identity": f"harvest {store.manifest.identity_hash()}"}
    path = Path(cfg.vectors)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise StoreError(f"cannot read {path} as an .npy array ({type(e).__name__}: {e}); --vectors takes one array "
                         "saved with numpy.save, of shape [N, d]") from e
    if not isinstance(array, np.ndarray):  # an .npz archive, whatever its name
        array.close()
        raise StoreError(f"{path} is an .npz archive of several arrays, not one .npy array; save the vectors "
                         "with numpy.save(path, vectors) (shape [N, d])")
    if array.ndim != 2 or array.dtype.kind != "f" or 0 in array.shape:
        raise StoreError(f"{path} holds a {array.dtype} array of shape {array.shape}; --vectors needs float "
                         "vectors of shape [N, d], N and d at least 1")
    if array.dtype.newbyteorder("=") not in FLOATS or not array.dtype.isnative:
        raise StoreError(f"{path} holds {array.dtype.str} numbers ({array.dtype}); --vectors reads float16, float32 or "
                         "float64 in this machine's byte order: save them with numpy.save(path, vectors.astype('float32'))")
    info = {"layer": cfg.layer, "branch_slices": None, "weights_id": None, "source": str(path.resolve()),
            "input_scale": None,  # a bare .npy says nothing of how its vectors were made
            "identity": f"npy {array.dtype.str} {list(array.shape)} {path.stat().st_size} bytes"}
    if cfg.layer is not None:
        from helpers.data.inception import architecture_slices, layer_width

        slices = architecture_slices(cfg.layer)
        if layer_width(slices) != array.shape[1]:
            raise StoreError(f"{path} has vectors of width {array.shape[1]} but {cfg.layer} is "
                             f"{layer_width(slices)} wide; pass the matching --layer or none")
        info["branch_slices"] = slices
    return [array], info


MIN_HOLDOUT = 32  # fewer held-out vectors give an FVU that means nothing (one vector has no variance)


def split_holdout(arrays: list[np.ndarray], holdout: int):
    """(training arrays, held-out vectors): the last ``holdout`` vectors, at most a tenth of them all."""
    total = sum(len(a) for a in arrays)
    last = arrays[-1]
    n = min(holdout, total // 10, max(len(last) - 1, 0))
    if holdout and n < MIN_HOLDOUT:
        raise ValueError(f"only {n} of the {total} vectors can be held out for the final FVU (at most a tenth, "
                         f"from the last shard), fewer than {MIN_HOLDOUT}: harvest more vectors, or pass "
                         "--holdout 0 to skip the held-out evaluation")
    return arrays[:-1] + [last[: len(last) - n]], last[len(last) - n:]
