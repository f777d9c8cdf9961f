"""The SAE families after TopK (chapter 03, *Other SAE families*): the fast training code against the chapter's
equations (values and gradients), the straight-through estimate against a finite difference, planted dictionaries
recovered, files SAELens reads, resumption."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers.config import SaeConfig, TrainConfig
from helpers.sae import families
from helpers.sae.loss import (Step, batchtopk_sae, jumprelu_sae, matryoshka_loss, matryoshka_prefixes,
                              normalized_mse, threshold_sae)
from helpers.sae.model import TopKSAE
from helpers.sae.train import read_metrics, train

FAMILIES = ["batchtopk", "matryoshka", "jumprelu"]


def _randomised(architecture, tied="init", d_in=12, d_sae=48, k=4, seed=0):
    sae = TopKSAE(d_in, d_sae, k, tied, seed=seed, architecture=architecture, prefixes=3)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        sae.threshold.copy_(0.3 * torch.rand(d_sae, generator=g))
        if architecture == "jumprelu":
            sae.bandwidth.fill_(0.2)
            sae.l0_coef.fill_(0.7)
    return sae


def _weights(sae):
    return sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec


@pytest.mark.parametrize("tied", ["init", "full"])
@pytest.mark.parametrize("architecture", FAMILIES)
def test_training_loss_and_gradients_are_the_chapters_equations(architecture, tied):
    sae = _randomised(architecture, tied)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(5))
    out = families.forward_train(sae, x)
    out.total.backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    if architecture == "jumprelu":
        x_hat, z, l0 = jumprelu_sae(x, *_weights(sae), sae.threshold, float(sae.bandwidth))
        total = normalized_mse(x_hat, x) + sae.l0_coef * l0.mean() / sae.k
    else:
        x_hat, z = batchtopk_sae(x, *_weights(sae), sae.k)
        total = normalized_mse(x_hat, x) if architecture == "batchtopk" else \
            matryoshka_loss(x, z, sae.W_dec, sae.b_dec, matryoshka_prefixes(sae.d_sae, sae.prefixes))
    total.backward()
    torch.testing.assert_close(out.total, total)
    torch.testing.assert_close(out.x_hat, x_hat)
    dense = torch.zeros_like(z).scatter_add_(1, out.code.indices, out.code.values)  # the sparse code, spread out
    torch.testing.assert_close(dense, z.detach())
    for name, p in sae.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert set(ours) == {n for n, p in sae.named_parameters() if p.grad is not None}


def test_batchtopk_keeps_k_per_vector_on_average_and_lets_busy_vectors_use_more():
    pre = torch.randn(32, 100, generator=torch.Generator().manual_seed(2))
    pre[0] += 3  # one busy vector
    from helpers.sae.loss import batchtopk_code

    z = batchtopk_code(pre, 5)
    assert int((z > 0).sum()) == 5 * 32
    assert int((z[0] > 0).sum()) > 5 * 4
    # by hand: the kept entries are exactly those above the (5 x 32)-th largest value
    cut = torch.relu(pre).flatten().sort(descending=True).values[5 * 32 - 1]
    assert torch.equal(z > 0, pre >= cut)


def test_the_step_estimate_is_the_finite_difference_of_the_l0_count():
    """Summed over a batch, d L0 / d theta by the straight-through estimate equals minus the number of
    pre-activations in the window (theta - eps/2, theta + eps/2) over eps: the finite difference of the count."""
    pre = torch.randn(4096, 6, generator=torch.Generator().manual_seed(3))
    theta = torch.tensor([0.0, 0.3, 0.5, 1.0, 1.5, 2.0], requires_grad=True)
    eps = 0.1
    Step.apply(pre, theta, eps).sum().backward()

    def count(t):
        return (pre > t).sum(0).double()

    finite = (count(theta.detach() + eps / 2) - count(theta.detach() - eps / 2)) / eps
    torch.testing.assert_close(theta.grad.double(), finite)
    assert (theta.grad < 0).all()  # a higher threshold: fewer active latents


def _planted(path, n=60_000, d=32, atoms=96, seed=0):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((atoms, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    codes = np.zeros((n, atoms), np.float32)
    for _ in range(3):
        codes[np.arange(n), rng.integers(0, atoms, n)] = rng.uniform(1, 3, n)
    np.save(path, (codes @ D).astype(np.float32))
    return D


@pytest.mark.parametrize("architecture", FAMILIES)
def test_each_family_recovers_a_planted_dictionary(tmp_path, architecture):
    """Sparse data from a known dictionary (3 atoms per vector): the decoder finds its atoms, the L0 is near
    the target, and the trained SAE's own encoding (its thresholds) reconstructs held-out vectors."""
    D = _planted(tmp_path / "x.npy")
    out = train(TrainConfig(vectors=str(tmp_path / "x.npy"), out=str(tmp_path / "sae"), batch_size=512,
                            sae=SaeConfig(expansion=4, k=3, tied="init", architecture=architecture),
                            vectors_seen=600_000, lr=4e-3, device="cpu", dead_after=20_000))
    sae = TopKSAE.load(out)
    assert sae.architecture == architecture
    W = sae.W_dec.detach().numpy()
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    best = (D @ W.T).max(axis=1)
    assert best.mean() >= 0.9, best.mean()
    record = json.loads((out / "train.json").read_text())
    assert record["final_fvu"] < 0.3, record["final_fvu"]
    x = torch.from_numpy(np.load(tmp_path / "x.npy")[-4096:])
    with torch.no_grad():
        l0 = float((sae.encode(x) > 0).sum(-1).float().mean())
    assert 2 <= l0 <= 4.5, l0  # the target is 3; at inference a threshold, not a count, decides


@pytest.mark.parametrize("architecture", FAMILIES)
def test_saved_families_are_saelens_jumprelu_files_read_by_both_loaders(tmp_path, architecture):
    ours = _randomised(architecture, seed=4)
    ours.save(tmp_path / "sae", layer="mixed4c")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["family"] == architecture
    assert set(load_file(tmp_path / "sae" / "sae_weights.safetensors")) == {"W_enc", "W_dec", "b_enc", "b_dec",
                                                                             "threshold"}
    back = TopKSAE.load(tmp_path / "sae")
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    x_hat, z = threshold_sae(x, *_weights(ours), ours.threshold)  # the chapter's inference equation
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), z)
        torch.testing.assert_close(back(x), x_hat, rtol=1e-5, atol=1e-5)
        code = back.encode_topk(x)  # padded to the busiest vector; zeros elsewhere
        dense = torch.zeros_like(z).scatter_add_(1, code.indices, code.values)
        torch.testing.assert_close(dense, z)
        torch.testing.assert_close(back.decode_topk(code), x_hat, rtol=1e-5, atol=1e-5)
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[dev]')")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), z)
        torch.testing.assert_close(theirs(x), x_hat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", FAMILIES)
def test_a_family_resumes_as_if_never_stopped(tmp_path, architecture):
    """The families' training state (BatchTopK's moving threshold, JumpReLU's penalty weight and kernel width)
    is in the checkpoint."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "v.npy", np.abs(rng.standard_normal((3000, 16))).astype(np.float32))

    def cfg(out, seen, resume=False):
        return TrainConfig(vectors=str(tmp_path / "v.npy"), out=str(tmp_path / out), batch_size=128,
                           vectors_seen=seen, device="cpu", holdout=256, resume=resume,
                           sae=SaeConfig(expansion=4, k=4, architecture=architecture))

    straight = train(cfg("a", 128 * 8))
    train(cfg("b", 128 * 3))
    resumed = train(cfg("b", 128 * 8, resume=True))
    a, b = load_file(straight / "sae_weights.safetensors"), load_file(resumed / "sae_weights.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert read_metrics({"a": straight})["a"][-1] == read_metrics({"b": resumed})["b"][-1] | {
        "vectors_per_s": read_metrics({"a": straight})["a"][-1]["vectors_per_s"]}


def test_aux_k_with_a_threshold_family_is_refused_by_name():
    with pytest.raises(ValueError, match="AuxK"):
        SaeConfig(architecture="jumprelu", aux_k=16)


def test_batchtopk_selection_is_exact_when_one_vector_needs_more_than_its_first_candidates():
    """One vector carries most of the batch's large pre-activations (more than CANDIDATES x k of them): the
    selection widens its candidates until it provably holds the batch's k x batch largest."""
    from helpers.sae.loss import batchtopk_code

    sae = _randomised("batchtopk", d_sae=256, k=4)
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(6)) * 0.1
    x[3] = 5 * sae.encoder_weight[:40].sum(0)  # row 3 lights up ~40+ latents strongly
    x_c = x - sae.b_dec
    idx, keep, values, _ = families.batchtopk_select(sae, x_c)
    got = torch.zeros(32, 256).scatter_add_(1, idx, torch.relu(values) * keep)
    want = batchtopk_code(sae.preacts(x).detach(), 4)
    assert int((want[3] > 0).sum()) > families.CANDIDATES * 4  # the case this test is about
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("architecture", ["batchtopk", "jumprelu"])
def test_the_books_analyses_work_on_a_family_sae(smoke_run_after_05, tmp_path, architecture):
    """A family's SAE in place of the smoke run's mixed4c SAE (from chapter 03's sweep, read while the book's later
    chapters execute; everything of mixed4c is computed in a run of the test's own): the branch analysis,
    the dataset examples, the spliced-in evaluation, the spatial coherence and the atlas page are made from it,
    and its examples are what its own encoding of the network's activations gives."""
    import shutil

    from helpers.analysis.branches import fraction_in_branch
    from helpers.data.inception import LayerCapture
    from helpers.files import EXAMPLES
    from helpers.run.artifacts import CLASSIFIER, open_run
    from helpers.run.profiles import get_profile
    from helpers.show import atlas

    source = open_run("smoke", run_dir=str(smoke_run_after_05))
    root = tmp_path / "run"
    root.mkdir()
    (root / "harvest").symlink_to(smoke_run_after_05 / "harvest")  # (its kept input of mixed4a: gone after chapter 04)
    shutil.copy(smoke_run_after_05 / CLASSIFIER, root / CLASSIFIER)  # the same network: its kept standardisation
    for layer in source.profile.layers:  # the other layers' SAEs and their examples (chapter 04's) as the book's
        found = smoke_run_after_05 / "sweep" / "mixed4c" / f"{architecture}-k16-s0" if layer == "mixed4c" \
            else source.sae_dir(layer)
        (root / "saes" / layer).mkdir(parents=True)
        for name in ("cfg.json", "sae_weights.safetensors") + ((EXAMPLES,) if layer != "mixed4c" else ()):
            shutil.copy(found / name, root / "saes" / layer / name)
    run = open_run("smoke", run_dir=str(root))
    sae = run.sae("mixed4c")
    assert sae.architecture == architecture and get_profile("smoke").sweep_layer == "mixed4c"
    a = run.branches("mixed4c")
    np.testing.assert_allclose(a.fractions, fraction_in_branch(sae.decoder_directions.detach(), run.slices("mixed4c")),
                               rtol=1e-6)
    ex = run.examples("mixed4c")
    f = int(np.argmax(ex.top_value[:, 0]))
    image, y, x = int(ex.top_image[f, 0]), int(ex.top_y[f, 0]), int(ex.top_x[f, 0])
    with torch.no_grad():
        acts = LayerCapture(run.model(), ["mixed4c"])(run.model_inputs(image + 1)[image:image + 1])["mixed4c"]
        want = float(sae.encode(acts[0, :, y, x][None])[0, f])
    assert float(ex.top_value[f, 0]) == pytest.approx(want, rel=1e-4)
    whole = next(r for r in run.spliced("mixed4c") if r["spliced in"] == "SAE reconstruction")
    assert 0 <= whole["top-1 agreement"] <= 1 and np.isfinite(whole["KL recovered (zero)"])
    assert run.coherence("mixed4c")["summary"]["features measured"] > 0
    page = atlas.write_layer_atlas(tmp_path / "atlas", run.view("mixed4c"))
    text = __import__("html").unescape(page.read_text())
    assert "Moran's I" in text and "relative reconstruction bias" in text


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_a_short_batchtopk_training_keeps_k_per_vector_at_inference(tmp_path, architecture):
    """24 steps (the smoke profile's length): the moving threshold alone lags far behind; the trained SAE's
    threshold is calibrated on training vectors, so held-out vectors keep about k latents each."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", np.abs(rng.standard_normal((30_000, 64))).astype(np.float32) * 3)
    out = train(TrainConfig(vectors=str(tmp_path / "x.npy"), out=str(tmp_path / "sae"), batch_size=1024,
                            sae=SaeConfig(expansion=4, k=8, architecture=architecture), vectors_seen=24 * 1024,
                            device="cpu", holdout=4096))
    l0 = json.loads((out / "cfg.json").read_text())["metadata"]["held_out"]["L0"]
    assert 0.8 * 8 <= l0 <= 1.25 * 8, l0
