"""The first convolution's input gradient: the documented chains of fused multiply-adds, oneDNN's numbers in a
network, and oneDNN's own where they differ."""

import numpy as np
import pytest
import torch
from torch import nn

from helpers.data import conv_input_grad as cig
from helpers.data.inception import LayerCapture, load_model


def _chains(g: np.ndarray, w: np.ndarray, h: int, width: int) -> np.ndarray:
    """The order the module's docstring states, one fused multiply-add at a time (a float64 sum of an exact float64
    product, rounded to float32), over every pixel at once: truth that does not depend on this CPU's oneDNN."""
    n, n_out, oh_n, ow_n = g.shape
    k = w.shape[2]
    out = np.zeros((n, w.shape[1], h, width), np.float32)
    for ih in range(h):
        for iw in range(width):
            taps = [(kh, kw) for kh in range(k) for kw in range(k) if (ih - kh) % 2 == 0 and (iw - kw) % 2 == 0
                    and 0 <= (ih - kh) // 2 < oh_n and 0 <= (iw - kw) // 2 < ow_n]
            groups = ([[t for t in taps if t[1] == kw] for kw in sorted({t[1] for t in taps})] if width % 2 == 0
                      else [taps])  # even width: one chain per kw, the chains added in order
            total = np.zeros((n, w.shape[1]), np.float32)
            for group in groups:
                acc = np.zeros((n, w.shape[1]), np.float32)
                for kh, kw in group:
                    for o in range(n_out):
                        product = g[:, o, (ih - kh) // 2, (iw - kw) // 2, None].astype(np.float64) * w[o, :, kh, kw]
                        acc = (acc.astype(np.float64) + product).astype(np.float32)
                total = total + acc
            out[:, :, ih, iw] = total
    return out


@pytest.mark.parametrize("width", [13, 14])
def test_the_gradient_is_the_documented_chains_of_fused_multiply_adds(width):
    torch.manual_seed(0)
    w = torch.randn(64, 3, 7, 7)
    g = torch.randn(2, 64, 4, (width - 7) // 2 + 1)
    g[g.abs() < 0.4] = 0  # exact zeros, as a ReLU's and a max pool's backward leave them
    got = cig.input_grad(g, w, (2, 3, 13, width)).numpy()
    assert np.array_equal(got, _chains(g.numpy(), w.numpy(), 13, width))


def _gradient(model, x):
    x = x.clone().requires_grad_(True)
    out = LayerCapture(model, ["mixed3a"])(x)["mixed3a"]
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return x.grad


def test_in_the_network_it_is_onednns_gradient_and_checked_once_per_shape(monkeypatch):
    monkeypatch.setattr(cig, "_CHECKED", {"shapes": set(), "off": False})
    calls = []
    real = cig.input_grad
    monkeypatch.setattr(cig, "input_grad", lambda *a: calls.append(1) or real(*a))
    ours = load_model("random")[0]
    assert type(ours.conv2d0_pre_relu_conv) is cig.FirstConv2d
    plain = load_model("random")[0]
    plain.conv2d0_pre_relu_conv.__class__ = nn.Conv2d  # oneDNN's gradient
    for size in ((61, 61), (60, 62), (64, 57)):  # the padded image: odd and even widths and heights
        x = torch.randn(2, 3, *size) * 60
        expected = _gradient(plain, x)
        first = _gradient(ours, x)  # checked against oneDNN: oneDNN's returned
        if cig._CHECKED["off"]:
            pytest.skip("this CPU's oneDNN sums the first convolution's input gradient in another order")
        assert tuple(s + 5 for s in size) in {s[2:] for s in cig._CHECKED["shapes"]}
        n_calls = len(calls)
        second = _gradient(ours, x)  # the kernel's alone
        assert len(calls) == n_calls + 1
        assert torch.equal(first, expected) and torch.equal(second, expected)


def test_a_gradient_that_differs_from_onednns_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(cig, "_CHECKED", {"shapes": set(), "off": False})
    real = cig.input_grad

    def off_by_one_ulp(*args):
        out = real(*args)
        out.view(-1)[7] = torch.nextafter(out.view(-1)[7], torch.tensor(np.inf))
        return out

    monkeypatch.setattr(cig, "input_grad", off_by_one_ulp)
    ours, plain = load_model("random")[0], load_model("random")[0]
    plain.conv2d0_pre_relu_conv.__class__ = nn.Conv2d
    x = torch.randn(2, 3, 61, 61) * 60
    assert torch.equal(_gradient(ours, x), _gradient(plain, x))
    assert cig._CHECKED["off"] and not cig._CHECKED["shapes"]
    assert torch.equal(_gradient(ours, x), _gradient(plain, x))  # oneDNN's from now on
