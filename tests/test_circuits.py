import copy

import numpy as np
import pytest
import torch

from helpers.analysis.circuits import (ablation_control, ablation_edges, active_features, ablation_effects, attribution,
                              circuit_graph, mixed_block, same_branch_share, spearman, weight_edges)
from helpers.data.inception import LayerCapture, branch_slices, model_input
from helpers.sae.model import TopKSAE


@pytest.fixture(scope="module")
def acts(random_model):
    x = model_input(torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        return LayerCapture(random_model, ["mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e"])(x)


def fitted_sae(acts, d_sae=256, k=8, seed=0):
    """A random SAE centred on the data, so that features fire."""
    sae = TopKSAE(acts.shape[1], d_sae, k, "full", seed=seed)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(dim=(0, 2, 3)))
    return sae


@pytest.mark.parametrize("layer,prev", [("mixed4b", "mixed4a"), ("mixed4c", "mixed4b"), ("mixed4d", "mixed4c"),
                                        ("mixed4e", "mixed4d")])
def test_mixed_block_reproduces_the_network(random_model, acts, layer, prev):
    with torch.no_grad():
        torch.testing.assert_close(mixed_block(random_model, layer, acts[prev]), acts[layer], rtol=1e-5, atol=1e-5)


def test_attribution_is_the_derivative_of_the_target_preactivations(random_model, acts):
    """Against finite differences (float64): the block is piecewise linear, so they agree closely."""
    model = copy.deepcopy(random_model).double()
    x = acts["mixed4b"].double()
    sb, sc = fitted_sae(acts["mixed4b"]).double(), fitted_sae(acts["mixed4c"], seed=1).double()
    sources, eff = attribution(model, sb, sc, "mixed4b", x, chunk=8)
    assert len(sources) > 10 and eff.shape == (len(sources), 256)
    with torch.no_grad():
        z = sb.encode(x.flatten(2).transpose(1, 2).reshape(-1, 512)).reshape(3, 14, 14, -1)
        pre = lambda y: y.flatten(2).sum(-1) @ sc.encoder_weight.T
        for row in (0, len(sources) // 2, len(sources) - 1):
            i = int(sources[row])
            delta = z[..., i][:, None] * sb.decoder_directions[i][None, :, None, None]
            eps = 1e-7  # one-sided, in the direction of removing the feature
            fd = (pre(mixed_block(model, "mixed4c", x)) - pre(mixed_block(model, "mixed4c", x - eps * delta))).sum(0) / eps
            np.testing.assert_allclose(eff[row], fd.numpy(), rtol=1e-4, atol=1e-4 * np.abs(fd.numpy()).max())


def test_attribution_ranks_edges_like_true_ablation(random_model, acts):
    sb, sc = fitted_sae(acts["mixed4b"]), fitted_sae(acts["mixed4c"], seed=1)
    active = active_features(sb, acts["mixed4b"])[:60]
    sources, eff = attribution(random_model, sb, sc, "mixed4b", acts["mixed4b"], sources=active, chunk=16)
    strongest = sources[np.argsort(-np.abs(eff).max(axis=1))[:15]]
    att = eff[[list(sources).index(i) for i in strongest]].ravel()
    abl = ablation_effects(random_model, sb, sc, "mixed4b", acts["mixed4b"], strongest).ravel()
    top = np.argsort(-np.abs(abl))[:150]
    assert spearman(att[top], abl[top]) > 0.7


def test_ablation_recovers_a_planted_edge(random_model, acts):
    model = copy.deepcopy(random_model)
    rng = np.random.default_rng(0)
    d0 = torch.tensor(np.abs(rng.standard_normal(512)), dtype=torch.float32)
    d0 /= d0.norm()
    sb = fitted_sae(acts["mixed4b"])
    sc = fitted_sae(acts["mixed4c"], seed=1)
    with torch.no_grad():
        sb.encoder_weight[17] = d0  # source feature 17 writes d0 into mixed4b
        model.mixed4c_1x1_pre_relu_conv.weight[3, :, 0, 0] = 50 * d0  # mixed4c channel 3 reads d0 ...
        model.mixed4c_1x1_pre_relu_conv.bias[3] = 0
        e3 = torch.zeros(512)
        e3[3] = 1
        sc.encoder_weight[101] = e3  # ... and target feature 101 is that channel
        x = acts["mixed4b"].clone()
        x[:, :, 5, 9] += 20 * d0  # where feature 17 is present
    for target in ("activation", "change"):
        edges = ablation_edges(model, sb, sc, "mixed4b", x, feature=17, target=target)
        assert [e.src_position for e in edges] == [(5, 9)] * 3
        assert [e.dst_position for e in edges] == [(5, 9)] * 3
        assert [e.dst_feature for e in edges] == [101] * 3


def test_weight_edges_follow_the_1x1_convolution(random_model, acts):
    sb, sc = fitted_sae(acts["mixed4b"]), fitted_sae(acts["mixed4c"], seed=1)
    slices = branch_slices(random_model, ["mixed4c"])["mixed4c"]
    w = weight_edges(random_model, "mixed4c", sb, sc, slices)
    conv = random_model.mixed4c_1x1_pre_relu_conv
    with torch.no_grad():
        for i, j in [(0, 0), (3, 40), (100, 7)]:
            x = sb.decoder_directions[i][None, :, None, None]
            linear = (conv(x) - conv(torch.zeros_like(x)))[0, :, 0, 0]  # the 1x1 path's pre-ReLU response
            assert w[i, j] == pytest.approx(float(linear @ sc.encoder_weight[j, 0:128]), rel=1e-4, abs=1e-5)


def test_circuit_graph_follows_positive_edges(random_model, acts):
    saes = {"mixed4b": fitted_sae(acts["mixed4b"]), "mixed4c": fitted_sae(acts["mixed4c"], seed=1),
            "mixed4d": fitted_sae(acts["mixed4d"], seed=2)}
    seed = active_features(saes["mixed4b"], acts["mixed4b"])[0]
    graph = circuit_graph(random_model, saes, acts, ["mixed4b", "mixed4c", "mixed4d"], seeds=seed, top=2)
    assert graph["nodes"][0] == ("mixed4b", seed)
    layers = {n[0] for n in graph["nodes"]}
    assert layers == {"mixed4b", "mixed4c", "mixed4d"} and all(e[2] > 0 for e in graph["edges"])
    assert len([e for e in graph["edges"] if e[0][0] == "mixed4b"]) == 2
    # two seeds: both start the graph, each with its own edges, and a target reached twice is one node
    second = active_features(saes["mixed4b"], acts["mixed4b"])[1]
    both = circuit_graph(random_model, saes, acts, ["mixed4b", "mixed4c", "mixed4d"], seeds=[seed, second], top=2)
    assert both["nodes"][:2] == [("mixed4b", seed), ("mixed4b", second)]
    assert {e[0][1] for e in both["edges"] if e[0][0] == "mixed4b"} == {seed, second}
    assert len(both["nodes"]) == len(set(both["nodes"]))


def test_the_ablation_control_by_brute_force(random_model, acts):
    """Recomputed from the network's own mixed4c activations (not the block): the control's target is the
    mixed4c feature most aligned with the unablated vector at the ablated cell."""
    sb, sc = fitted_sae(acts["mixed4b"]), fitted_sae(acts["mixed4c"], seed=1)
    sources = active_features(sb, acts["mixed4b"])[:5]
    got = ablation_control(random_model, sb, sc, "mixed4b", acts["mixed4b"], sources)
    own = acts["mixed4c"]  # [B, C, 14, 14], from the network's forward pass
    dirs = torch.nn.functional.normalize(sc.decoder_directions.detach(), dim=1)
    agree, same_place, targets, control_targets = 0, 0, set(), set()
    for f in sources:
        for e in ablation_edges(random_model, sb, sc, "mixed4b", acts["mixed4b"], f):
            v = own[e.image, :, e.src_position[0], e.src_position[1]]
            control = int(torch.argmax(dirs @ (v / v.norm())))
            agree += control == e.dst_feature
            same_place += e.dst_position == e.src_position
            targets.add(e.dst_feature)
            control_targets.add(control)
    n = len(sources) * own.shape[0]
    assert got["cases"] == n and got["sources"] == len(sources)
    assert got["agreement"] == pytest.approx(agree / n) and got["at_the_ablated_position"] == pytest.approx(same_place / n)
    assert got["distinct_targets"] == len(targets) and got["distinct_control_targets"] == len(control_targets)


def test_same_branch_share_against_chance():
    rng = np.random.default_rng(1)
    src = rng.integers(0, 4, 300)
    dst = rng.integers(0, 4, 300)
    edges = np.stack([np.arange(300), np.arange(300)], axis=1)
    aligned = same_branch_share(edges, src, src.copy())
    assert aligned["share_same"] == 1.0 and aligned["p_value"] < 0.01 and 0.15 < aligned["chance"] < 0.35
    unrelated = same_branch_share(edges, src, dst)
    assert abs(unrelated["share_same"] - unrelated["chance"]) < 0.08 and unrelated["p_value"] > 0.01
    src[:100] = -1  # not specialised: left out
    assert same_branch_share(edges, src, dst)["edges"] == 200


def test_the_run_keeps_chapter_05s_attribution_for_chapter_10(smoke_run_after_05, monkeypatch):
    """Chapter 10's edges rows read the attribution matrices chapter 05 kept beside the SAEs: each is what
    ``layer_attribution`` gives afresh on chapter 05's activations (all layers in one pass), and a new run object
    reads it back without computing it."""
    from helpers.analysis import circuits
    from helpers.run import evaluations
    from helpers.run.artifacts import open_run

    run = open_run("smoke", run_dir=str(smoke_run_after_05))
    layers, p = run.profile.layers, run.profile
    acts = run.layer_activations(layers, p.circuit_images)
    pairs = [(src, circuits.NEXT[src]) for src in layers if circuits.NEXT.get(src) in layers]
    assert len(pairs) == 4
    for src, dst in pairs:
        assert len(list(run.sae_dir(src).glob(f"attribution-*-{dst}-*.safetensors"))) == 1, src
        sources, effects = run.layer_attribution(src)
        fresh = circuits.layer_attribution(run.model(), run.sae(src), run.sae(dst), src, acts[src], p.circuit_sources)
        assert np.array_equal(sources, fresh[0]) and np.array_equal(effects, fresh[1]) and len(sources)

    def computed(*args):
        raise AssertionError("the kept matrix was computed again")

    monkeypatch.setattr(evaluations, "layer_attribution", computed)
    again = open_run("smoke", run_dir=str(smoke_run_after_05))
    assert np.array_equal(again.layer_attribution(pairs[0][0])[1], run.layer_attribution(pairs[0][0])[1])


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (3, 4, 7, 6), (2, 16, 14, 14)])
def test_the_pool_tangent_is_the_largest_v_among_each_windows_tied_maxima(shape):
    """The max pool's tangent (one Numba pass) against the whole-tensor formula (unfold, mask the entries that attain
    the window's maximum, max) and, at a few positions, against the definition written out by hand: ReLU-like ties
    (rounded values, zeros), a plane of -inf (every entry and the padding tied), NaN in x and in v."""
    from helpers.data.pools import max_pool_tangent, max_pool_tangent_unfold

    g = torch.Generator().manual_seed(sum(shape))
    b, c, h, w = shape
    x = torch.relu(torch.randn(shape, generator=g)).round()
    x[0, 0, 0, 0], x[-1, -1, -1, -1], x[1, 1] = float("nan"), float("-inf"), float("-inf")
    v = torch.randn(b, 3, c, h, w, generator=g)
    v[0, 1, 1, 2, 2] = float("nan")
    got, formula = max_pool_tangent(x, v), max_pool_tangent_unfold(x, v)
    assert torch.equal(got.nan_to_num(7.0), formula.nan_to_num(7.0)) and torch.equal(got.isnan(), formula.isnan())
    padded_x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=float("-inf"))
    padded_v = torch.nn.functional.pad(v, (1, 1, 1, 1))
    for bi, si, ci, i, j in [(0, 0, 1, 2, 3), (1, 2, 1, 0, 0), (b - 1, 1, c - 1, h - 1, w - 1), (0, 1, 2, 1, 1)]:
        window_x = padded_x[bi, ci, i:i + 3, j:j + 3].flatten()
        window_v = padded_v[bi, si, ci, i:i + 3, j:j + 3].flatten()
        top = window_x.max()
        want = max((float(vk) for xk, vk in zip(window_x, window_v) if xk == top), default=float("-inf"))
        assert got[bi, si, ci, i, j].item() == want or (torch.isnan(top) and got[bi, si, ci, i, j].item() == float("-inf"))
