import numpy as np

from helpers.analysis.embed import umap_embedding


def test_clusters_of_directions_stay_together_and_new_vectors_land_with_their_cluster():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 64))
    labels = np.repeat(np.arange(3), 150)
    vectors = centres[labels] + 0.3 * rng.standard_normal((450, 64))
    vectors[0] = 0  # a dead feature
    emb = umap_embedding(vectors, seed=0)
    assert emb.coords.shape == (450, 2) and np.isfinite(emb.coords).all() and (emb.coords[0] == 0).all()
    live = np.arange(1, 450)
    xy = emb.coords[live]
    nearest = np.argsort(((xy[:, None] - xy[None]) ** 2).sum(-1), axis=1)[:, 1]
    assert (labels[live][nearest] == labels[live]).mean() > 0.95
    new = centres[[2, 0]] + 0.3 * rng.standard_normal((2, 64))
    placed = emb.transform(new)
    means = np.stack([xy[labels[live] == c].mean(0) for c in range(3)])
    assert [int(np.argmin(((means - p) ** 2).sum(1))) for p in placed] == [2, 0]
    again = umap_embedding(vectors, seed=0)
    np.testing.assert_allclose(again.coords, emb.coords, atol=1e-4)


def clustered(seed: int = 0, n: int = 150, d: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((3, d))[np.repeat(np.arange(3), n)] + 0.3 * rng.standard_normal((3 * n, d))).astype(
        np.float32)


def test_a_runs_map_is_fitted_once_and_kept_beside_its_sae_under_its_id(tmp_path, monkeypatch):
    """Chapter 06 fits two layers' maps and chapter 08's atlas all five, each in its own kernel: the run keeps each
    fit beside the SAE (under the id of its weights), so a later chapter reads it, and another SAE is fitted anew."""
    from types import SimpleNamespace

    import torch

    from helpers.files import WEIGHTS_FILE
    from helpers.run import artifacts

    vectors = clustered()
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / WEIGHTS_FILE).write_bytes(b"one SAE")
    stub = SimpleNamespace(decoder_directions=torch.from_numpy(vectors))

    def a_new_process():
        run = artifacts.open_run("smoke", run_dir=str(tmp_path / "run"))
        monkeypatch.setattr(run, "sae", lambda layer: stub)
        monkeypatch.setattr(run, "sae_dir", lambda layer: folder)
        return run

    first, direct = a_new_process().umap("mixed4c"), umap_embedding(vectors)
    np.testing.assert_allclose(first.coords, direct.coords, atol=1e-4)
    assert np.array_equal(first.vectors, direct.vectors) and np.array_equal(first.live, direct.live)
    assert first.n_neighbors == direct.n_neighbors
    fits = []
    monkeypatch.setattr(artifacts.embed, "umap_embedding", lambda decoder: fits.append(1) or direct)
    kept = a_new_process().umap("mixed4c")
    assert fits == [] and np.array_equal(kept.coords, first.coords) and np.array_equal(kept.vectors, vectors)
    assert np.array_equal(kept.live, first.live) and kept.n_neighbors == first.n_neighbors
    np.testing.assert_allclose(kept.transform(vectors[:3]), first.transform(vectors[:3]))
    (folder / WEIGHTS_FILE).write_bytes(b"another SAE")  # retrained in the same folder
    a_new_process().umap("mixed4c")
    assert fits == [1]


SMOOTH = """
import json
import numpy as np
from helpers.numba_threads import cache_umap_kernels
from umap import umap_
cache_umap_kernels()
distances = np.sort(np.random.default_rng(0).random((50, 6)).astype(np.float32), axis=1)
sigmas, rhos = umap_.smooth_knn_dist(distances, 6.0)
print(json.dumps({"sigmas": sigmas.tolist(), "hits": sum(umap_.smooth_knn_dist.stats.cache_hits.values()),
                  "misses": sum(umap_.smooth_knn_dist.stats.cache_misses.values())}))
"""


def test_umaps_compiled_kernels_are_kept_on_disk_for_the_next_process(tmp_path):
    """umap-learn compiles its kernels in every process (about 4 s a notebook); ours keep them on disk, as Numba's
    ``cache=True`` does: the second process loads one from there (the smallest, to keep the test short), with the
    same results; and a fit turns caching on for every kernel it compiles."""
    import json
    import os
    import subprocess
    import sys

    from umap import layouts, umap_

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    runs = [json.loads(subprocess.run([sys.executable, "-c", SMOOTH], env=env, capture_output=True, text=True,
                                      check=True).stdout.splitlines()[-1]) for _ in range(2)]
    assert runs[0]["misses"] > 0 and runs[0]["hits"] == 0
    assert runs[1]["hits"] > 0 and runs[1]["misses"] == 0
    assert runs[0]["sigmas"] == runs[1]["sigmas"]
    assert list((tmp_path / "numba").rglob("*smooth_knn_dist*.nbi"))
    umap_embedding(clustered())
    kernels = (umap_.smooth_knn_dist, umap_.compute_membership_strengths, layouts._nb_optimize_layout_euclidean_single_epoch)
    assert all(type(kernel._cache).__name__ == "FunctionCache" for kernel in kernels)
