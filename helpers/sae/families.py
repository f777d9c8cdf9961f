"""Training the SAE families after TopK (chapter 03, *Other SAE families*): BatchTopK, Matryoshka, JumpReLU.

Their codes have no fixed k per vector, so they train densely: the pre-activations [batch, d_sae],
the code, ``z @ W_dec``, and autograd's dense backward (about twice a TopK step of ``model``'s
sparse path; ``bench/bench_families.py`` measures it). The equations are chapter 03's
(``helpers.sae.loss``); this module computes them in fewer passes, tested equal to them, and keeps
each family's training state: BatchTopK's moving threshold, JumpReLU's penalty weight.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from helpers.sae.loss import JumpReLU, Step, matryoshka_prefixes, normalized_mse
from helpers.sae.model import SparseCode, TopKSAE

THRESHOLD_RATE = 0.01  # BatchTopK's threshold: this fraction of each batch's smallest kept activation (SAELens)
L0_STEER = 0.1  # JumpReLU: the penalty weight is multiplied by (L0 / target) ** L0_STEER each step
L0_COEF_RANGE = (1e-4, 1e4)


class FamilyOutput(NamedTuple):
    total: torch.Tensor  # the loss minimised
    loss: torch.Tensor  # the normalised MSE of the whole dictionary's reconstruction
    x_hat: torch.Tensor  # [batch, d_in]
    code: SparseCode  # values: the dense code z [batch, d_sae] (what the metrics count); indices None
    l0: torch.Tensor  # mean active latents per vector


def batch_cut(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The (k x batch)-th largest ReLU'd pre-activation of the batch: BatchTopK keeps the entries above it."""
    return torch.relu(pre).flatten().kthvalue(pre.numel() - k * pre.shape[0] + 1).values


@torch.no_grad()
def start(sae: TopKSAE, x: torch.Tensor) -> None:
    """Thresholds at the sample's BatchTopK cut (so every family starts as the BatchTopK code of k); JumpReLU's
    kernel width at the same value (as Rajamanoharan et al.'s defaults: threshold and bandwidth both 0.001)."""
    cut = float(batch_cut(sae.preacts(x), sae.k))
    sae.threshold.fill_(cut)
    if sae.architecture == "jumprelu":
        sae.bandwidth.fill_(cut)


def forward_train(sae: TopKSAE, x: torch.Tensor) -> FamilyOutput:
    """The family's loss on the batch x, with its training-state updates that do not need the gradient."""
    pre = sae.preacts(x)
    if sae.architecture == "jumprelu":
        eps = float(sae.bandwidth)
        z = JumpReLU.apply(pre, sae.threshold, eps)
        l0 = Step.apply(pre, sae.threshold, eps).sum(-1).mean()
        x_hat = z @ sae.W_dec + sae.b_dec
        loss = normalized_mse(x_hat, x)
        return FamilyOutput(loss + sae.l0_coef * l0 / sae.k, loss, x_hat, SparseCode(z.detach(), None), l0.detach())
    with torch.no_grad():
        cut = batch_cut(pre, sae.k)
        keep = (pre >= cut) & (pre > 0)  # the k x batch largest (ties at the cut: none for real-valued data)
    z = torch.relu(pre) * keep
    with torch.no_grad():
        smallest = torch.where(keep, pre, torch.full_like(pre, float("inf"))).min()
        if torch.isfinite(smallest):
            sae.threshold.lerp_(smallest.expand_as(sae.threshold), THRESHOLD_RATE)
    if sae.architecture == "batchtopk":
        x_hat = z @ sae.W_dec + sae.b_dec
        loss = normalized_mse(x_hat, x)
        return FamilyOutput(loss, loss, x_hat, SparseCode(z.detach(), None), keep.sum(-1).float().mean())
    losses, x_hat, begin = [], sae.b_dec.expand_as(x), 0  # Matryoshka: each prefix's reconstruction adds a slice
    for end in matryoshka_prefixes(sae.d_sae, sae.prefixes):
        x_hat = x_hat + z[:, begin:end] @ sae.W_dec[begin:end]
        losses.append(normalized_mse(x_hat, x))
        begin = end
    return FamilyOutput(torch.stack(losses).mean(), losses[-1], x_hat, SparseCode(z.detach(), None),
                        keep.sum(-1).float().mean())


@torch.no_grad()
def after_step(sae: TopKSAE, out: FamilyOutput) -> None:
    """JumpReLU: thresholds stay >= 0 (the inference form's ReLU), and the penalty weight is steered to the target L0."""
    if sae.architecture == "jumprelu":
        sae.threshold.clamp_min_(0)
        ratio = float(out.l0) / sae.k
        sae.l0_coef.mul_(max(ratio, 1e-3) ** L0_STEER).clamp_(*L0_COEF_RANGE)
