"""Chapter 03's measures of an SAE against known answers: the held-out reconstruction measures by hand, Moran's I
against a brute-force double sum and on planted maps, and the spatial coherence of planted features."""

import numpy as np
import pytest
import torch

from helpers.analysis import coherence
from helpers.analysis.coherence import coherence_summary, morans_i, spatial_coherence
from helpers.sae.loss import reconstruction_stats
from helpers.sae.model import TopKSAE


def test_reconstruction_measures_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[0.5, 0.0], [0.0, 2.0]])
    m = reconstruction_stats(x, x_hat, torch.tensor([3, 5]))
    assert m["L0"] == 4 and m["cosine"] == pytest.approx(1)
    assert m["L2 ratio"] == pytest.approx((0.5 + 1) / 2)
    assert m["relative reconstruction bias"] == pytest.approx((0.25 + 4) / 2 / ((0.5 + 4) / 2))
    # a reconstruction shrunk by 0.8 everywhere: bias and L2 ratio 0.8, direction kept
    y = torch.randn(500, 7, generator=torch.Generator().manual_seed(0))
    m = reconstruction_stats(y, 0.8 * y, torch.ones(500))
    assert m["relative reconstruction bias"] == pytest.approx(0.8) and m["L2 ratio"] == pytest.approx(0.8)
    assert m["cosine"] == pytest.approx(1)
    assert m["FVU"] == pytest.approx(float(0.04 * y.pow(2).sum() / (y - y.mean(0)).pow(2).sum()), rel=1e-6)


def _brute_moran(m):
    h, w = m.shape
    z = (m - m.mean()).double()
    num = wsum = 0.0
    for i in range(h):
        for j in range(w):
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                a, b = i + di, j + dj
                if 0 <= a < h and 0 <= b < w:
                    num += float(z[i, j] * z[a, b])
                    wsum += 1
    return h * w / wsum * num / float(z.pow(2).sum())


def test_morans_i_is_the_double_sum_and_reads_planted_maps():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 6, 5, generator=g)
    got = morans_i(maps)
    for i in range(3):
        assert float(got[i]) == pytest.approx(_brute_moran(maps[i]), rel=1e-6)
    yy, xx = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    blob = torch.exp(-((yy - 5) ** 2 + (xx - 8) ** 2) / 18)
    checker = ((yy + xx) % 2) * 2 - 1
    noise = torch.rand(400, 14, 14, generator=g)
    assert float(morans_i(blob)) > 0.8
    assert float(morans_i(checker)) == pytest.approx(-1)
    assert abs(float(morans_i(noise).mean())) < 0.02  # expectation -1/(N-1)
    assert torch.isnan(morans_i(torch.ones(14, 14)))


def test_spatial_coherence_tells_a_smooth_feature_from_a_scattered_one(monkeypatch):
    """Two planted channels, a smooth blob moving between images and salt-and-pepper; an SAE whose latent i
    reads channel i: latent 0 is coherent, latent 1 not, and the shuffled control is near 0 for both."""
    g = torch.Generator().manual_seed(2)
    yy, xx = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    acts = torch.zeros(16, 2, 14, 14)
    for b in range(16):
        cy, cx = torch.randint(3, 11, (2,), generator=g).tolist()
        acts[b, 0] = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 12)
        acts[b, 1] = (torch.rand(14, 14, generator=g) < 0.3).float() * torch.rand(14, 14, generator=g)
    monkeypatch.setattr(coherence, "clean_pass", lambda model, layer, x: (None, acts[x.long().flatten()]))
    sae = TopKSAE(2, 2, 2, "init")
    with torch.no_grad():
        sae.encoder_weight.copy_(torch.eye(2))
        sae.decoder_weight.copy_(torch.eye(2))
    c = spatial_coherence(None, "mixed4a", sae, torch.arange(16.0)[:, None], batch=5)
    assert float(c["moran"][0]) > 0.7 and abs(float(c["moran"][1])) < 0.15, c["moran"]
    assert abs(float(c["shuffled"][0])) < 0.15 and abs(float(c["shuffled"][1])) < 0.15, c["shuffled"]
    assert c["maps"].tolist() == [16, 16]
    summary = coherence_summary(c)
    assert summary["features measured"] == 2 and summary["above the shuffled 99th percentile"] == 0.5


def test_a_planted_class_feature_is_the_best_one_sparse_probe():
    """Among 60 noise columns, column 7 is driven by the class: it ranks first, its 1-sparse probe is near perfect,
    and a probe on noise alone is near chance."""
    import numpy as np

    from helpers.analysis.probing import probe_classes, rank_columns, sparse_probe

    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, 600)
    X = rng.normal(size=(600, 60)).astype(np.float32)
    X[:, 7] += 3.0 * (classes == 1)
    y = classes == 1
    assert rank_columns(X, y)[0] == 7
    got = sparse_probe(X, y)
    assert got["best"] == 7 and got["k=1"] > 0.9
    noise = sparse_probe(np.delete(X, 7, axis=1), y)
    assert 0.35 < noise["k=1"] < 0.65
    rows = probe_classes({"SAE features": X}, np.r_[classes[:-5], [5] * 5], names=[f"c{i}" for i in range(6)],
                         min_images=10)
    assert {r["class"] for r in rows} == {"c0", "c1", "c2"}  # class 5 has only 5 images: not probed
    assert next(r for r in rows if r["class"] == "c1")["best"] == 7


def test_max_pooling_takes_each_images_strongest_position(monkeypatch):
    import numpy as np

    from helpers.analysis import probing

    g = torch.Generator().manual_seed(3)
    acts = torch.rand(5, 6, 4, 4, generator=g)

    class Fake:
        def __init__(self, model, layers):
            pass

        def __call__(self, x):
            return {"mixed4a": acts[x.long().flatten()]}

    monkeypatch.setattr(probing, "LayerCapture", Fake)
    sae = TopKSAE(6, 24, 3, "full", seed=0)
    pooled = probing.max_pooled(None, "mixed4a", sae, torch.arange(5.0)[:, None], batch=2)
    np.testing.assert_allclose(pooled["neurons"], acts.amax(dim=(2, 3)).numpy())
    with torch.no_grad():
        want = torch.stack([sae.encode(acts[i].reshape(6, -1).T).amax(0) for i in range(5)]).numpy()
    np.testing.assert_allclose(pooled["SAE features"], want, rtol=1e-5)
    assert pooled["random directions"].shape == (5, 24)


def test_a_planted_absorption_is_found_along_the_hierarchy():
    """Classes 0, 1, 2 are dogs, 3 a cat (all animals), 4 a car. Feature 0 fires on dogs 0 and 1 but not on dog 2,
    whose own feature 5 fires instead: the dog feature is 0, its recall 2/3, dog 2 is absorbed (a third of the dogs'
    images). "animal" (four classes) is measured too; "thing" (all five) has no negatives and is left out."""
    import numpy as np

    from helpers.analysis.probing import absorption

    rng = np.random.default_rng(1)
    classes = np.repeat(np.arange(5), 20)
    X = np.where(rng.random((100, 12)) < 0.15, rng.random((100, 12)) * 0.2, 0.0)
    X[:, [0, 5, 9]] = 0.0
    X[classes <= 1, 0] = 1 + rng.random(40)
    X[classes == 2, 5] = 1 + rng.random(20)
    X[classes == 3, 9] = 1 + rng.random(20)
    ancestors = {0: ["dog", "animal", "thing"], 1: ["dog", "animal", "thing"], 2: ["dog", "animal", "thing"],
                 3: ["cat", "animal", "thing"], 4: ["car", "thing"]}
    rows = {r["parent"]: r for r in absorption(X, classes, ancestors, names=list("ABCDE"), min_images=10)}
    assert set(rows) == {"dog", "animal"}
    dog = rows["dog"]
    assert dog["feature"] == 0 and dog["recall"] == pytest.approx(2 / 3, abs=1e-3)
    assert dog["absorbed children"] == ["C"] and dog["absorption rate"] == pytest.approx(1 / 3, abs=1e-3)
    # no absorption where the parent's feature covers every child
    X2 = X.copy()
    X2[classes == 2, 0] = 1.0
    again = {r["parent"]: r for r in absorption(X2, classes, ancestors, names=list("ABCDE"))}
    assert again["dog"]["absorbed children"] == [] and again["dog"]["recall"] == 1.0
    assert again["animal"]["absorbed children"] == ["D"]  # the cat's own feature covers what the animal feature misses


def test_the_class_hierarchy_is_wordnets_or_a_named_download():
    from helpers.data.hierarchy import HierarchyUnavailable, class_ancestors

    try:
        found = class_ancestors([207])  # golden retriever
    except HierarchyUnavailable as e:
        assert "python -m nltk.downloader wordnet" in str(e)
        return
    assert any(name.startswith("dog (n02084071)") for name in found[207])


def test_the_atlas_header_line_of_probing_and_absorption():
    from helpers.show.atlas import probing_line

    rows = [{"basis": "SAE features", "k=1": 0.9}, {"basis": "SAE features", "k=1": 0.7},
            {"basis": "neurons", "k=1": 0.6}, {"basis": "neurons", "k=1": 0.6}]
    line = probing_line(rows, [{"absorption rate": 0.2}, {"absorption rate": 0.4}])
    assert "SAE features 0.80" in line and "neurons 0.60" in line and "2 parent concepts: mean rate 0.30" in line
    assert probing_line([], None) == ""


def test_a_kept_branch_analysis_is_the_analysis_of_the_sae_in_its_folder(tmp_path, monkeypatch):
    """Each chapter's kernel reads a layer's branch analysis from beside its SAE instead of drawing the chance
    baselines again: what it reads is the analysis of that SAE, computed afresh (every array, both baselines);
    another SAE written into the folder gets its own."""
    from helpers.analysis.branches import analyse_branches
    from helpers.run import evaluations
    from helpers.sae.model import TopKSAE

    slices = {"1x1": (0, 3), "3x3": (3, 7), "5x5": (7, 9), "pool": (9, 12)}
    frequency = np.linspace(0, 0.5, 40)
    folder = tmp_path / "mixed4c"

    def same(a, b):
        arrays = lambda x: (x.fractions, x.plain, x.frequency, x.shuffled.samples, x.gaussian.samples,
                            x.shuffled.threshold, x.gaussian.threshold)
        return all(np.array_equal(p, q) for p, q in zip(arrays(a), arrays(b))) and a.slices == b.slices

    sae = TopKSAE(12, 40, 3, seed=0)
    sae.save(folder)
    want = analyse_branches("mixed4c", sae.decoder_directions.detach(), slices, frequency)
    assert same(evaluations.kept_branches("mixed4c", folder, sae, slices, frequency), want)  # made, and kept
    assert len(list(folder.glob("branches-*.safetensors"))) == 1
    with monkeypatch.context() as m:
        m.setattr(evaluations, "analyse_branches", lambda *a: pytest.fail("drawn again, not read"))
        assert same(evaluations.kept_branches("mixed4c", folder, TopKSAE.load(folder), slices, frequency), want)
    other = TopKSAE(12, 40, 3, seed=1)
    other.save(folder)
    got = evaluations.kept_branches("mixed4c", folder, other, slices, frequency)
    assert same(got, analyse_branches("mixed4c", other.decoder_directions.detach(), slices, frequency))
    assert not np.array_equal(got.fractions, want.fractions)
