"""The SAE's sparse decoder, ``out[b] = sum_j values[b, j] * W[indices[b, j]]``, two ways.

* torch's ``F.embedding_bag`` (CPU and GPU; the reference). On a CPU, where the weight needs a gradient, its
  backward pass is ours (``_CpuDecode``): both gradients in one pass over the kept latents in latent order (Numba),
  each row of the weight read once, in order, against embedding_bag's per-value dots in the batch's order and its
  scatter (9.4 against 18.2 ms for 4096 x 32 of 8192 x 512; 43 against 65 ms at mixed4e's 13312 x 832);
* Triton, on CUDA when Triton is installed: one program per (vector, column block)
  accumulates its k rows in float32, and the backward pass computes the values'
  gradient (k dot products per vector) in one kernel. The weight's gradient is a scatter
  of k rows per vector, which torch's ``embedding_bag`` backward already does well.

``sparse_decode`` picks Triton on CUDA unless told not to (``use_triton=False``: the training
config's ``--no-triton``), after checking it once per
device against the torch path on a small problem (it falls back, with a warning, if the
kernels fail to build or disagree). The tests run the Triton kernels on a CPU with
Triton's interpreter (``TRITON_INTERPRET=1``) and compare them with the dense product
``z @ W``.
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch
import torch.nn.functional as F

from helpers.numba_threads import numba, numba_region

triton = None
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":  # not imported where it cannot run
    try:
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - Triton ships with CUDA builds of torch
        triton = None


def triton_enabled(weight: torch.Tensor, allowed: bool = True) -> bool:
    """Whether ``sparse_decode`` will use the Triton kernels for this weight (``allowed``: the caller's switch)."""
    if triton is None or not allowed:
        return False
    return weight.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def torch_decode(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, dense_scatter: bool = True) -> torch.Tensor:
    """The reference: ``embedding_bag`` with per-sample weights, [batch, d]. On a CPU, where the weight needs a
    gradient, both gradients are ``_CpuDecode``'s (one pass over the kept latents)."""
    values = values.to(weight.dtype)
    if weight.device.type == "cpu" and weight.requires_grad and torch.is_grad_enabled():
        return _CpuDecode.apply(indices, values, weight, dense_scatter)
    return F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")


class _CpuDecode(torch.autograd.Function):
    """``embedding_bag``'s sum on a CPU, with the backward pass of the sparse decoder: the values' gradient
    ``grad[b] . W[indices[b, j]]`` and the weight's ``scatter_rows(indices, values, grad)`` in one pass over the
    kept latents in latent order (``_scatter_csr_dots``, Numba): latent r's weight row is read once, in order, and
    each of its entries' rows of ``grad`` serves both its value's gradient (a dot with the row) and the weight's
    (``scatter_rows``' sum, the same numbers). torch's per-sample-weights backward, which it replaced, read the
    weight's rows in the batch's order, from memory where the weight outgrows the cache (mixed4e's 44 MB)."""

    @staticmethod
    def forward(ctx, indices, values, weight, dense_scatter):
        ctx.save_for_backward(indices, values, weight)
        ctx.dense_scatter = dense_scatter
        return F.embedding_bag(indices, weight.detach(), per_sample_weights=values.detach(), mode="sum")

    @staticmethod
    def backward(ctx, grad):
        indices, values, weight = ctx.saved_tensors
        grad, weight = grad.contiguous(), weight.detach()
        if numba is None or weight.dtype not in (torch.float32, torch.float64):  # torch's gather and product
            grad_values = torch.linalg.vecdot(weight[indices], grad[:, None, :].to(weight.dtype)) \
                if ctx.needs_input_grad[1] else None
            return None, grad_values, scatter_rows(indices, values, grad, weight, ctx.dense_scatter), None
        order, crow, col = _csr_layout(indices, weight.shape[0])
        grad_weight, grad_values = torch.empty_like(weight), torch.empty(indices.shape, dtype=weight.dtype)
        with numba_region():
            _scatter_csr_dots(crow.numpy(), col.numpy(), order.numpy(), values.detach().flatten()[order].numpy(),
                              grad.to(weight.dtype).numpy(), weight.contiguous().numpy(), grad_weight.numpy(),
                              grad_values.view(-1).numpy(), grad_values.numpy().dtype.type(0))
        return None, grad_values if ctx.needs_input_grad[1] else None, grad_weight, None


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, *, use_triton: bool = True,
                  dense_scatter: bool = True) -> torch.Tensor:
    """``sum_j values[b, j] * weight[indices[b, j]]`` -> [batch, d], differentiable in values and weight.
    ``use_triton``: the Triton kernels where they apply; ``dense_scatter``: the weight gradient on CUDA as a
    dense product (else embedding_bag's backward)."""
    if triton_enabled(weight, use_triton) and _checked(weight.device):
        return _TritonDecode.apply(indices, values, weight, dense_scatter)
    return torch_decode(indices, values, weight, dense_scatter)


# --- the SAE's sparse backward pass -----------------------------------------------------
class KeptPreacts(torch.autograd.Function):
    """``pre[b, j] = (x[b] - b_dec) . W[idx[b, j]] + b_enc[idx[b, j]]`` for the kept latents.

    The values come from the dense matmul already done for the TopK; the backward pass is
    sparse: O(batch * k * d_in) instead of O(batch * d_sae * d_in). With ``g`` the gradient of
    the kept values and ``s[r]`` the sum of ``g`` over the kept entries of latent r (b_enc's
    gradient), b_dec's gradient is ``-s @ W``: no [batch, d_in] gradient of x is made unless x
    itself needs one.
    """

    @staticmethod
    def forward(ctx, x, b_dec, weight, b_enc, idx, values, x_c, kernels=None):
        """``x_c``: ``x - b_dec``, already made (detached) for the TopK's matmul; ``kernels``: a
        ``config.Kernels`` (None: the defaults)."""
        ctx.save_for_backward(x_c, weight, idx)
        ctx.d_sae = b_enc.shape[0]
        ctx.triton = kernels is None or kernels.triton
        ctx.dense_scatter = kernels is None or kernels.scatter == "dense"
        return values

    @staticmethod
    def backward(ctx, grad):
        x_c, weight, idx = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_x = grad_b_dec = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse_decode(idx, grad, weight, use_triton=ctx.triton, dense_scatter=ctx.dense_scatter)
        if ctx.needs_input_grad[2]:
            grad_w = scatter_rows(idx, grad, x_c.to(weight.dtype), weight, ctx.dense_scatter)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            per_latent = torch.zeros(ctx.d_sae, dtype=grad.dtype, device=grad.device)
            per_latent.index_add_(0, idx.flatten(), grad.flatten())
            grad_b = per_latent if ctx.needs_input_grad[3] else None
            grad_b_dec = -(per_latent @ weight) if ctx.needs_input_grad[1] else None
        return grad_x, grad_b_dec, grad_w, grad_b, None, None, None, None


class CenteredPreacts(torch.autograd.Function):
    """``pre = (x - b_dec) rows^T + bias`` for a few latents' ``rows`` [m, d_in] (AuxK's dead ones, densely). b_dec's
    gradient is ``-(sum_b g_b) @ rows``; autograd's would be the [batch, d_in] product ``g @ rows`` summed over the
    batch, which is made here only where x itself needs a gradient."""

    @staticmethod
    def forward(ctx, x, b_dec, rows, bias):
        x_c = x - b_dec
        ctx.save_for_backward(x_c, rows)
        return torch.addmm(bias, x_c, rows.T)

    @staticmethod
    def backward(ctx, grad):
        x_c, rows = ctx.saved_tensors
        per_latent = grad.sum(0)
        grad_x = grad @ rows if ctx.needs_input_grad[0] else None
        grad_rows = grad.T @ x_c if ctx.needs_input_grad[2] else None
        return grad_x, -(per_latent @ rows) if ctx.needs_input_grad[1] else None, grad_rows, per_latent


def scatter_rows(idx, coef, rows_in, like, dense: bool = True):
    """``out[r] = sum over (b, j) with idx[b, j] == r of coef[b, j] * rows_in[b]``, [d_sae, d_in].

    The weight gradient of the sparse decoder (and of the kept pre-activations), without
    materialising [batch, k, d_in]: on a CPU the coefficients sorted by latent (a CSR layout), then
    each output row summed from its own entries in batch order by a Numba kernel (``_scatter_csr``:
    the same numbers as torch's sparse CSR product, which it replaced at 3.3 against 6.4 ms for
    4096 x 32 of 8192 x 512; torch's product where Numba is missing or the dtype is not float32/64),
    itself twice as fast as torch's ``embedding_bag`` backward there; on CUDA a dense product
    (``_dense_scatter_rows``; ``dense=False``, the config's ``--scatter bag``: ``embedding_bag``'s backward).
    """
    if like.device.type == "cpu":
        order, crow, col = _csr_layout(idx, like.shape[0])
        values, rows_in = coef.detach().flatten()[order].to(like.dtype), rows_in.detach().to(like.dtype)
        if numba is not None and like.dtype in (torch.float32, torch.float64):
            out = torch.empty(like.shape, dtype=like.dtype)
            with numba_region():
                _scatter_csr(crow.numpy(), col.numpy(), values.numpy(), rows_in.contiguous().numpy(), out.numpy())
            return out
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(crow, col, values, (like.shape[0], idx.shape[0])) @ rows_in
    if like.is_cuda and dense:
        return _dense_scatter_rows(idx, coef, rows_in, like)
    w = like.detach().requires_grad_(True)
    with torch.enable_grad():
        out = F.embedding_bag(idx, w, per_sample_weights=coef, mode="sum")
    return torch.autograd.grad(out, w, rows_in)[0]


_LAYOUT: list = [None]  # (weak reference to the last idx, its version, n_rows, its layout)


def _csr_layout(idx: torch.Tensor, n_rows: int):
    """``idx`` [batch, k] as the pattern of a [n_rows, batch] CSR matrix: (the order that sorts its entries by
    row, row pointers, columns). Kept for the last ``idx``: a training step's two weight gradients (encoder and
    decoder) scatter over the same kept latents and share it."""
    last = _LAYOUT[0]
    if last is not None and last[0]() is idx and last[1] == idx._version and last[2] == n_rows:
        return last[3]
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    crow = torch.zeros(n_rows + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(flat, minlength=n_rows), 0, out=crow[1:])
    layout = (order, crow, order // idx.shape[1])
    _LAYOUT[0] = (weakref.ref(idx), idx._version, n_rows, layout)
    return layout


if numba is not None:

    @numba.njit(parallel=True, cache=True, boundscheck=False, fastmath={"nsz", "arcp", "reassoc"})  # no FMA: scatter_rows' sums
    def _scatter_csr_dots(crow, col, order, coef, rows_in, weight, out, dots, zero):
        """``_scatter_csr`` (out[r]: coef-weighted sum of rows_in's rows in entry order), and for each entry e of
        latent r, dots[order[e]] = rows_in[col[e]] . weight[r] (a vectorised reduction in one order)."""
        d = out.shape[1]
        for r in numba.prange(out.shape[0]):
            o, w = out[r], weight[r]
            for c in range(d):
                o[c] = 0.0
            for e in range(crow[r], crow[r + 1]):
                x, v = rows_in[col[e]], coef[e]
                acc = zero
                for c in range(d):
                    acc += x[c] * w[c]
                    o[c] += v * x[c]
                dots[order[e]] = acc

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _scatter_csr(crow, col, coef, rows_in, out):
        """out[r] = sum over e in crow[r]:crow[r + 1] of coef[e] * rows_in[col[e]], each row by one thread, its
        entries in order (no atomics: a latent's row is written by the thread that owns it)."""
        d = out.shape[1]
        for r in numba.prange(out.shape[0]):
            o = out[r]
            for c in range(d):
                o[c] = 0.0
            for e in range(crow[r], crow[r + 1]):
                x, v = rows_in[col[e]], coef[e]
                for c in range(d):
                    o[c] += v * x[c]


def _dense_scatter_rows(idx, coef, rows_in, like):
    """``scatter_rows`` on a GPU: the coefficients scattered into a dense [batch, d_sae] matrix, then
    one tensor-core product (TF32) with ``rows_in``. Measured on an H200 (d_sae 8192, d_in 512,
    batch 4096, ``bench/profile_cuda.py``): a training step of 2.15 ms against 2.82 ms with
    ``embedding_bag``'s backward (a sort, then a segment sum), which a GPU runs slower than the
    dense product it avoids. Memory: a transient [batch, d_sae] float32."""
    z = torch.zeros(idx.shape[0], like.shape[0], dtype=like.dtype, device=like.device)
    z.scatter_add_(1, idx, coef.to(like.dtype))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return z.T @ rows_in.to(like.dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


_CHECKS: dict[str, bool] = {}


def _checked(device: torch.device) -> bool:
    """On first use on a device, run the kernels (forward and backward) on a small problem
    against the torch path; if they fail to compile or disagree, warn and use torch."""
    device = torch.device(device.type, torch.cuda.current_device() if device.type == "cuda" and device.index is None
                          else device.index)
    key = str(device)
    if key not in _CHECKS:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(50, 70, generator=g).to(device).requires_grad_(True)
        v = torch.rand(4, 5, generator=g).to(device).requires_grad_(True)
        i = torch.randint(0, 50, (4, 5), generator=g).to(device)
        grad = torch.randn(4, 70, generator=g).to(device)
        try:  # in full precision even when first used inside the trainer's bf16 autocast
            with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                got, want = _TritonDecode.apply(i, v, w), torch_decode(i, v, w)
                got = (got.detach(), *torch.autograd.grad(got, (v, w), grad))
                want = (want.detach(), *torch.autograd.grad(want, (v, w), grad))
            # relative: the weight gradient on CUDA is a TF32 product (about 3e-4); a broken kernel is off by ~1
            _CHECKS[key] = all(float((a - b).norm()) <= 2e-3 * float(b.norm()) for a, b in zip(got, want))
            reason = "its results differ from embedding_bag's"
        except Exception as e:  # a Triton or driver that cannot build the kernels
            _CHECKS[key], reason = False, f"{type(e).__name__}: {e}"
        if not _CHECKS[key]:
            warnings.warn(f"the Triton sparse decoder is off on {key} ({reason}); using torch's embedding_bag")
    return _CHECKS[key]


if triton is not None:

    @triton.jit
    def _decode_kernel(idx_ptr, val_ptr, w_ptr, out_ptr, K, D, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        inside = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(0, K):
            row = tl.load(idx_ptr + b * K + j)
            value = tl.load(val_ptr + b * K + j).to(tl.float32)
            acc += value * tl.load(w_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * D + cols, acc, mask=inside)

    @triton.jit
    def _values_grad_kernel(idx_ptr, grad_ptr, w_ptr, out_ptr, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        js = tl.arange(0, BLOCK_K)
        kept = js < K
        rows = tl.load(idx_ptr + b * K + js, mask=kept, other=0)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            inside = cols < D
            g = tl.load(grad_ptr + b * D + cols, mask=inside, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * D + cols[None, :], mask=kept[:, None] & inside[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
        tl.store(out_ptr + b * K + js, acc, mask=kept)


class _TritonDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, values, weight, dense_scatter=True):
        indices, values, weight = indices.contiguous(), values.contiguous(), weight.contiguous()
        ctx.dense_scatter = dense_scatter
        batch, k = indices.shape
        d = weight.shape[1]
        out = torch.empty(batch, d, dtype=torch.float32, device=weight.device)
        block_d = min(triton.next_power_of_2(d), 128)
        _decode_kernel[(batch, triton.cdiv(d, block_d))](indices, values, weight, out, k, d, BLOCK_D=block_d)
        ctx.save_for_backward(indices, values, weight)
        return out.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        indices, values, weight = ctx.saved_tensors
        grad = grad.contiguous()
        batch, k = indices.shape
        d = weight.shape[1]
        grad_values = grad_weight = None
        if ctx.needs_input_grad[1]:
            out = torch.empty(batch, k, dtype=torch.float32, device=weight.device)
            _values_grad_kernel[(batch,)](indices, grad, weight, out, k, d, BLOCK_K=triton.next_power_of_2(k),
                                          BLOCK_D=min(triton.next_power_of_2(d), 64))
            grad_values = out.to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = scatter_rows(indices, values.to(weight.dtype), grad.to(weight.dtype), weight,
                                       ctx.dense_scatter)
        return None, grad_values, grad_weight, None
