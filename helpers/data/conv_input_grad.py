"""The first convolution's input gradient (feature visualisation's), in oneDNN's summation order, five times faster.

Lucent's ``conv2d0`` (3 -> 64 channels, 7 x 7, stride 2, on the zero-padded image) is the one convolution whose input
gradient a feature visualisation needs and that oneDNN computes slowly on a CPU: its ``brgconv_strided`` kernel
vectorises over the 3 input channels, so it takes about 60 ms of a 470 ms step of 8 features at 224 px (five times
its own forward pass). Its order of summation, found by emulating candidate orders against its results (bench/README):

* image width odd: each input pixel is one chain of fused multiply-adds over its valid taps, kh ascending, then kw
  ascending, then the 64 output channels;
* width even: one such chain over (kh, channel) per kw, and the kw partial sums added in order.

``_input_grad`` computes those chains with the pixels of 8 rows (of one row and one column parity) in the vector lanes
and the three input channels side by side: the gradient is copied into zero-padded rows, so every tap runs over the
same whole lanes, a tap outside the image adding ``0 * w`` (an exact no-op: the chains start at +0 and a sum is never
-0). Numba compiles ``a += g * w`` to one fused multiply-add (``fastmath={"contract"}``, nothing else relaxed).
For 8 images of 245 px: 38 ms against oneDNN's 57-59; of 258 px, 50-55 against 62-71 (bench/README).

Another CPU's oneDNN may pick another kernel: the first backward pass of every input shape in a process is also
computed by oneDNN and compared bit for bit; one difference and oneDNN computes every later one
(``FirstConv2d``). tests/test_featviz.py compares a whole render with Lucent's own network.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from helpers.numba_threads import numba, numba_region

log = logging.getLogger(__name__)
LEFT = TOP = 4  # zero columns before each padded gradient row, zero rows above: at least the largest tap offset, 3
ROWS = 8  # image rows of one parity per parallel item
_CHECKED: dict = {"shapes": set(), "off": False}

if numba is not None:
    from numba import prange

    @numba.njit(parallel=True, fastmath={"contract"}, boundscheck=False, cache=True)
    def _input_grad(gp, wt, out, rows_p, row_len, h, width, per_kw):  # pragma: no cover
        """gp: flat [images, 64, rows_p, row_len], gradient row oh at TOP + oh, its values from column LEFT, zeros
        around; wt: [3, k, k, 64]; out: flat [images, 3, h, width]. Each parallel item: ROWS rows of one parity of one
        image, for one column parity at a time, its lanes those rows' pixels (a tap outside the image reads zeros),
        the three input channels' chains side by side (each gradient value read once for three). Unsigned offsets:
        no negative-index test in the lane loop, which then vectorises."""
        n_out, k = wt.shape[3], wt.shape[1]
        n_img = len(gp) // (n_out * rows_p * row_len)
        blocks = (h + 2 * ROWS - 1) // (2 * ROWS)
        g_step, n_lanes = np.uint64(rows_p * row_len), np.uint64(ROWS * row_len)
        for item in prange(n_img * 2 * blocks):
            n, py, b = item // (2 * blocks), (item // blocks) % 2, item % blocks
            ih0 = py + 2 * ROWS * b  # rows ih0, ih0 + 2, ... (the gradient's rows oh0, oh0 + 1, ... for a tap)
            if ih0 >= h:
                continue
            acc = np.zeros((3, ROWS * row_len), np.float32)
            part = np.zeros((3, ROWS * row_len), np.float32)
            for px in range(2):
                acc[:] = 0.0
                for outer in range(k):
                    if per_kw:
                        if (px - outer) % 2 != 0:
                            continue
                        part[:] = 0.0
                    for inner in range(k):
                        kh, kw = (inner, outer) if per_kw else (outer, inner)
                        if (ih0 - kh) % 2 != 0 or (px - kw) % 2 != 0:
                            continue
                        g_off = np.uint64(((n * n_out) * rows_p + TOP + (ih0 - kh) // 2) * row_len + LEFT + (px - kw) // 2)
                        a = part if per_kw else acc
                        a0, a1, a2 = a[0], a[1], a[2]
                        for o in range(n_out):
                            w0, w1, w2 = wt[0, kh, kw, o], wt[1, kh, kw, o], wt[2, kh, kw, o]
                            base = g_off + np.uint64(o) * g_step
                            for j in range(n_lanes):
                                v = gp[base + j]
                                a0[j] += v * w0
                                a1[j] += v * w1
                                a2[j] += v * w2
                    if per_kw:
                        for c in range(3):
                            for j in range(ROWS * row_len):
                                acc[c, j] = acc[c, j] + part[c, j]
                for c in range(3):
                    for r in range(min(ROWS, (h - ih0 + 1) // 2)):
                        o_off = ((n * 3 + c) * h + ih0 + 2 * r) * width + px
                        for j in range((width - px + 1) // 2):
                            out[o_off + 2 * j] = acc[c, r * row_len + j]


def input_grad(grad: torch.Tensor, weight: torch.Tensor, shape) -> torch.Tensor:
    """The gradient of ``conv2d(x, weight, stride=2)`` (no padding; 3 input channels) with respect to x of ``shape``,
    from the output's gradient ``grad``, in oneDNN's order (the module's docstring)."""
    n, _, h, width = shape
    oh_n, ow_n = grad.shape[2], grad.shape[3]
    row_len = -(-(LEFT + (width + 1) // 2 + LEFT) // 16) * 16  # a whole number of vectors
    rows_p = TOP + oh_n + ROWS + TOP  # zero rows above and below: the taps of rows outside the image
    padded = grad.new_zeros(n, grad.shape[1], rows_p, row_len)
    padded[:, :, TOP:TOP + oh_n, LEFT:LEFT + ow_n] = grad
    out = grad.new_empty(shape)
    with numba_region():
        _input_grad(padded.view(-1).numpy(), weight.detach().permute(1, 2, 3, 0).contiguous().numpy(),
                    out.view(-1).numpy(), rows_p, row_len, h, width, width % 2 == 0)
    return out


class _FirstConv(torch.autograd.Function):
    """``conv2d(x, weight, bias, stride=2)`` (the same call as the module's), its input gradient by ``input_grad``."""

    @staticmethod
    def forward(ctx, x, weight, bias, check):
        ctx.save_for_backward(weight, x if check else None)
        ctx.shape = tuple(x.shape)
        return F.conv2d(x, weight, bias, 2)

    @staticmethod
    def backward(ctx, grad):
        weight, x = ctx.saved_tensors
        grad = grad.contiguous()
        if x is None:  # a shape whose gradient was checked
            return input_grad(grad, weight, ctx.shape), None, None, None
        theirs = torch.ops.aten.convolution_backward(grad, x, weight, None, [2, 2], [0, 0], [1, 1], False, [0, 0], 1,
                                                     (True, False, False))[0]  # what autograd computes
        if not _CHECKED["off"]:
            if torch.equal(input_grad(grad, weight, ctx.shape), theirs):
                _CHECKED["shapes"].add(ctx.shape)
            else:
                _CHECKED["off"] = True
                log.info("the first convolution's input gradient differs from oneDNN's at %s on this CPU: oneDNN "
                         "computes it from now on", ctx.shape)
        return theirs, None, None, None


class FirstConv2d(nn.Conv2d):
    """Lucent's ``conv2d0`` with its input gradient from ``input_grad`` where one is wanted (a feature visualisation:
    the image requires a gradient, the weights do not); otherwise the module as it was."""

    def forward(self, x):
        if (numba is None or _CHECKED["off"] or not torch.is_grad_enabled() or not x.requires_grad
                or self.weight.requires_grad or x.device.type != "cpu" or x.dtype != torch.float32):
            return super().forward(x)
        return _FirstConv.apply(x, self.weight, self.bias, tuple(x.shape) not in _CHECKED["shapes"])


def fast_first_conv_(model: nn.Module) -> None:
    """``model.conv2d0_pre_relu_conv`` made a ``FirstConv2d`` in place, where it is the convolution above."""
    conv = getattr(model, "conv2d0_pre_relu_conv", None)
    if (type(conv) is nn.Conv2d and conv.in_channels == 3 and conv.kernel_size == (7, 7) and conv.stride == (2, 2)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1):
        conv.__class__ = FirstConv2d
