"""Chapter 09's comparison against planted truth: a known permutation, unrelated dictionaries, and a
dictionary recovered twice by training from two seeds."""

import numpy as np
import torch

from helpers.analysis.compare import match_features, matched_share, reconstruction
from helpers.sae.loss import fvu, topk_sae
from helpers.sae.model import TopKSAE
from helpers.config import SaeConfig, TrainConfig
from helpers.sae.train import train


def test_a_shuffled_noisy_copy_is_matched_back_to_its_rows():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(300, 64))
    perm = rng.permutation(300)
    copy = d[perm] + 0.05 * rng.normal(size=(300, 64))
    rows, cols, cos = match_features(d, copy)
    assert len(rows) == 300 and sorted(cols) == list(range(300))  # one to one
    assert (perm[cols] == rows).all()  # each row found where the permutation put it
    assert matched_share(cos)["matched above 0.9"] == 1.0


def test_unrelated_dictionaries_do_not_match():
    rng = np.random.default_rng(1)
    _, _, cos = match_features(rng.normal(size=(200, 64)), rng.normal(size=(250, 64)))
    share = matched_share(cos)
    assert len(cos) == 200 and share["matched above 0.7"] == 0.0 and share["median cosine"] < 0.4


def test_the_matching_is_one_to_one_where_nearest_neighbours_are_not():
    # both rows of A are nearest to B's first row; the best one-to-one assignment gives one of them the second
    a = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]])
    b = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    rows, cols, cos = match_features(a, b)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 0, 1: 1}
    assert cos[0] == 1.0 and 0.1 < cos[1] < 0.2


def test_reconstruction_against_the_dense_computation():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4, seed=0)
    x = torch.relu(torch.randn(500, 16))
    got = reconstruction(sae, x.numpy(), batch=128)
    with torch.no_grad():  # the chapter-03 equation, densely: not the sparse path reconstruction() uses
        x_hat, z = topk_sae(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.k)
        want_fvu = fvu(x_hat, x).item()
    assert abs(got["FVU"] - want_fvu) < 1e-5 * max(1, want_fvu)
    assert got["L0"] == (z > 0).sum(1).float().mean().item() and got["L0"] <= 4


def test_a_dictionary_recovered_twice_matches_itself(tmp_path):
    """Sparse combinations of 48 planted atoms: SAEs from two seeds both find the atoms, so they match each
    other (the yardstick is high), while an untrained SAE matches neither."""
    rng = np.random.default_rng(2)
    atoms = rng.normal(size=(48, 32))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.stack([rng.choice(48, 3, replace=False) for _ in range(40_000)])
    x = (atoms[idx] * rng.uniform(1, 3, size=(40_000, 3, 1))).sum(1).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    saes = []
    for seed in (0, 1):
        out = train(TrainConfig(vectors=str(tmp_path / "x.npy"), out=str(tmp_path / f"s{seed}"),
                                sae=SaeConfig(expansion=2, k=3, aux_k=16),
                                batch_size=256, vectors_seen=600_000, holdout=1024, lr=3e-3,
                                dead_after=20_000, seed=seed, device="cpu"))
        saes.append(TopKSAE.load(out).decoder_directions.detach().numpy())
    # each SAE recovers the atoms: every atom has a decoder direction close to it
    for dec in saes:
        assert (np.max(atoms @ (dec / np.linalg.norm(dec, axis=1, keepdims=True)).T, axis=1) > 0.9).mean() > 0.9
    _, _, cos = match_features(*saes)
    recovered = np.sort(cos)[::-1][:48]  # the 48 atoms' directions, matched across the seeds
    assert (recovered > 0.9).mean() > 0.9, np.round(recovered, 2)
    _, _, chance = match_features(saes[0], TopKSAE(32, 64, 3, seed=5).decoder_directions.detach().numpy())
    assert (np.sort(chance)[::-1][:48] > 0.9).mean() < 0.1
