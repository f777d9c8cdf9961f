"""Chapter 03's spliced-in evaluation against known answers: an SAE that reconstructs exactly keeps the
network (agreement 1, KL 0), an SAE that outputs nothing is the zero ablation, and the mean floor is
the network run by hand with the layer's mean vector in place."""

import copy

import pytest
import torch

from helpers.data.inception import LayerCapture, branch_slices, model_input
from helpers.analysis.spliced import spliced_evaluation
from helpers.sae.model import TopKSAE


@pytest.fixture(scope="module")
def x():
    return model_input(torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))).double()


@pytest.fixture(scope="module")
def model(random_model):
    """In float64: the random network's class distribution is nearly flat, so its KLs are small numbers."""
    return copy.deepcopy(random_model).double()


def exact_sae(d: int) -> TopKSAE:
    """z = relu(x) = x for the post-ReLU layer outputs, and x_hat = z: the identity."""
    sae = TopKSAE(d, d, d, "full").double()
    with torch.no_grad():
        sae.encoder_weight.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def by_case(rows):
    return {r["spliced in"]: r for r in rows}


def test_an_exact_sae_keeps_the_network(model, random_model, x):
    slices = branch_slices(random_model, ["mixed4c"])["mixed4c"]
    rows = by_case(spliced_evaluation(model, "mixed4c", exact_sae(512), x, slices))
    assert set(rows) == {"SAE reconstruction", "SAE, 1x1 branch only", "SAE, 3x3 branch only", "SAE, 5x5 branch only",
                         "SAE, pool branch only", "zeros (floor)", "mean vector (floor)"}
    for name, r in rows.items():
        if name.startswith("SAE"):
            assert r["top-1 agreement"] == 1.0 and abs(r["KL"]) < 1e-4 * rows["zeros (floor)"]["KL"], (name, r)
            assert r["KL recovered"] == pytest.approx(1, abs=1e-3)
            assert r["KL recovered (zero)"] == pytest.approx(1, abs=1e-3)
    assert rows["zeros (floor)"]["KL"] > 0 and rows["mean vector (floor)"]["KL"] > 0  # the floors change the network


def test_an_empty_sae_is_the_zero_ablation_and_the_mean_floor_is_what_it_says(model, random_model, x):
    slices = branch_slices(random_model, ["mixed4b"])["mixed4b"]
    empty = TopKSAE(512, 64, 4, "full").double()
    with torch.no_grad():
        for p in empty.parameters():
            p.zero_()
    rows = by_case(spliced_evaluation(model, "mixed4b", empty, x, slices))
    assert rows["SAE reconstruction"]["KL"] == pytest.approx(rows["zeros (floor)"]["KL"], rel=1e-5)
    # the field's convention: the empty SAE recovers nothing against zero ablation
    assert rows["SAE reconstruction"]["KL recovered (zero)"] == pytest.approx(0, abs=1e-5)
    # the mean floor by hand: the layer's mean vector over images and positions, in place of its output
    with torch.no_grad():
        clean = model(x)
        mean = LayerCapture(model, ["mixed4b"])(x)["mixed4b"].mean(dim=(0, 2, 3))
        handle = model.mixed4b.register_forward_hook(lambda m, i, o: mean[None, :, None, None].expand_as(o))
        try:
            q = model(x)
        finally:
            handle.remove()
    kl = (clean * (clean.log() - q.log())).sum(1).mean().item()
    assert rows["mean vector (floor)"]["KL"] == pytest.approx(kl, rel=1e-4)
    assert rows["mean vector (floor)"]["KL recovered"] == pytest.approx(0, abs=1e-9)
    assert rows["mean vector (floor)"]["top-1 agreement"] == (q.argmax(1) == clean.argmax(1)).float().mean().item()


def test_floors_measured_once_give_the_same_rows(model, random_model, x):
    """A sweep measures the floors once and hands them to every later SAE: the rows are the ones made from scratch."""
    sae = exact_sae(512)
    first = spliced_evaluation(model, "mixed4c", sae, x, {})
    floors = [r for r in first if r["spliced in"].endswith("(floor)")]
    again = spliced_evaluation(model, "mixed4c", sae, x, {}, floors)
    key = lambda rows: sorted((r["spliced in"], round(r["KL"], 12), round(r["KL recovered (zero)"], 9)) for r in rows)
    assert key(again) == key(first) and len(again) == 3
