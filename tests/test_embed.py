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
