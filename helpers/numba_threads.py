"""Numba, where it is installed (it comes with umap-learn), and the one way into its parallel regions: Numba's
fallback thread pool (workqueue) must not be entered from two threads at once, so every kernel with ``prange``
(the screened TopK's, the local response norm's, feature visualisation's max pool, the attribution's pool tangent,
the SAE's weight-gradient scatter) runs inside ``numba_region()``, which holds this process's one lock and gives
Numba as many threads as torch has."""

from __future__ import annotations

import contextlib
import threading

try:
    import numba
except ImportError:  # pragma: no cover - numba comes with umap-learn
    numba = None

_ONE_AT_A_TIME = threading.Lock()


@contextlib.contextmanager
def numba_region():
    """Hold the lock every Numba parallel call of this package takes; inside, Numba uses torch's thread count."""
    import torch

    with _ONE_AT_A_TIME:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        yield


def cache_umap_kernels() -> None:
    """Keep umap-learn's compilations of the kernels a fit runs on disk, as ``cache=True`` would (umap-learn
    leaves them uncached: about 4 s of compiling in every process that fits a map, each notebook's kernel
    included). The compiled code is Numba's own, so the maps are the same."""
    if numba is None:  # pragma: no cover - numba comes with umap-learn
        return
    from umap import layouts, umap_

    for module, name in ((umap_, "smooth_knn_dist"), (umap_, "compute_membership_strengths"),
                         (layouts, "_nb_optimize_layout_euclidean_single_epoch")):
        kernel = getattr(module, name, None)  # another umap-learn version may name them otherwise: compiled per process
        if hasattr(kernel, "enable_caching") and type(kernel._cache).__name__ == "NullCache":
            kernel.enable_caching()
