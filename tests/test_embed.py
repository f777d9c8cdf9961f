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


def test_umaps_compiled_kernels_are_kept_on_disk_for_the_next_process():
    """umap-learn compiles its kernels in every process (about 4 s a notebook): a fit turns Numba's on-disk cache on
    for each kernel it runs (as ``cache=True`` does), and the compiled code is written there for the next process
    (Numba loads it from there: its own tests)."""
    from pathlib import Path

    from umap import layouts, umap_

    umap_embedding(clustered())
    kernels = (umap_.smooth_knn_dist, umap_.compute_membership_strengths, layouts._nb_optimize_layout_euclidean_single_epoch)
    for kernel in kernels:
        assert type(kernel._cache).__name__ == "FunctionCache", kernel
        index = Path(kernel._cache._cache_file._index_path)  # Numba's index of the compiled versions
        assert index.exists() and kernel.signatures, index
