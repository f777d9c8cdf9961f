# GENERATED from nbs/06_umap.ipynb by `python -m helpers export`: edit the chapter, not this file
# (tests/test_export.py fails when the two differ).
"""UMAP maps of a layer's decoder vectors, the paper's figures 3 and 4 (chapter 06)."""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def cosine_knn(queries: np.ndarray, points: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by cosine distance: (indices [m, k], distances [m, k]).

    Defined in chapter 06, *UMAP of decoder vectors* (nbs/06_umap.ipynb).
    """
    q = F.normalize(torch.as_tensor(queries, dtype=torch.float32), dim=1)
    p = F.normalize(torch.as_tensor(points, dtype=torch.float32), dim=1)
    idx, dist = [], []
    for s in range(0, len(q), chunk):
        v, i = (q[s:s + chunk] @ p.T).topk(k, dim=1)
        idx.append(i)
        dist.append((1 - v).clamp_min(0))
    return torch.cat(idx).numpy(), torch.cat(dist).numpy()


@dataclass
class Embedding:
    """A fitted map: ``coords`` [n, 2] of the fitted ``vectors`` [n, d] (dead ones, ``live`` False, at the origin).

    Defined in chapter 06, *UMAP of decoder vectors* (nbs/06_umap.ipynb).
    """

    coords: np.ndarray
    vectors: np.ndarray
    live: np.ndarray
    n_neighbors: int

    def transform(self, vectors) -> np.ndarray:
        """Place new vectors [m, d] on this map (weighted mean of their fitted neighbours)."""
        live = np.flatnonzero(self.live)
        idx, dist = cosine_knn(np.asarray(vectors, np.float32), self.vectors[live], self.n_neighbors)
        weights = np.exp(-(dist - dist[:, :1]) / (dist.std(axis=1, keepdims=True) + 1e-6))
        weights /= weights.sum(axis=1, keepdims=True)
        return (weights[..., None] * self.coords[live][idx]).sum(axis=1)


def umap_embedding(decoder, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0) -> Embedding:
    """Fit a 2-D UMAP (cosine metric, exact neighbours, fixed seed) on decoder vectors [n, d].

    Defined in chapter 06, *UMAP of decoder vectors* (nbs/06_umap.ipynb).
    """
    import umap

    from helpers.numba_threads import cache_umap_kernels

    cache_umap_kernels()  # speed only: UMAP's compiled kernels kept on disk, not compiled again in each notebook
    d = np.asarray(decoder.detach().cpu() if hasattr(decoder, "detach") else decoder, np.float32)
    live = np.linalg.norm(d, axis=1) > 0
    k = min(n_neighbors, int(live.sum()) - 1)
    if k < 2:
        raise ValueError(f"UMAP needs at least 3 live decoder vectors; got {int(live.sum())}")
    knn_idx, knn_dist = cosine_knn(d[live], d[live], k)
    reducer = umap.UMAP(n_components=2, n_neighbors=k, min_dist=min_dist, metric="cosine", random_state=seed,
                        precomputed_knn=(knn_idx, knn_dist, None))
    coords = np.zeros((len(d), 2), np.float32)
    with warnings.catch_warnings():  # no search index, by design: ``transform`` places new points itself
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        coords[live] = reducer.fit_transform(d[live])
    return Embedding(coords, d, live, k)
