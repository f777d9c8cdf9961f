"""The 3x3 max pools of Lucent's InceptionV1 made fast on the CPU, with torch's numbers bit for bit: without a
gradient one Numba pass per plane (``max_pool_3x3_padded``), with one the window entry each output keeps and
torch's gradient (``_MaxPool3x3``), Lucent's -inf pads read, never made (``folded.fold_pool_pads_``); and the max
pool's tangent that chapter 05's attribution takes through a mixed block (``max_pool_tangent``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from helpers.numba_threads import numba, numba_region


def max_pool_3x3(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``F.max_pool2d(x, 3, stride)`` (no padding, floor mode) as the maximum over rows, then over columns, of
    strided views: the same values (a maximum is exact, NaN kept), without the indices torch's kernel computes. Where
    ``max_pool_3x3_padded``'s Numba kernel does not apply (a GPU, another dtype); on a CPU 2-10x torch's pool, and
    a third of the speed of that kernel."""
    h, w = x.shape[-2:]
    rows, cols = stride * ((h - 3) // stride) + 1, stride * ((w - 3) // stride) + 1
    r = torch.maximum(torch.maximum(x[..., 0:rows:stride, :], x[..., 1:rows + 1:stride, :]), x[..., 2:rows + 2:stride, :])
    return torch.maximum(torch.maximum(r[..., 0:cols:stride], r[..., 1:cols + 1:stride]), r[..., 2:cols + 2:stride])


def max_pool_3x3_padded(x: torch.Tensor, stride: int, pad=(0, 0, 0, 0)) -> torch.Tensor:
    """``F.max_pool2d(F.pad(x, pad, value=-inf), 3, stride)`` on a CPU (float32, no gradient) in one Numba pass
    (``_pool_max``): per output row the elementwise maximum of its three input rows, then of three neighbouring
    columns, NaN kept; the padding read as -inf, never made. The pools of a forward pass to mixed4e take 1.1
    against 3.3 ms per image as ``F.pad`` and ``max_pool_3x3`` (batch 16, freed memory reused as a harvest reuses it;
    ``bench/README.md``)."""
    planes, out = _planes_and_output(x, stride, pad)
    with numba_region():
        _pool_max(planes, out.view(-1, *out.shape[2:]).numpy(), stride, pad[2], pad[0])
    return out


def _planes_and_output(x: torch.Tensor, stride: int, pad) -> tuple[np.ndarray, torch.Tensor]:
    """x's planes as one array [n * c, h, w] for the kernels, and the pool's output tensor [n, c, rows, cols] of x
    padded by ``pad`` (F.pad's order: left, right, top, bottom), uninitialised."""
    x = x.contiguous()
    n, c, h, w = x.shape
    left, right, top, bottom = pad
    out = x.new_empty(n, c, (h + top + bottom - 3) // stride + 1, (w + left + right - 3) // stride + 1)
    return x.view(n * c, h, w).numpy(), out


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
        planes, out = _planes_and_output(x, stride, pad)
        entry = torch.empty(out.shape, dtype=torch.uint8)
        top, left = pad[2], pad[0]
        with numba_region():
            _pool_forward(planes, out.view(-1, *out.shape[2:]).numpy(), entry.view(-1, *out.shape[2:]).numpy(),
                          stride, top, left)
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
    ``_MaxPool3x3`` (torch's gradient), elsewhere by ``max_pool_3x3``; others by torch's kernel. ``pad``: the -inf
    padding Lucent's forward makes before the pool (``F.pad(x, pad, value=-inf)``), given to the pool instead
    (``folded.fold_pool_pads_``): on a CPU it is read, never made."""

    def forward(self, tensor, kernel_size=(3, 3), stride=(1, 1), padding=0, ceil_mode=False, pad=(0, 0, 0, 0)):
        square = tuple(kernel_size) == (3, 3) and padding == 0 and not ceil_mode and stride[0] == stride[1] \
            and tensor.dim() == 4
        grad = torch.is_grad_enabled() and tensor.requires_grad
        if square and numba is not None and tensor.device.type == "cpu" and tensor.dtype == torch.float32 \
                and min(pad) >= 0:
            return _MaxPool3x3.apply(tensor, stride[0], tuple(pad)) if grad else \
                max_pool_3x3_padded(tensor, stride[0], tuple(pad))
        if any(pad):
            tensor = F.pad(tensor, pad, value=float("-inf"))
        if square and not grad:
            return max_pool_3x3(tensor, stride[0])
        return F.max_pool2d(tensor, kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)


if numba is not None:
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
