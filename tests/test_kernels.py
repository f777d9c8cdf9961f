"""The Triton sparse decoder against the dense product z @ W, run by Triton's CPU interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers.sae.kernels import scatter_rows as kernels_scatter_rows, sparse_decode, torch_decode, triton_enabled

CHECK = textwrap.dedent("""
    import torch
    from helpers.sae.kernels import sparse_decode, triton_enabled

    torch.manual_seed(0)
    batch, k, n, d = 6, 5, 40, 70          # d not a multiple of the block, k not a power of 2
    W = torch.randn(n, d, requires_grad=True)
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(batch)])
    vals = torch.rand(batch, k, requires_grad=True)
    assert triton_enabled(W)
    out = sparse_decode(idx, vals, W)
    z = torch.zeros(batch, n).scatter(1, idx, vals)          # the dense truth
    W2, z2 = W.detach().clone().requires_grad_(True), z.detach().clone().requires_grad_(True)
    dense = z2 @ W2
    g = torch.randn(batch, d)
    (out * g).sum().backward()
    (dense * g).sum().backward()
    assert torch.allclose(out, dense, atol=1e-5), (out - dense).abs().max()
    assert torch.allclose(W.grad, W2.grad, atol=1e-5), (W.grad - W2.grad).abs().max()
    assert torch.allclose(vals.grad, z2.grad.gather(1, idx), atol=1e-5)
    from helpers.sae import kernels
    assert kernels._CHECKS == {"cpu": True}  # the first-use check passed and the kernels ran
    print("ok")
""")


def test_triton_decoder_equals_the_dense_product_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_torch_path_is_used_on_cpu_and_equals_the_dense_product():
    W = torch.randn(30, 8)
    idx = torch.tensor([[0, 7, 29], [3, 3, 1]])
    vals = torch.tensor([[1.0, 0.5, 2.0], [1.0, 1.0, -1.0]])
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not triton_enabled(W)
    expected = torch.stack([W[0] + 0.5 * W[7] + 2 * W[29], 2 * W[3] - W[1]])
    assert torch.allclose(sparse_decode(idx, vals, W), expected, atol=1e-6)
    assert torch.allclose(torch_decode(idx, vals, W), expected, atol=1e-6)


def _fails_to_build(*args):
    raise RuntimeError("PTX compile failed")


def _is_wrong(indices, values, weight):
    return torch_decode(indices, values, weight) * 1.01


@pytest.mark.parametrize("broken,why", [(_fails_to_build, "PTX compile failed"), (_is_wrong, "differ")])
def test_kernels_that_fail_their_first_use_check_fall_back_with_a_warning(monkeypatch, broken, why):
    from helpers.sae import kernels

    monkeypatch.setattr(kernels, "triton_enabled", lambda weight, allowed=True: True)
    monkeypatch.setattr(kernels._TritonDecode, "apply", broken)
    monkeypatch.setattr(kernels, "_CHECKS", {})
    W, idx, vals = torch.randn(9, 4), torch.tensor([[1, 2]]), torch.tensor([[1.0, -1.0]])
    with pytest.warns(UserWarning, match=f"Triton sparse decoder is off on cpu .*{why}"):
        out = sparse_decode(idx, vals, W)
    assert torch.allclose(out, W[1] - W[2])
    assert sparse_decode(idx, vals, W).shape == (1, 4)  # checked once: no second warning, no error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_gradient_scatter_equals_the_dense_product(dtype):
    """``scatter_rows`` (the SAE's weight gradient on a CPU: the Numba kernel) against the dense equation
    Z^T @ rows, Z the [batch, d_sae] matrix of the scattered coefficients, at an odd width, with latents
    no row keeps (their gradient rows must be zero, not stale memory) and a latent every row keeps; and
    against torch's sparse CSR product, which it replaced, entry for entry."""
    from helpers.numba_threads import numba
    from helpers.sae import kernels

    g = torch.Generator().manual_seed(0)
    batch, k, d_sae, d = 300, 7, 97, 45
    idx = torch.stack([torch.randperm(d_sae - 10, generator=g)[:k] for _ in range(batch)])  # latents 87-96 unused
    idx[:, 0] = 3  # one latent in every row
    coef = torch.randn(batch, k, generator=g, dtype=dtype)
    rows = torch.randn(batch, d, generator=g, dtype=dtype)
    like = torch.full((d_sae, d), float("nan"), dtype=dtype)  # the output must not be read from here
    out = kernels.scatter_rows(idx, coef, rows, like)
    dense = torch.zeros(batch, d_sae, dtype=torch.float64).scatter_add_(1, idx, coef.double())  # repeats add
    torch.testing.assert_close(out.double(), dense.T @ rows.double(), rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=1e-5 if dtype == torch.float32 else 1e-12)
    assert (out[87:] == 0).all() and out.dtype == dtype and out.shape == like.shape
    if numba is None:
        pytest.skip("Numba is missing: scatter_rows took torch's product")
    order, crow, col = kernels._csr_layout(idx, d_sae)
    csr = torch.sparse_csr_tensor(crow, col, coef.flatten()[order], (d_sae, batch))
    assert torch.equal(out, csr @ rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", [True, False])
def test_the_cpu_decoders_gradients_are_the_dense_products(dtype, kernel, monkeypatch):
    """The sparse decoder's backward pass on a CPU (``_CpuDecode``: both gradients in one Numba pass, or, without
    Numba, torch's gather and product and ``scatter_rows``) against autograd's through the dense equation z @ W, at an
    odd width, with a latent kept twice in one row (its two values get the same gradient, the weight's row the sum of
    both)."""
    from helpers.sae import kernels

    if not kernel:
        monkeypatch.setattr(kernels, "numba", None)
    g = torch.Generator().manual_seed(1)
    batch, k, n, d = 37, 6, 50, 83
    W = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])
    idx[5, 1] = idx[5, 0]
    vals = torch.rand(batch, k, generator=g, dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, d, generator=g, dtype=dtype)
    (torch_decode(idx, vals, W) * grad).sum().backward()
    W2, vals2 = W.detach().double().requires_grad_(True), vals.detach().double().requires_grad_(True)
    z = torch.zeros(batch, n, dtype=torch.float64).scatter_add(1, idx, vals2)  # repeats add
    ((z @ W2) * grad.double()).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vals.grad.double(), vals2.grad, **tol)
    torch.testing.assert_close(W.grad.double(), W2.grad, **tol)
    assert vals.grad[5, 0] == vals.grad[5, 1]
    assert torch.equal(W.grad, kernels_scatter_rows(idx, vals.detach(), grad, W))  # one pass or two: the same sums
    # the values alone (a frozen dictionary: attribution): embedding_bag's own gradient, the same dots
    v = vals.detach().requires_grad_(True)
    (torch_decode(idx, v, W.detach()) * grad).sum().backward()
    torch.testing.assert_close(v.grad, vals.grad, **tol)
    torch.testing.assert_close(v.grad, torch.linalg.vecdot(W.detach()[idx], grad[:, None]), **tol)
