"""End to end on planted truth: a branch made to respond to red discs must come out of the
pipeline as a feature specialised to that branch, firing on the discs, and sensibly placed by
the circuit and UMAP tools."""

import numpy as np
import pytest
import torch

from helpers.analysis.branches import BRANCHES, baseline, dominant_branch, fraction_in_branch, most_specialised
from helpers.analysis.circuits import ablation_edges
from helpers.analysis.embed import umap_embedding
from helpers.data.harvest import HarvestConfig, harvest
from helpers.data.images import load_image
from helpers.data.inception import LayerCapture, load_model, model_input_from_uint8
from helpers.sae.model import TopKSAE
from helpers.data.store import ActivationStore
from helpers.config import SaeConfig, TrainConfig
from helpers.sae.train import train
from planted import clear_of_disc, in_disc, plant_red_disc_signal, red_disc_images


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    images = red_disc_images(root / "images", 40)
    model, u = plant_red_disc_signal(load_model("random")[0])
    run = harvest(HarvestConfig(images=str(root / "images"), out=str(root / "run"), layers="mixed4b,mixed4c",
                                per_image=40, batch_size=8, workers=0), model=model)
    sae_dir = train(TrainConfig(run=str(run), layer="mixed4b", out=str(root / "sae"), sae=SaeConfig(expansion=2, k=8),
                                batch_size=256, vectors_seen=120_000, lr=1e-3, holdout=64, device="cpu"))
    store = ActivationStore(run, "mixed4b")
    prov = store.load_provenance()
    on_disc = np.array([in_disc(images[i][1], y, x) for i, y, x in zip(prov["image"], prov["y"], prov["x"])])
    clear = np.array([clear_of_disc(images[i][1], y, x) for i, y, x in zip(prov["image"], prov["y"], prov["x"])])
    sae = TopKSAE.load(sae_dir)
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(store.load().astype(np.float32))).numpy()
    # the planted concept: features that fire on the discs and nowhere else (it may split over several)
    on_rate, clear_rate = (z[on_disc] > 0).mean(0), (z[clear] > 0).mean(0)
    disc_features = np.flatnonzero((on_rate > 0.2) & (clear_rate < 0.02))
    best = int(disc_features[np.argmax(on_rate[disc_features])]) if len(disc_features) else -1
    return dict(model=model, u=u, run=run, sae=sae, z=z, on_disc=on_disc, clear=clear, feature=best,
                disc_features=disc_features, images=images, slices=store.branch_slices)


def test_features_fire_on_the_discs_and_nowhere_else(planted):
    z, on, clear, f = planted["z"], planted["on_disc"], planted["clear"], planted["feature"]
    assert on.sum() > 100 and clear.sum() > 500  # top-norm harvesting found the disc positions
    assert f >= 0 and (z[on, f] > 0).mean() > 0.9 and (z[clear, f] > 0).mean() < 0.02
    print("disc features", len(planted["disc_features"]))


def test_the_disc_features_are_specialised_to_the_5x5_branch(planted):
    decoder = planted["sae"].decoder_directions.detach()
    fractions = fraction_in_branch(decoder, planted["slices"])
    base = baseline(decoder, planted["slices"], "shuffled")
    five = BRANCHES.index("5x5")
    disc = planted["disc_features"]
    print("disc features' 5x5 fractions", np.round(fractions[disc, five], 2), "baseline mean", base.mean[five],
          "99% quantile", base.threshold[five])
    assert (fractions[disc, five] > base.threshold[five]).all()  # each above the 99th percentile of chance
    assert fractions[disc, five].mean() > 1.8 * base.mean[five]  # far from a typical random direction
    assert (dominant_branch(fractions[disc], base) == five).all()
    # the other way round: the layer's most 5x5-specialised common features are disc features
    # (a disc feature: fires on the discs and nowhere else; some fire on fewer than the fixture's 20% of disc positions)
    z = planted["z"]
    frequent = (z > 0).mean(0) > 0.02
    top = most_specialised(fractions, base, "5x5", n=3, alive=frequent)
    on_rate, clear_rate = (z[planted["on_disc"]][:, top] > 0).mean(0), (z[planted["clear"]][:, top] > 0).mean(0)
    assert (on_rate > 0.1).all() and (clear_rate < 0.02).all(), (top, on_rate, clear_rate)
    # and what they write into the 5x5 branch is the planted direction
    s, e = planted["slices"]["5x5"]
    cos = torch.nn.functional.cosine_similarity(decoder[disc, s:e].clamp_min(0), planted["u"][None], dim=1)
    print("cosine of their 5x5 parts with the planted direction", cos.numpy().round(2))
    assert cos.mean() > 0.8


def test_the_ablation_finds_the_planted_feature_in_the_discs(planted):
    disc_images = [(p, d) for p, d in planted["images"] if d is not None][:6]
    pixels = torch.stack([torch.from_numpy(load_image(p)).permute(2, 0, 1) for p, _ in disc_images])
    with torch.no_grad():
        acts = LayerCapture(planted["model"], ["mixed4b"])(model_input_from_uint8(pixels))["mixed4b"]
    sae_c = TopKSAE(512, 256, 8, "full", seed=3)
    edges = ablation_edges(planted["model"], planted["sae"], sae_c, "mixed4b", acts, planted["feature"])
    print([(e.src_position, d) for (_, d), e in zip(disc_images, edges)])
    assert all(not clear_of_disc(d, *e.src_position) for (_, d), e in zip(disc_images, edges))


def test_umap_places_the_planted_feature(planted):
    decoder = planted["sae"].decoder_directions.detach().numpy()
    emb = umap_embedding(decoder)
    f = planted["feature"]
    assert np.isfinite(emb.coords[f]).all()
    # features whose decoders share the planted direction sit next to it on the map
    s, e = planted["slices"]["5x5"]
    u = planted["u"].numpy()
    similar = np.flatnonzero((np.clip(decoder[:, s:e], 0, None) @ u) / (np.linalg.norm(decoder, axis=1) + 1e-9) > 0.7)
    if len(similar) > 1:
        d = np.linalg.norm(emb.coords - emb.coords[f], axis=1)
        assert np.median(d[similar]) < np.median(d)
