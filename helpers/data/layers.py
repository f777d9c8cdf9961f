"""Three of Lucent's InceptionV1 layers made fast on the CPU, with the same numbers, bit for bit: the redirected
ReLU's backward, the 3x3 max pools (``pools``) and the local response norms (forward, and the backward a feature
visualisation takes). ``exact_fast_layers_`` swaps them into a model, with the first convolution's input gradient
(``conv_input_grad``); ``load_model`` does. On 2 CPU cores a forward
pass to mixed4e went from 55.6 to about 25 ms per image (the harvest, the dataset examples and every evaluation are
forward passes; ``bench/README.md``), and a feature-visualisation step to mixed4c is 2.5x plain ``render_vis``
(``bench/bench_seeing.py``)."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from helpers.data.conv_input_grad import fast_first_conv_
from helpers.data.folded import fold_pool_pads_
from helpers.data.pools import MaxPool2dLayer
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



class _Functional:
    """``torch.nn.functional`` with ``local_response_norm`` above: what Lucent's InceptionV1 module calls ``F``
    (it calls the norm as a function, not a layer that could be swapped)."""

    local_response_norm = staticmethod(local_response_norm)

    def __getattr__(self, name):
        return getattr(F, name)


def exact_fast_layers_(model: nn.Module) -> nn.Module:
    """Lucent's redirected ReLUs and max pools of ``model`` (children of the same names) replaced by the fast ones
    above, in place; its module's local response norms too (for every Lucent InceptionV1: the same numbers); the
    -inf pads its forward makes before the max pools given to them (``folded.fold_pool_pads_``); and its first
    convolution's input gradient (``conv_input_grad``)."""
    from lucent.modelzoo.inceptionv1 import helper_layers

    for name, module in list(model.named_children()):
        if isinstance(module, helper_layers.RedirectedReluLayer):
            setattr(model, name, RedirectedReluLayer())
        elif isinstance(module, helper_layers.MaxPool2dLayer):
            setattr(model, name, MaxPool2dLayer())
    fast_first_conv_(model)
    lucent_module = sys.modules[type(model).__module__]
    if getattr(lucent_module, "F", None) is F:
        lucent_module.F = _Functional()
    return fold_pool_pads_(model, MaxPool2dLayer)
