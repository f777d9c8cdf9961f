"""Three of Lucent's InceptionV1 layers made fast on the CPU, with the same numbers, bit for bit: the redirected
ReLU's backward, the 3x3 max pools and the local response norms (forward, and the backward a feature visualisation
takes). ``exact_fast_layers_`` swaps them into a model; ``load_model`` does. On 2 CPU cores a forward pass to
mixed4e went from 55.6 to about 29 ms per image (the harvest, the dataset examples and every evaluation are forward
passes), and a feature-visualisation step to mixed4c is 2.1x plain ``render_vis`` (``bench/bench_seeing.py``). Also
the max pool's tangent that chapter 05's attribution takes through a mixed block (``max_pool_tangent``)."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from helpers.data.folded import fold_pool_pads_
from helpers.numba_threads import numba, numba_region


class _RedirectedReLU(torch.autograd.Function):
    """Lucent's redirected ReLU (``helper_layers.RedirectedReLU``: the gradient through a negative input scaled by
    0.1 instead of zeroed), its backward ``where(x < 0, g * 0.1, g)``: the same numbers as Lucent's, which finds the
    negative entries twice by boolean indexing (``nonzero`` and ``index_put``, about a third of a feature
    visualisation step on a CPU). A one-pass Numba kernel for the ``where`` was tried: no faster in a whole
    step."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad_output):
        x, = ctx.saved_tensors
        return torch.where(x < 0, grad_output * 1e-1, grad_output)


class RedirectedReluLayer(nn.Module):
    def forward(self, x):
        return _RedirectedReLU.apply(x)


def max_pool_3x3(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``F.max_pool2d(x, 3, stride)`` (no padding, floor mode) as the maximum over rows, then over columns, of
    strided views: the same values (a maximum is exact, NaN kept), without the indices torch's CPU kernel always
    computes, and 2-10x faster there."""
    h, w = x.shape[-2:]
    rows, cols = stride * ((h - 3) // stride) + 1, stride * ((w - 3) // stride) + 1
    r = torch.maximum(torch.maximum(x[..., 0:rows:stride, :], x[..., 1:rows + 1:stride, :]), x[..., 2:rows + 2:stride, :])
    return torch.maximum(torch.maximum(r[..., 0:cols:stride], r[..., 1:cols + 1:stride]), r[..., 2:cols + 2:stride])


def max_pool_3x3_padded(x: torch.Tensor, stride: int, pad=(0, 0, 0, 0)) -> torch.Tensor:
    """``F.max_pool2d(F.pad(x, pad, value=-inf), 3, stride)`` on a CPU (float32, no gradient) in one Numba pass
    (``_pool_max``): per output row the elementwise maximum of its three input rows, then of three neighbouring
    columns, NaN kept; the padding read as -inf, never made. The pools of a forward pass to mixed4e take about 1
    against 5-6 ms per image as ``F.pad`` and ``max_pool_3x3`` (``bench/README.md``)."""
    x = x.contiguous()
    n, c, h, w = x.shape
    left, right, top, bottom = pad
    out = x.new_empty(n, c, (h + top + bottom - 3) // stride + 1, (w + left + right - 3) // stride + 1)
    with numba_region():
        _pool_max(x.view(n * c, h, w).numpy(), out.view(n * c, *out.shape[2:]).numpy(), stride, top, left)
    return out


class _MaxPool3x3(torch.autograd.Function):
    """``F.max_pool2d(F.pad(x, pad, value=-inf), 3, stride)`` with torch's gradient, bit for bit (``_pool_forward``,
    ``_pool_backward``): each output keeps its window's first maximum in row-major order (a later entry only when
    strictly larger, or NaN: torch's CPU kernel), and an input's gradients are added in the order of its outputs
    (torch's loop). ``pad`` (F.pad's order: left, right, top, bottom) is read, not made: the padded entries are -inf,
    never taken after a real one, and a gradient an output sends to one is dropped (as the pad's backward drops it).
    The same numbers as torch's kernel on the padded tensor, with the window's entries compared a row of outputs at a
    time."""

    @staticmethod
    def forward(ctx, x, stride, pad=(0, 0, 0, 0)):
        x = x.contiguous()
        n, c, h, w = x.shape
        left, right, top, bottom = pad
        out = x.new_empty(n, c, (h + top + bottom - 3) // stride + 1, (w + left + right - 3) // stride + 1)
        entry = torch.empty(out.shape, dtype=torch.uint8)
        with numba_region():
            _pool_forward(x.view(n * c, h, w).numpy(), out.view(n * c, *out.shape[2:]).numpy(),
                          entry.view(n * c, *out.shape[2:]).numpy(), stride, top, left)
        ctx.save_for_backward(entry)
        ctx.shape, ctx.stride, ctx.top, ctx.left = x.shape, stride, top, left
        return out

    @staticmethod
    def backward(ctx, grad_output):
        entry, = ctx.saved_tensors
        grad = torch.zeros(ctx.shape, dtype=grad_output.dtype)
        n, c, h, w = ctx.shape
        with numba_region():
            _pool_backward(grad_output.contiguous().view(n * c, *entry.shape[2:]).numpy(),
                           entry.view(n * c, *entry.shape[2:]).numpy(), grad.view(n * c, h, w).numpy(), ctx.stride,
                           ctx.top, ctx.left)
        return grad, None, None


class MaxPool2dLayer(nn.Module):
    """Lucent's ``MaxPool2dLayer``, its 3x3 pools on a CPU by ``max_pool_3x3_padded`` (no gradient wanted) or
    ``_MaxPool3x3`` (torch's gradient), elsewhere by ``max_pool_3x3``; others by torch's kernel. ``pad``: the -inf padding Lucent's forward makes before
    the pool (``F.pad(x, pad, value=-inf)``), given to the pool instead (``folded.fold_pool_pads_``): the gradient's
    kernel reads it without a padded copy."""

    def forward(self, tensor, kernel_size=(3, 3), stride=(1, 1), padding=0, ceil_mode=False, pad=(0, 0, 0, 0)):
        square = tuple(kernel_size) == (3, 3) and padding == 0 and not ceil_mode and stride[0] == stride[1] \
            and tensor.dim() == 4
        grad = torch.is_grad_enabled() and tensor.requires_grad
        if square and grad and numba is not None and tensor.device.type == "cpu" and tensor.dtype == torch.float32 \
                and min(pad) >= 0:
            return _MaxPool3x3.apply(tensor, stride[0], tuple(pad))
        if square and not grad and numba is not None and tensor.device.type == "cpu" \
                and tensor.dtype == torch.float32 and min(pad) >= 0:
            return max_pool_3x3_padded(tensor, stride[0], tuple(pad))
        if any(pad):
            tensor = F.pad(tensor, pad, value=float("-inf"))
        if square and not grad:
            return max_pool_3x3(tensor, stride[0])
        return F.max_pool2d(tensor, kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)


def _lrn_base_of(x: torch.Tensor, size: int, alpha: float, k: float) -> torch.Tensor:
    """The norm's base: the windowed mean of squares over channels (``_window_sum``), times ``alpha``, plus ``k``."""
    base = torch.empty_like(x)
    n, c = x.shape[:2]
    with numba_region():  # the same lock as the screened TopK's: Numba's thread pool is entered one thread at a time
        _window_sum(x.view(n, c, -1).numpy(), base.view(n, c, -1).numpy(), size // 2, (size - 1) // 2, True)
        _mean_scaled(base.view(-1).numpy(), np.float32(size), np.float32(alpha), np.float32(k))
    return base


class _LocalResponseNorm(torch.autograd.Function):
    """``F.local_response_norm`` with the gradient autograd gives torch's version, bit for bit: its steps'
    backward formulas in the same order (division, power, scale, the average pool's sum over the window in
    channel order, the square's two halves added after the division's), with the pool's backward as windowed
    sums over channels (``_window_sum``) instead of torch's scalar loop over a padded 5-d tensor."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        base = _lrn_base_of(x, size, alpha, k)
        div = base.pow(beta)
        ctx.save_for_backward(x, base, div)
        ctx.size, ctx.alpha, ctx.beta = size, alpha, beta
        return x / div

    @staticmethod
    def backward(ctx, grad):
        x, base, div = ctx.saved_tensors
        size, (n, c) = ctx.size, x.shape[:2]
        grad = grad.contiguous()
        # autograd's steps, each rounded to float32 as torch rounds it, fused in two passes (``_norm_pooled_grad``,
        # ``_norm_input_grad``); the power stays torch's (its CPU pow is not the correctly rounded one)
        pooled, squares, out = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        flat = lambda t: t.view(-1).numpy()
        with numba_region():
            _norm_pooled_grad(flat(grad), flat(x), flat(div), flat(base.pow(ctx.beta - 1)), flat(pooled),
                              np.float32(ctx.beta), np.float32(ctx.alpha), np.float32(size))
            # channel j: the pooled gradients of channels j - (size-1)//2 .. j + size//2
            _window_sum(pooled.view(n, c, -1).numpy(), squares.view(n, c, -1).numpy(), (size - 1) // 2, size // 2, False)
            _norm_input_grad(flat(grad), flat(x), flat(div), flat(squares), flat(out))
        return out, None, None, None, None


def local_response_norm(x: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
    """``F.local_response_norm``: the windowed sum of squares over channels, divided, scaled and shifted
    (``_lrn_base_of``, in torch's order of float32 operations), then torch's ``pow`` and division (torch's CPU square
    root is not the correctly rounded one, so numba's would differ in the last bit); where a gradient is wanted,
    ``_LocalResponseNorm``'s, which is torch's."""
    if numba is None or x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu":
        return F.local_response_norm(x, size, alpha, beta, k)
    x = x.contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        return _LocalResponseNorm.apply(x, size, alpha, beta, k)
    return x / _lrn_base_of(x, size, alpha, k).pow_(beta)


if numba is not None:
    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _window_sum(q, out, before, after, square):
        """out[b, c, p] = the sum of q[b, j, p] (squared, with ``square``) over channels j = c - before .. c + after
        (those there), from zero in ascending j: the order torch's average pool adds them, forward and backward
        (a row of positions at a time)."""
        n, c, hw = q.shape
        for job in numba.prange(n * c):
            b, ch = job // c, job % c
            for p in range(hw):
                out[b, ch, p] = 0.0
            for j in range(max(ch - before, 0), min(ch + after + 1, c)):
                for p in range(hw):
                    v = q[b, j, p]
                    out[b, ch, p] += v * v if square else v

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _mean_scaled(s, size, alpha, k):
        """s = s / size * alpha + k in place, each step rounded to float32 (torch's average, ``mul``, ``add``)."""
        flat = s.reshape(-1)
        for i in numba.prange(flat.size):
            flat[i] = np.float32(np.float32(flat[i] / size) * alpha) + k

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _norm_pooled_grad(g, x, div, power, out, beta, alpha, size):
        """The gradient reaching the norm's average pool: ((-g * ((x / div) / div)) * (beta * power)) * alpha / size,
        power = base ** (beta - 1), each step rounded to float32 in torch's order."""
        for i in numba.prange(g.size):
            out[i] = np.float32(np.float32(np.float32(-g[i] * np.float32(np.float32(x[i] / div[i]) / div[i]))
                                           * np.float32(beta * power[i])) * alpha) / size

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _norm_input_grad(g, x, div, squares, out):
        """The norm's input gradient: (g / div + squares * x) + squares * x, in float32 (torch's ``direct + half +
        half``)."""
        for i in numba.prange(g.size):
            half = np.float32(squares[i] * x[i])
            out[i] = np.float32(np.float32(g[i] / div[i]) + half) + half

    @numba.njit(inline="always")
    def _pool_row(xr, dc, k, best, kept, cols, stride):
        """One of the window's entries (column offset ``dc``, entry ``k``) compared with a row of outputs. Every
        index counts up from 0: one Numba cannot prove non-negative gets a wraparound test per entry, and the loop
        stops vectorising (several times slower)."""
        for j in range(cols):
            v, o = xr[j * stride + dc], best[j]
            take = (v > o) | (v != v)
            best[j] = v if take else o
            kept[j] = k if take else kept[j]

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _pool_forward(x, out, entry, stride, top, left):
        """Each plane's 3x3 maxima and the window entry (0-8, row-major) kept: torch's rule (the first maximum; a
        NaN replaces what came before), an output row at a time, each entry's comparison a select (no branch). An
        entry in the padding (``top`` rows, ``left`` columns before the input; as many as the output's size asks
        after it) is -inf: a row of outputs starts at -inf with entry 0 (what entry 0 leaves, whatever it is), a
        padded row is skipped (never taken after that), and an input row read with padded columns is copied into a
        buffer with -inf around it. The row is kept in two float32 buffers of the plane's own (the entry as a float:
        lanes of one width) and the stride is a constant in each loop, so the loops vectorise: 1.7x the same loop
        over the output arrays with a uint8 entry (0.033 against 0.056 s for the pools of a feature-visualisation
        step of 8 images)."""
        planes, rows, cols = out.shape
        h, w = x.shape[1], x.shape[2]
        width = (cols - 1) * stride + 3  # the (padded) columns the windows read
        for p in numba.prange(planes):
            best, kept = np.empty(cols, np.float32), np.empty(cols, np.float32)
            padded = np.full(width, -np.inf, np.float32)
            for i in range(rows):
                for j in range(cols):
                    best[j] = -np.inf
                    kept[j] = 0
                for kr in range(3):
                    r = i * stride + kr - top
                    if r < 0 or r >= h:
                        continue
                    row = x[p, r]
                    if left or width > w:
                        for c in range(width):
                            padded[c] = row[c - left] if left <= c < w + left else -np.inf
                        row = padded
                    for dc in range(3):
                        if stride == 1:
                            _pool_row(row, dc, np.float32(3 * kr + dc), best, kept, cols, 1)
                        elif stride == 2:
                            _pool_row(row, dc, np.float32(3 * kr + dc), best, kept, cols, 2)
                        else:
                            _pool_row(row, dc, np.float32(3 * kr + dc), best, kept, cols, stride)
                for j in range(cols):
                    out[p, i, j] = best[j]
                    entry[p, i, j] = np.uint8(kept[j])

    @numba.njit(inline="always")
    def _max_into(dst, src, n):
        """dst[q] = max(dst[q], src[q]) for q < n, NaN kept (either's)."""
        for q in range(n):
            v, m = src[q], dst[q]
            dst[q] = v if (v > m) | (v != v) else m

    @numba.njit(inline="always")
    def _max_of_three(row, out, cols, stride):
        """out[j] = the maximum of row[j * stride + 0, 1, 2], NaN kept."""
        for j in range(cols):
            a, b, c = row[j * stride], row[j * stride + 1], row[j * stride + 2]
            m = b if (b > a) | (b != b) else a
            out[j] = c if (c > m) | (c != c) else m

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _pool_max(x, out, stride, top, left):
        """``max_pool_3x3_padded``'s kernel: each plane's 3x3 maxima, an output row at a time from the maxima of
        its input rows (kept in a buffer with -inf around them where the padding is read). Every index counts up
        from 0 and the stride is a constant in each loop, so the loops vectorise."""
        planes, rows, cols = out.shape
        h, w = x.shape[1], x.shape[2]
        width = (cols - 1) * stride + 3  # the (padded) columns the windows read
        nv = min(w, width - left)  # of them, the input's
        for p in numba.prange(planes):
            rmax = np.full(width, -np.inf, np.float32)
            inner = rmax[left:left + nv]
            for i in range(rows):
                first, last = max(i * stride - top, 0), min(i * stride - top + 3, h)
                if first >= last:  # the window's rows all padding
                    inner[:] = -np.inf
                else:
                    row = x[p, first]
                    for q in range(nv):
                        inner[q] = row[q]
                    for r in range(first + 1, last):
                        _max_into(inner, x[p, r], nv)
                if stride == 1:
                    _max_of_three(rmax, out[p, i], cols, 1)
                elif stride == 2:
                    _max_of_three(rmax, out[p, i], cols, 2)
                else:
                    _max_of_three(rmax, out[p, i], cols, stride)

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _pool_backward(grad_output, entry, grad, stride, top, left):
        """Each output's gradient added to its kept input, outputs in row-major order (torch's loop); one whose kept
        entry is in the padding is dropped."""
        planes, rows, cols = entry.shape
        h, w = grad.shape[1], grad.shape[2]
        for p in numba.prange(planes):
            for i in range(rows):
                for j in range(cols):
                    k = entry[p, i, j]
                    r, c = i * stride + k // 3 - top, j * stride + k % 3 - left
                    if 0 <= r < h and 0 <= c < w:
                        grad[p, r, c] += grad_output[p, i, j]

def max_pool_tangent(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The one-sided tangent of the 3x3, stride-1, -inf-padded max pool (the mixed blocks' pool branch) at x
    [B, C, H, W] along v [B, S, C, H, W]: at each output, the largest v among the window's entries where x attains
    the window's maximum (chapter 05, *Circuits between layers*). On the CPU one Numba pass over v
    (``_pool_tangent``); the unfold formula (``max_pool_tangent_unfold``) makes nine copies of v and two masks of
    them, more than half of an attribution's time."""
    if numba is None or x.device.type != "cpu" or x.dtype != torch.float32 or v.dtype != torch.float32:
        return max_pool_tangent_unfold(x, v)
    x, v = x.contiguous(), v.contiguous()
    out = torch.empty_like(v)
    with numba_region():
        _pool_tangent(x.numpy(), v.numpy(), out.numpy())
    return out


def max_pool_tangent_unfold(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``max_pool_tangent`` by whole-tensor operations: each window unfolded, the tied maxima masked, the max taken."""
    b, s, c, h, w = v.shape
    xu = F.unfold(F.pad(x, (1, 1, 1, 1), value=float("-inf")), 3).reshape(b, c, 9, h * w)
    tied = xu == xu.max(dim=2, keepdim=True).values
    vu = F.unfold(F.pad(v.reshape(b * s, c, h, w), (1, 1, 1, 1)), 3).reshape(b, s, c, 9, h * w)
    return vu.masked_fill(~tied[:, None], float("-inf")).max(dim=3).values.reshape(b, s, c, h, w)


if numba is not None:
    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _pool_tangent(x, v, out):
        """out[b, s, c] = at each position, the largest v[b, s, c] over the 3x3 window's entries where x[b, c] attains
        the window's maximum; outside the plane x is -inf and v is 0 (the padding); NaN wins, as torch's max. The
        window's tied entries are found once per plane (a 9-bit mask per position), then read for every direction s."""
        n, s_, c_, h, w = v.shape
        for job in numba.prange(n * c_):
            b, c = job // c_, job % c_
            tied = np.zeros((h, w), np.int32)
            for i in range(h):
                for j in range(w):
                    top = -np.inf
                    for k in range(9):
                        r, q = i + k // 3 - 1, j + k % 3 - 1
                        xv = x[b, c, r, q] if 0 <= r < h and 0 <= q < w else -np.inf
                        if xv > top or xv != xv:
                            top = xv
                    for k in range(9):
                        r, q = i + k // 3 - 1, j + k % 3 - 1
                        if (x[b, c, r, q] if 0 <= r < h and 0 <= q < w else -np.inf) == top:
                            tied[i, j] |= 1 << k
            for s in range(s_):
                for i in range(h):
                    for j in range(w):
                        best = -np.inf
                        for k in range(9):
                            if tied[i, j] >> k & 1:
                                r, q = i + k // 3 - 1, j + k % 3 - 1
                                vv = v[b, s, c, r, q] if 0 <= r < h and 0 <= q < w else np.float32(0.0)
                                if vv > best or vv != vv:
                                    best = vv
                        out[b, s, c, i, j] = best


class _Functional:
    """``torch.nn.functional`` with ``local_response_norm`` above: what Lucent's InceptionV1 module calls ``F``
    (it calls the norm as a function, not a layer that could be swapped)."""

    local_response_norm = staticmethod(local_response_norm)

    def __getattr__(self, name):
        return getattr(F, name)


def exact_fast_layers_(model: nn.Module) -> nn.Module:
    """Lucent's redirected ReLUs and max pools of ``model`` (children of the same names) replaced by the fast ones
    above, in place; its module's local response norms too (for every Lucent InceptionV1: the same numbers); and the
    -inf pads its forward makes before the max pools given to them (``folded.fold_pool_pads_``)."""
    from lucent.modelzoo.inceptionv1 import helper_layers

    for name, module in list(model.named_children()):
        if isinstance(module, helper_layers.RedirectedReluLayer):
            setattr(model, name, RedirectedReluLayer())
        elif isinstance(module, helper_layers.MaxPool2dLayer):
            setattr(model, name, MaxPool2dLayer())
    lucent_module = sys.modules[type(model).__module__]
    if getattr(lucent_module, "F", None) is F:
        lucent_module.F = _Functional()
    return fold_pool_pads_(model, MaxPool2dLayer)
