"""Three of Lucent's InceptionV1 layers made fast on the CPU, with the same numbers, bit for bit: the redirected
ReLU's backward, and the 3x3 max pools and local response norms of a forward pass that wants no gradient.
``exact_fast_layers_`` swaps them into a model; ``load_model`` does. On 2 CPU cores a forward pass to mixed4e went
from 55.6 to 35.5 ms per image: the harvest, the dataset examples and every evaluation are forward passes."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from helpers.numba_threads import numba, numba_region


class _RedirectedReLU(torch.autograd.Function):
    """Lucent's redirected ReLU (``helper_layers.RedirectedReLU``: the gradient through a negative input scaled by
    0.1 instead of zeroed), its backward one elementwise ``where``: the same numbers as Lucent's, which finds the
    negative entries twice by boolean indexing (``nonzero`` and ``index_put``, about a third of a feature
    visualisation step on a CPU)."""

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


class MaxPool2dLayer(nn.Module):
    """Lucent's ``MaxPool2dLayer``; where no gradient is wanted, its 3x3 pools by ``max_pool_3x3`` (with a gradient
    torch's kernel stays: among tied inputs it sends the gradient to one, which the feature visualisations keep)."""

    def forward(self, tensor, kernel_size=(3, 3), stride=(1, 1), padding=0, ceil_mode=False):
        square = tuple(kernel_size) == (3, 3) and padding == 0 and not ceil_mode and stride[0] == stride[1]
        if square and tensor.dim() == 4 and not (torch.is_grad_enabled() and tensor.requires_grad):
            return max_pool_3x3(tensor, stride[0])
        return F.max_pool2d(tensor, kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)


def local_response_norm(x: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
    """``F.local_response_norm`` where no gradient is wanted: the windowed sum of squares over channels, divided,
    scaled and shifted in one pass (``_lrn_base``, in torch's order of float32 operations), then torch's ``pow`` and
    division (torch's CPU square root is not the correctly rounded one, so numba's would differ in the last bit)."""
    if numba is None or x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu" \
            or (torch.is_grad_enabled() and x.requires_grad):
        return F.local_response_norm(x, size, alpha, beta, k)
    x = x.contiguous()
    base = torch.empty_like(x)
    n, c = x.shape[:2]
    with numba_region():  # the same lock as the screened TopK's: Numba's thread pool is entered one thread at a time
        _lrn_base(x.view(n, c, -1).numpy(), base.view(n, c, -1).numpy(), size, np.float32(alpha), np.float32(k))
    return x / base.pow_(beta)


if numba is not None:
    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _lrn_base(x, out, size, alpha, k):
        """out[b, c, p] = mean of x[b, j, p]^2 over the window j of ``size`` channels around c (zeros outside),
        times ``alpha``, plus ``k``: the sum in channel order, as torch's padded average pool makes it."""
        n, c, hw = x.shape
        before, after = size // 2, (size - 1) // 2
        for job in numba.prange(n * c):
            b, ch = job // c, job % c
            for p in range(hw):
                s = np.float32(0.0)
                for j in range(max(ch - before, 0), min(ch + after + 1, c)):
                    v = x[b, j, p]
                    s += v * v
                out[b, ch, p] = np.float32(np.float32(s / np.float32(size)) * alpha) + k


class _Functional:
    """``torch.nn.functional`` with ``local_response_norm`` above: what Lucent's InceptionV1 module calls ``F``
    (it calls the norm as a function, not a layer that could be swapped)."""

    local_response_norm = staticmethod(local_response_norm)

    def __getattr__(self, name):
        return getattr(F, name)


def exact_fast_layers_(model: nn.Module) -> nn.Module:
    """Lucent's redirected ReLUs and max pools of ``model`` (children of the same names) replaced by the fast ones
    above, in place; its module's local response norms too (for every Lucent InceptionV1: the same numbers)."""
    from lucent.modelzoo.inceptionv1 import helper_layers

    for name, module in list(model.named_children()):
        if isinstance(module, helper_layers.RedirectedReluLayer):
            setattr(model, name, RedirectedReluLayer())
        elif isinstance(module, helper_layers.MaxPool2dLayer):
            setattr(model, name, MaxPool2dLayer())
    lucent_module = sys.modules[type(model).__module__]
    if getattr(lucent_module, "F", None) is F:
        lucent_module.F = _Functional()
    return model
