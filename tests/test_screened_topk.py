"""The screened TopK (helpers/screened_topk.py) against float64 truth: its error bound holds, also where
rounding errors add up coherently, and the latents it keeps are the exact TopK of the pre-activations."""

import pytest
import torch

from helpers.config import Kernels, SaeConfig, TrainConfig
from helpers.sae import screened_topk as st
from helpers.sae.model import TopKSAE

pytestmark = pytest.mark.skipif(st.numba is None, reason="numba is not installed (it comes with umap-learn)")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cases():
    """(name, x_c [rows, d], W [n, d], b_enc [n]): data a TopK sees, and data built to be hard for the screen."""
    g = _gen(0)
    d, n = 64, 640
    unit = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    x = torch.randn(96, d, generator=g)
    yield "gaussian", x, unit, torch.randn(n, generator=g) * 0.05
    yield "offset inputs", torch.relu(x) + 5.0, unit, torch.zeros(n)
    yield "bias dominates", x * 1e-3, unit, torch.randn(n, generator=g) * 10
    norms = 10.0 ** torch.empty(n).uniform_(-3, 3, generator=g)
    yield "uneven norms", x * 1e2, unit * norms[:, None], torch.randn(n, generator=g)
    ties = torch.zeros(96, d)
    ties[::2] = x[::2]
    yield "zero rows and tied biases", ties, unit, torch.randint(0, 4, (n,), generator=g).float()
    # the rounding errors of the inputs all add up while the rounded product cancels to 0: entries 1 + e and
    # -1 + e (e just under half a bf16 unit) round to 1 and -1, so x~.w~ = 0 and x.w - x~.w~ = d e, which is
    # E itself (one Cauchy-Schwarz term attained); once with x rounding, once with W; rows scaled over 40
    # orders of magnitude
    e = 2.0 ** -9 - 2.0 ** -20
    rounds = torch.cat([torch.full((d // 2,), 1 + e), torch.full((d // 2,), -1 + e)])
    scale = 2.0 ** torch.arange(-60, 72, 4.0)[:, None]
    yield "x's rounding adds up", scale * rounds, torch.ones(n, d), torch.zeros(n)
    yield "W's rounding adds up", scale * torch.ones(d), rounds.expand(n, d).contiguous(), torch.zeros(n)
    c = 1 + 2.0 ** -8 - 2.0 ** -20
    yield "every entry rounds down", c * scale * torch.ones(d), torch.full((n, d), c), torch.zeros(n)
    tiny = torch.randn(32, d, generator=g) * 1e-39  # below float32's normal range
    yield "subnormal inputs", tiny, unit, torch.zeros(n)


CASES = list(_cases())


def _exact(x, w, b):
    return x.double() @ w.double().T + b.double()


@pytest.mark.parametrize("name,x,w,b", CASES, ids=[c[0] for c in CASES])
def test_the_bound_holds_against_float64_truth(name, x, w, b):
    x_b, w_r = x.to(torch.bfloat16), st.rounded_weight(w)
    screen = (x_b @ w.to(torch.bfloat16).T).float() + b  # what the kernel sees: the bf16 product, plus the bias
    err = torch.from_numpy(st.screen_error(x, x_b, w_r, b))
    miss = (screen.double() - _exact(x, w, b)).abs() - (err[:, None] + st.RHO * screen.double().abs())
    assert miss.max() <= 0, f"{name}: the screen is off by {miss.max():.3g} more than the bound allows"
    if "adds up" in name:  # the bound is attained: no term of E can be dropped
        assert ((screen.double() - _exact(x, w, b)).abs() >= 0.99 * err[:, None]).all()


@pytest.mark.parametrize("name,x,w,b", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("k", [1, 17, 128])
def test_the_kept_latents_are_the_exact_topk(name, x, w, b, k):
    found = st.screened_topk(x, w, b, k, chunk=40)  # 40 rows a chunk: several chunks, the last one short
    assert found is not None
    values, indices = found
    exact = _exact(x, w, b)
    # float32 rounding of the dot products: two values closer than this may come out in either order
    slack = 2 * x.shape[1] * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T + b.double().abs()).max(1).values
    kth = exact.topk(k, dim=1).values[:, -1]
    kept = exact.gather(1, indices)
    assert (kept >= (kth - slack)[:, None]).all(), name
    assert all(len(set(row.tolist())) == k for row in indices), f"{name}: a latent kept twice"
    torch.testing.assert_close(values.double(), kept, rtol=1e-5, atol=float(slack.max()) + 1e-30)


def test_a_width_that_is_not_a_multiple_of_the_blocks():
    g = _gen(1)
    for n in (128, 129, 300, 1000):
        w, x, b = torch.randn(n, 24, generator=g), torch.randn(50, 24, generator=g), torch.randn(n, generator=g)
        values, indices = st.screened_topk(x, w, b, 9)
        want = _exact(x, w, b).topk(9, dim=1)
        assert torch.equal(indices.sort(1).values, want.indices.sort(1).values), n
        torch.testing.assert_close(values.sort(1).values.double(), want.values.sort(1).values, rtol=1e-5, atol=1e-5)


def test_the_screen_prunes_to_a_few_candidates_per_row():
    """At the paper's shape the bound leaves few latents in doubt: what makes the screen worth it."""
    g = _gen(2)
    w = torch.nn.functional.normalize(torch.randn(8192, 512, generator=g), dim=1)
    x = torch.relu(torch.randn(64, 512, generator=g))
    count = torch.empty(64, dtype=torch.long)
    st.screened_topk(x - x.mean(0), w, torch.randn(8192, generator=g) * 0.01, 32, counts=count)
    assert (count >= 32).all() and count.float().mean() < 150, count.float().mean()


def test_inputs_that_are_not_finite_take_the_float32_path():
    sae = TopKSAE(16, 256, 8, "full", seed=0, kernels=Kernels(screen="on"))
    x = torch.randn(20, 16, generator=_gen(3))
    x[3, 5] = float("nan")
    assert st.screened_topk(x - sae.b_dec, sae.encoder_weight, sae.b_enc, 8) is None
    code = sae.encode_topk(x)
    want = sae.preacts(x).topk(8, dim=-1)
    assert torch.equal(code.indices.sort(1).values[4:], want.indices.sort(1).values[4:])
    with torch.no_grad():
        sae.b_enc[7] = float("inf")
    assert st.screened_topk(torch.randn(4, 16), sae.encoder_weight, sae.b_enc, 8) is None


def test_when_the_screen_applies():
    w, x = torch.randn(256, 16), torch.randn(4, 16)
    assert st.enabled(x, w, 32, "on")
    assert not st.enabled(x, w, 129, "on")  # k above the 128 blocks
    assert not st.enabled(x, w[:100], 8, "on")  # fewer latents than blocks
    assert not st.enabled(x.double(), w.double(), 8, "on")
    assert not st.enabled(x, w, 32, "off")
    many = torch.randn(st.MIN_ROWS, 16)
    assert st.enabled(many, w, 32) == st.fast_bf16()
    assert not st.enabled(many[:-1], w, 32)  # too few rows to pay for rounding W


@pytest.mark.parametrize("dense_aux", [0, 8])
def test_training_through_the_screen_equals_the_dense_equation(monkeypatch, dense_aux):
    """The training step's values and gradients with the screen on (and AuxK among dead latents, by the sparse path
    and by dense products) equal autograd through the dense SAE equation."""
    from helpers.sae import model
    from helpers.sae.loss import normalized_mse
    from test_sae import dense_reference

    monkeypatch.setattr(model, "DENSE_AUX", dense_aux)

    sae = TopKSAE(32, 384, 8, "init", seed=0, kernels=Kernels(screen="on"))
    g = _gen(4)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(384, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(32, generator=g))
    sae.encode_chunk = 50
    x = torch.randn(130, 32, generator=g) * 2
    dead = torch.arange(384) % 5 == 0
    calls = []
    real = st.screened_topk
    monkeypatch.setattr(st, "screened_topk", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = sae.forward_train(x, dead=dead, aux_k=12)
    assert calls, "the screen was not used"
    (normalized_mse(out.x_hat, x) + 0.3 * out.aux_recon.pow(2).mean()).backward()
    params = {n: p.detach().clone().requires_grad_() for n, p in sae.named_parameters()}
    x_hat, aux = dense_reference(params["encoder_weight"].T, params["decoder_weight"], params["b_enc"],
                                 params["b_dec"], x, 8, dead, 12)
    (normalized_mse(x_hat, x) + 0.3 * aux.pow(2).mean()).backward()
    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_recon, aux, rtol=1e-5, atol=1e-5)
    for name, p in params.items():
        torch.testing.assert_close(getattr(sae, name).grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("screen", ["on", "off"])
def test_the_training_configs_switch_reaches_the_sae(tmp_path, monkeypatch, screen):
    """``--screen`` is a field of the training config (no environment variable): "on" screens every step's
    TopK, "off" none, and both train to an SAE."""
    import numpy as np

    from helpers.sae.train import train

    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(4096, 16)).astype(np.float32))
    calls = []
    real = st.screened_topk
    monkeypatch.setattr(st, "screened_topk", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(TrainConfig(vectors=str(tmp_path / "x.npy"), out=str(tmp_path / "sae"), sae=SaeConfig(expansion=16, k=8),
                      batch_size=512, vectors_seen=2048, holdout=64, device="cpu", kernels=Kernels(screen=screen)))
    assert (len(calls) >= 4) == (screen == "on") and (len(calls) == 0) == (screen == "off"), calls
    assert TopKSAE.load(tmp_path / "sae").d_sae == 256


def test_two_threads_at_once_get_their_own_answers():
    from concurrent.futures import ThreadPoolExecutor

    g = _gen(5)
    w, b = torch.randn(512, 32, generator=g), torch.randn(512, generator=g)
    xs = [torch.randn(200, 32, generator=g) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: st.screened_topk(x, w, b, 16)[1], xs))
    for x, idx in zip(xs, got):
        assert torch.equal(idx.sort(1).values, _exact(x, w, b).topk(16, dim=1).indices.sort(1).values)



def test_a_weight_changed_in_place_is_rounded_again():
    """Adam changes W in place every step (without always bumping its version): no stale bf16 copy is used."""
    g = _gen(6)
    w, b, x = torch.randn(400, 24, generator=g), torch.zeros(400), torch.randn(30, 24, generator=g)
    first = st.screened_topk(x, w, b, 8)[1]
    with torch.no_grad():
        w.mul_(-1)  # the same tensor, new values: the top latents become others
    after = st.screened_topk(x, w, b, 8)[1]
    want = _exact(x, w, b).topk(8, dim=1).indices
    assert torch.equal(after.sort(1).values, want.sort(1).values)
    assert not torch.equal(first.sort(1).values, after.sort(1).values)


@pytest.mark.parametrize("rows,n,k", [(40, 8192, 32), (9, 1000, 1), (9, 1000, 128), (5, 200, 128), (3, 130, 17),
                                      (4, 64, 64), (3, 100, 7)])
def test_topk_rows_is_torchs_topk(rows, n, k):
    """The block-maxima TopK keeps the same values as torch.topk (and the indices hold them), on Gaussian rows,
    rows of many ties, rows mostly -inf, at widths that are and are not multiples of 128 and below it."""
    g = _gen(7)
    cases = [torch.randn(rows, n, generator=g), torch.randn(rows, n, generator=g).round(),  # many ties
             torch.full((rows, n), float("-inf")).index_fill_(1, torch.arange(min(k + 3, n)), 1.5)]
    for pre in cases:
        values, indices = torch.empty(rows, k), torch.empty(rows, k, dtype=torch.long)
        assert st.topk_rows(pre, k, values, indices)
        assert torch.equal(values.sort(1).values, pre.topk(k, dim=1).values.sort(1).values)
        assert torch.equal(pre.gather(1, indices), values)
        assert all(len(set(r.tolist())) == k for r in indices)  # no latent kept twice


def test_topk_rows_leaves_what_it_cannot_rank_to_torch():
    pre = torch.randn(4, 512)
    values, indices = torch.empty(4, 8), torch.empty(4, 8, dtype=torch.long)
    pre[2, 7] = float("nan")  # torch ranks NaN first; no comparison of ours would
    assert not st.topk_rows(pre, 8, values, indices)
    assert not st.topk_rows(pre.double(), 8, values, indices) and not st.topk_rows(pre, 129, values, indices)


def test_the_float32_paths_agree_with_and_without_the_kernel():
    """With the screen off, the SAE's step through the block-maxima TopK equals the one through torch.topk."""
    from helpers.sae.loss import normalized_mse

    x = torch.randn(1500, 32, generator=_gen(8))  # two chunks of 1024 rows, the last one short
    outs = {}
    for fast in (True, False):
        sae = TopKSAE(32, 384, 8, "init", seed=0, kernels=Kernels(screen="off", cpu_topk=fast))
        out = sae.forward_train(x)
        normalized_mse(out.x_hat, x).backward()
        outs[fast] = (out.x_hat.detach(), out.code.indices.sort(1).values, sae.encoder_weight.grad)
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_every_numba_parallel_kernel_takes_the_one_lock(monkeypatch):
    """Numba's workqueue pool breaks when two threads enter it at once: the screened TopK, its float32 TopK, the
    local response norm (forward and backward), the max pool of a feature visualisation (forward and backward), the
    attribution's pool tangent and the SAE's weight-gradient scatter all enter through the same lock (one per process, not one per module)."""
    import threading

    from helpers import numba_threads
    from helpers.data.layers import local_response_norm
    from helpers.data.pools import MaxPool2dLayer, max_pool_tangent
    from helpers.sae.screened_topk import screened_topk, topk_rows

    entered = []

    class Recording:
        def __enter__(self):
            entered.append(threading.current_thread().name)
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(numba_threads, "_ONE_AT_A_TIME", Recording())
    with torch.no_grad():
        local_response_norm(torch.rand(1, 12, 3, 3), 5)
    t = torch.rand(1, 12, 5, 5, requires_grad=True)
    local_response_norm(MaxPool2dLayer()(t), 5).sum().backward()
    x, w = torch.randn(300, 32), torch.randn(256, 32)
    pre = x @ w.T
    values, indices = torch.empty(300, 8), torch.empty(300, 8, dtype=torch.long)
    assert topk_rows(pre, 8, values, indices)
    assert screened_topk(x, w, torch.zeros(256), 8) is not None
    max_pool_tangent(torch.rand(1, 3, 4, 4), torch.rand(1, 2, 3, 4, 4))
    assert len(entered) == 8
    from helpers.sae.kernels import scatter_rows

    scatter_rows(torch.randint(0, 16, (10, 3)), torch.randn(10, 3), torch.randn(10, 4), torch.empty(16, 4))
    assert len(entered) == 9  # the SAE's weight-gradient scatter


def test_block_maxima_keep_pythons_max_with_nan_and_infinities():
    """The kernels' running block maxima (``_block_max``, vectorised over a slice) against Python's ``max`` entry by
    entry: a NaN is never taken (it is not larger), infinities are, and the returned sum is the slice's."""
    import numpy as np

    from helpers.sae import screened_topk

    if screened_topk.numba is None:
        pytest.skip("Numba is missing")
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(40, 128)).astype(np.float32)
    rows[3, ::5], rows[7, ::3], rows[11, ::7], rows[13] = np.nan, np.inf, -np.inf, np.nan
    bmax = rows[0].copy()
    bmax[::9] = np.nan  # a NaN already held stays (nothing is larger than it)
    expect = [float(v) for v in bmax]
    for row in rows[1:]:
        total = screened_topk._block_max(bmax, row)
        expect = [max(m, float(v)) for m, v in zip(expect, row)]
        assert np.array_equal(bmax, np.array(expect, np.float32), equal_nan=True)
        assert np.isnan(total) if np.isnan(row).any() else total == pytest.approx(float(row.sum(dtype=np.float64)), rel=1e-4)
