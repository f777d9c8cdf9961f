import numpy as np
import pytest

from helpers.analysis.branches import (baseline, dominant_branch, fraction_in_branch, specialisation_table,
                              specialised)

# mixed4c: 1x1 0-127, 3x3 128-383, 5x5 384-447, pool 448-511
SLICES = {"1x1": (0, 128), "3x3": (128, 384), "5x5": (384, 448), "pool": (448, 512)}


def test_fractions_by_hand():
    only_5x5 = np.zeros(512)
    only_5x5[384:448] = 1
    ones = np.ones(512)
    mixed = -np.ones(512)
    mixed[384:448] = 2.0  # negative everywhere but the 5x5 branch
    f = fraction_in_branch(np.stack([only_5x5, ones, mixed, np.zeros(512)]), SLICES)
    np.testing.assert_allclose(f[0], [0, 0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(f[1], np.sqrt([128 / 512, 256 / 512, 64 / 512, 64 / 512]), atol=1e-6)
    np.testing.assert_allclose(f[2], [0, 0, 1, 0], atol=1e-6)  # relu: only the positive part counts
    np.testing.assert_allclose(f[3], [0, 0, 0, 0])  # an all-zero (dead) vector
    plain = fraction_in_branch(mixed[None], SLICES, positive=False)[0]
    total = np.sqrt(448 + 64 * 4)
    np.testing.assert_allclose(plain, [np.sqrt(128) / total, 16 / total, 16 / total, 8 / total], atol=1e-6)


def test_gaussian_baseline_is_about_sqrt_width_share():
    base = baseline(np.zeros((1, 512)), SLICES, kind="gaussian", n=20_000)
    np.testing.assert_allclose(base.mean, np.sqrt([0.25, 0.5, 0.125, 0.125]), atol=0.02)
    assert (base.threshold > base.mean).all()


def test_planted_specialists_stand_out_and_random_ones_do_not():
    rng = np.random.default_rng(0)
    random = np.abs(rng.standard_normal((2000, 512)))
    planted = random[:50].copy()
    planted[:, 384:448] *= 6  # 50 features that write mostly into the 5x5 branch
    decoder = np.concatenate([planted, random[50:]])
    f = fraction_in_branch(decoder, SLICES)
    base = baseline(decoder, SLICES, kind="shuffled")
    mask = specialised(f, base)
    assert mask[:50, 2].all()
    assert mask[50:, 2].mean() < 0.03  # about the 1% false-positive rate of the 99% quantile
    table = {r["branch"]: r for r in specialisation_table(f, base)}
    assert table["5x5"]["specialised"] >= 50 and table["5x5"]["ratio to chance"] > 2
    assert (dominant_branch(f[:50], base) == 2).all()
    alive = np.ones(2000, bool)
    alive[:10] = False
    assert specialised(f, base, alive)[:10].sum() == 0


def test_bad_baseline_kind():
    with pytest.raises(ValueError, match="gaussian"):
        baseline(np.ones((2, 512)), SLICES, kind="uniform")


def test_slices_of_another_layer_are_refused():
    mixed4a = {"1x1": (0, 192), "3x3": (192, 396), "5x5": (396, 444), "pool": (444, 508)}
    with pytest.raises(ValueError, match="width 508 do not fit branch slices of a 512-wide layer"):
        fraction_in_branch(np.ones((3, 508)), SLICES)
    with pytest.raises(ValueError, match="width 512 do not fit branch slices of a 508-wide layer"):
        fraction_in_branch(np.ones((3, 512)), mixed4a)


def test_the_gaussian_baseline_is_drawn_once_per_width_and_is_the_written_out_draw():
    """Every SAE of a layer gets the same isotropic baseline (it does not read the decoder): kept after the first
    draw, it is the draw written out, for any decoder of that width, and another width or seed draws anew."""
    import torch

    slices = {"1x1": (0, 3), "3x3": (3, 7), "5x5": (7, 9), "pool": (9, 12)}
    rng = np.random.default_rng(5)
    first = baseline(rng.standard_normal((40, 12)), slices, "gaussian", n=3000, seed=4)
    again = baseline(torch.randn(7, 12), slices, "gaussian", n=3000, seed=4)
    want = fraction_in_branch(np.random.default_rng(4).standard_normal((3000, 12), dtype=np.float32), slices)
    assert np.array_equal(first.samples, want) and np.array_equal(again.samples, want)
    assert np.array_equal(again.threshold, np.quantile(want, 0.99, axis=0)) and np.array_equal(again.mean, want.mean(0))
    assert not np.array_equal(baseline(np.ones((2, 12)), slices, "gaussian", n=3000, seed=5).samples, want)
    wide = {**slices, "pool": (9, 13)}
    assert baseline(np.ones((2, 13)), wide, "gaussian", n=3000, seed=4).samples.shape == (3000, 4)
    with pytest.raises(ValueError, match="width 12"):
        baseline(np.ones((2, 12)), wide, "gaussian", n=3000, seed=4)
