import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers.sae.loss import fvu, geometric_median, normalized_mse, topk_sae, training_loss
from helpers.sae import model
from helpers.sae.model import TopKSAE


def _randomised(tied, d_in=12, d_sae=48, k=5, seed=0):
    sae = TopKSAE(d_in, d_sae, k, tied, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
        if sae.decoder_weight is not None:
            sae.decoder_weight.copy_(torch.randn(d_sae, d_in, generator=g))
    return sae


def dense_reference(W_enc, W_dec, b_enc, b_dec, x, k, dead=None, aux_k=0):
    """The SAE as chapter 03 writes it (``loss.topk_sae``, the oracle), plus AuxK written out densely."""
    x_hat, _ = topk_sae(x, W_enc, b_enc, W_dec, b_dec, k)
    pre = (x - b_dec) @ W_enc + b_enc
    aux = None
    if aux_k:
        masked = pre.detach().masked_fill(~dead, float("-inf"))
        aidx = masked.topk(aux_k, dim=-1).indices
        za = torch.zeros_like(pre).scatter(1, aidx, torch.relu(pre.gather(1, aidx)))
        aux = za @ W_dec
    return x_hat, aux


@pytest.mark.parametrize("dense_aux,every", [(0, 3), (4, 3), (4, 11)])
@pytest.mark.parametrize("tied,chunk", [("full", None), ("init", None), ("full", 7), ("init", 64)])
def test_sparse_path_equals_dense_computation_values_and_gradients(tied, chunk, dense_aux, every, monkeypatch):
    """AuxK by the sparse gathers (dense_aux 0: 16 dead latents, the top 6 of each row) and by dense products over the
    dead latents (16 dead, each row's top 6 kept; 5 dead, all kept) against the equation written out densely."""
    monkeypatch.setattr(model, "DENSE_AUX", dense_aux)
    sae = _randomised(tied)
    sae.encode_chunk = chunk  # 7: the pre-activations in 10 chunks, the last one short
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(5)) * 2
    dead = torch.arange(48) % every == 0
    out = sae.forward_train(x, dead=dead, aux_k=6)
    loss = normalized_mse(out.x_hat, x) + 0.3 * out.aux_recon.pow(2).mean()
    loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}

    params = {n: p.detach().clone().requires_grad_() for n, p in sae.named_parameters()}
    W_dec = params["encoder_weight"] if tied == "full" else params["decoder_weight"]
    x_hat, aux = dense_reference(params["encoder_weight"].T, W_dec, params["b_enc"], params["b_dec"], x, 5, dead,
                                 min(6, int(dead.sum())))
    (normalized_mse(x_hat, x) + 0.3 * aux.pow(2).mean()).backward()

    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_recon, aux, rtol=1e-5, atol=1e-5)
    for name, p in params.items():
        torch.testing.assert_close(sparse_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert sparse_grads["encoder_weight"].abs().sum() > 0


@pytest.mark.parametrize("tied", ["full", "init"])
def test_the_gradient_reaches_the_input_and_b_dec_as_the_dense_equation_gives(tied):
    """b_dec's gradient is taken from the kept latents' sums (no [batch, d_in] gradient of x is made when x needs
    none); when x does need one (an attribution through the SAE), it is made, and both match autograd through the
    dense equation."""
    sae = _randomised(tied, seed=3)
    x = (torch.randn(40, 12, generator=torch.Generator().manual_seed(6)) * 2).requires_grad_()
    out = sae.forward_train(x)
    (out.x_hat.pow(2).sum() + out.code.values.sum()).backward()
    params = {n: p.detach().clone().requires_grad_() for n, p in sae.named_parameters()}
    x2 = x.detach().clone().requires_grad_()
    W_dec = params["encoder_weight"] if tied == "full" else params["decoder_weight"]
    x_hat, z = topk_sae(x2, params["encoder_weight"].T, params["b_enc"], W_dec, params["b_dec"], 5)
    (x_hat.pow(2).sum() + z.sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.b_dec.grad, params["b_dec"].grad, rtol=1e-4, atol=1e-5)
    assert x.grad.abs().sum() > 0 and sae.b_dec.grad.abs().sum() > 0


@pytest.mark.parametrize("dense_aux", [0, 4])
def test_the_input_gradient_through_auxk_is_the_dense_equations(dense_aux, monkeypatch):
    """Where x needs a gradient, AuxK's part of it (dense products over the dead latents, or the sparse gathers) is
    autograd's through the equation written out densely, as b_dec's is."""
    monkeypatch.setattr(model, "DENSE_AUX", dense_aux)
    sae = _randomised("full", seed=4)
    x = (torch.randn(40, 12, generator=torch.Generator().manual_seed(7)) * 2).requires_grad_()
    dead = torch.arange(48) % 3 == 0
    out = sae.forward_train(x, dead=dead, aux_k=6)
    (out.x_hat.pow(2).sum() + 0.5 * out.aux_recon.pow(2).sum()).backward()
    params = {n: p.detach().clone().requires_grad_() for n, p in sae.named_parameters()}
    x2 = x.detach().clone().requires_grad_()
    w = params["encoder_weight"]
    x_hat, aux = dense_reference(w.T, w, params["b_enc"], params["b_dec"], x2, 5, dead, 6)
    (x_hat.pow(2).sum() + 0.5 * aux.pow(2).sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.b_dec.grad, params["b_dec"].grad, rtol=1e-4, atol=1e-5)


def test_public_encode_decode_match_saelens_math():
    sae = _randomised("init")
    x = torch.randn(10, 12)
    z = sae.encode(x)
    assert z.shape == (10, 48) and ((z > 0).sum(1) <= 5).all()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(5, dim=-1)
    expected = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(sae.decode(z), z @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(sae(x), sae.decode(z), rtol=1e-5, atol=1e-5)


def test_fully_tied_is_one_matrix():
    sae = TopKSAE(8, 32, 4, "full")
    assert sae.W_dec is sae.encoder_weight and torch.equal(sae.W_enc, sae.W_dec.T)
    assert sum(p.numel() for p in sae.parameters()) == 8 * 32 + 32 + 8


def test_radial_gradient_is_removed_and_rows_stay_unit():
    sae = _randomised("init")
    sae.normalize_decoder()
    sae.decoder_weight.grad = torch.randn_like(sae.decoder_weight)
    sae.remove_radial_grad()
    radial = (sae.decoder_weight.grad * sae.decoder_weight).sum(1)
    assert radial.abs().max() < 1e-5
    torch.testing.assert_close(sae.decoder_weight.norm(dim=1), torch.ones(48))


def test_save_load_round_trip_in_saelens_layout(tmp_path):
    sae = _randomised("init", seed=4)
    sae.save(tmp_path / "sae", layer="mixed4c", weights_id="random(seed=0)")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 12 and cfg["d_sae"] == 48 and cfg["k"] == 5
    assert cfg["apply_b_dec_to_input"] is True and cfg["metadata"]["layer"] == "mixed4c" and cfg["tied"] == "init"
    tensors = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    assert tensors["W_enc"].shape == (12, 48) and tensors["W_dec"].shape == (48, 12)
    assert tensors["b_enc"].shape == (48,) and tensors["b_dec"].shape == (12,)
    loaded = TopKSAE.load(tmp_path / "sae")
    x = torch.randn(20, 12)
    torch.testing.assert_close(loaded(x), sae(x))

    full = _randomised("full", seed=2)
    full.save(tmp_path / "full")
    again = TopKSAE.load(tmp_path / "full")
    assert again.tied == "full" and again.decoder_weight is None
    torch.testing.assert_close(again(x), full(x))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs cfg.json"):
        TopKSAE.load(tmp_path)
    TopKSAE(4, 8, 2, "full").save(tmp_path / "s")
    w = load_file(tmp_path / "s" / "sae_weights.safetensors")
    w["W_dec"] = w["W_dec"] + 1
    from safetensors.torch import save_file
    save_file(w, tmp_path / "s" / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="not W_dec"):
        TopKSAE.load(tmp_path / "s")


def test_losses_by_hand():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    x_hat = torch.tensor([[3.0, 3.0], [0.0, 0.0]])
    # per vector: 1/25 and 1/1
    assert normalized_mse(x_hat, x).item() == pytest.approx((1 / 25 + 1) / 2)
    # residual energy 2; variance about the mean (2, 2): 1+4+1+4 = 10
    assert fvu(x_hat, x).item() == pytest.approx(2 / 10)
    total, nmse, aux = training_loss(x, x_hat, torch.zeros_like(x), aux_coef=0.5)
    # AuxK: the residual x - x_hat = [[0, 1], [1, 0]] against a zero reconstruction: FVU 2 / 1 (mean 0.5, 0.5)
    assert nmse.item() == pytest.approx((1 / 25 + 1) / 2) and aux.item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(nmse.item() + 0.5 * 2.0)


def test_geometric_median_resists_outliers():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]])
    torch.testing.assert_close(geometric_median(x), torch.tensor([2.0, 0.0]), atol=1e-3, rtol=0)


def test_tied_init_sae_recovers_a_planted_dictionary(tmp_path):
    """Synthetic sparse data from a known dictionary: the SAE's decoder finds its atoms."""
    from helpers.config import SaeConfig, TrainConfig
    from helpers.sae.train import train

    rng = np.random.default_rng(0)
    d, atoms, n = 32, 96, 60_000
    D = rng.standard_normal((atoms, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    codes = np.zeros((n, atoms), np.float32)
    for _ in range(3):
        codes[np.arange(n), rng.integers(0, atoms, n)] = rng.uniform(1, 3, n)
    np.save(tmp_path / "x.npy", (codes @ D).astype(np.float32))
    out = train(TrainConfig(vectors=str(tmp_path / "x.npy"), out=str(tmp_path / "sae"),
                            sae=SaeConfig(expansion=4, k=3, tied="init", aux_k=16), batch_size=512,
                            vectors_seen=600_000, lr=4e-3, device="cpu", dead_after=20_000))
    W = TopKSAE.load(out).W_dec.detach().numpy()
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    best = (D @ W.T).max(axis=1)
    print("mean best cosine", best.mean())
    assert best.mean() >= 0.9, best.mean()


def test_firing_stats_count_what_encode_gives():
    from helpers.sae.model import firing_stats

    sae = _randomised("full")
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(9))
    stats = firing_stats(sae, [x[:100], x[100:250], x[250:]])
    z = sae.encode(x)
    on = z > 0
    torch.testing.assert_close(stats["frequency"].float(), on.float().mean(0))
    torch.testing.assert_close(stats["max"], z.max(0).values)
    mean = torch.where(on.any(0), (z * on).sum(0) / on.sum(0).clamp_min(1), torch.zeros(48))
    torch.testing.assert_close(stats["mean_when_active"].float(), mean, rtol=1e-5, atol=1e-6)
    assert int(stats["n"]) == 300


@pytest.mark.parametrize("tied", ["full", "init"])
def test_saelens_loads_what_we_save(tmp_path, tied):
    """SAELens' own loader reads our directory and computes the same SAE."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[dev]')")
    ours = _randomised(tied, seed=3)
    ours.save(tmp_path / "sae", layer="mixed4c")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x))
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


def _malformed(directory, case):
    """Damage a saved SAE directory in one of many ways a careless user or a bad copy would."""
    from safetensors.torch import save_file

    cfg_path, w_path = directory / "cfg.json", directory / "sae_weights.safetensors"
    cfg, w = json.loads(cfg_path.read_text()), load_file(w_path)
    edits = {
        "cfg not json": lambda: cfg_path.write_text("{'d_in': 4,"),
        "cfg a list": lambda: cfg_path.write_text("[1, 2]"),
        "cfg empty": lambda: cfg_path.write_text(""),
        "cfg binary": lambda: cfg_path.write_bytes(b"\xff\xfe\x00\x01"),
        "no architecture": lambda: cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "architecture"})),
        "other architecture": lambda: cfg_path.write_text(json.dumps({**cfg, "architecture": "jumprelu"})),
        "no d_in": lambda: cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "d_in"})),
        "d_sae text": lambda: cfg_path.write_text(json.dumps({**cfg, "d_sae": "8"})),
        "no k": lambda: cfg_path.write_text(json.dumps({k: v for k, v in cfg.items()
                                                        if k not in ("k", "activation_fn_kwargs")})),
        "k zero": lambda: cfg_path.write_text(json.dumps({**cfg, "k": 0, "activation_fn_kwargs": {"k": 0}})),
        "k too large": lambda: cfg_path.write_text(json.dumps({**cfg, "k": 9, "activation_fn_kwargs": {"k": 9}})),
        "tied unknown": lambda: cfg_path.write_text(json.dumps({**cfg, "tied": "half"})),
        "weights truncated": lambda: w_path.write_bytes(w_path.read_bytes()[:40]),
        "weights garbage": lambda: w_path.write_bytes(b"garbage" * 30),
        "weights missing a tensor": lambda: save_file({k: v for k, v in w.items() if k != "b_enc"}, w_path),
        "weights of another size": lambda: save_file({**w, "W_enc": torch.zeros(5, 8)}, w_path),
        "sizes not matching cfg": lambda: cfg_path.write_text(json.dumps({**cfg, "d_in": 5})),
        "weights with a NaN": lambda: save_file({**w, "b_enc": w["b_enc"].index_fill(0, torch.tensor([2]), float("nan"))},
                                                w_path),
        "weights with an infinity": lambda: save_file({**w, "W_dec": w["W_dec"].index_fill(0, torch.tensor([1]),
                                                                                           float("inf"))}, w_path),
    }
    edits[case]()


MALFORMED = ["cfg not json", "cfg a list", "cfg empty", "cfg binary", "no architecture", "other architecture", "no d_in",
             "d_sae text", "no k", "k zero", "k too large", "tied unknown", "weights truncated", "weights garbage",
             "weights missing a tensor", "weights of another size", "sizes not matching cfg", "weights with a NaN",
             "weights with an infinity"]


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_sae_directory_is_named_with_the_file(tmp_path, case):
    TopKSAE(4, 8, 2, "init", seed=0).save(tmp_path / "s")
    _malformed(tmp_path / "s", case)
    with pytest.raises(ValueError) as info:
        TopKSAE.load(tmp_path / "s")
    message = str(info.value)
    assert str(tmp_path / "s") in message and ("cfg.json" in message or "sae_weights.safetensors" in message), message


def _sparse_planted(n, d, atoms, active, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=1)
    idx = torch.randint(0, atoms, (n, active), generator=g)
    return torch.nn.functional.embedding_bag(idx, D, per_sample_weights=torch.rand(n, active, generator=g) * 3,
                                             mode="sum")


@pytest.mark.parametrize("tied", ["full", "init"])
def test_the_start_scale_is_the_least_squares_best_by_brute_force(tied):
    """fit_scale's encoder scale reconstructs the sample at least as well as every scale of a fine grid
    (found by trying them, not by the formula), and no worse than predicting the mean."""
    x = _sparse_planted(2048, 32, 512, 16)
    base = TopKSAE(32, 512, 32, tied, seed=1)
    base.b_dec.data.copy_(geometric_median(x))
    fitted = TopKSAE(32, 512, 32, tied, seed=1)
    fitted.load_state_dict(base.state_dict())
    factor = fitted.fit_scale(x)

    def err(sae):
        with torch.no_grad():
            return float(fvu(sae.forward(x), x))

    grid = []
    for s in np.linspace(0.05, 1.5, 59):
        trial = TopKSAE(32, 512, 32, tied, seed=1)
        trial.load_state_dict(base.state_dict())
        trial.encoder_weight.data.mul_(float(s))
        grid.append(err(trial))
    assert err(base) > 1.0  # unit rows: worse than the mean (the failure this start removes)
    assert err(fitted) <= min(grid) + 1e-4 and err(fitted) < 1.0, (err(fitted), min(grid), factor)


def test_training_at_a_wide_k_beats_the_mean_from_the_first_step(tmp_path):
    """At a shape where unit rows overshoot (many latents, large k), the first logged FVU is below 1."""
    from helpers.config import SaeConfig, TrainConfig
    from helpers.sae.train import read_metrics, train

    np.save(tmp_path / "x.npy", _sparse_planted(20_000, 32, 512, 16).numpy())
    out = train(TrainConfig(vectors=str(tmp_path / "x.npy"), out=str(tmp_path / "sae"), log_every=1,
                            sae=SaeConfig(expansion=16, k=64, tied="init"), batch_size=1024, vectors_seen=4096,
                            holdout=2048, device="cpu"))
    first = read_metrics({"x": out})["x"][0]
    assert first["fvu"] < 0.9, first
