"""Training the SAE families after TopK (chapter 03, *Other SAE families*): BatchTopK, Matryoshka, JumpReLU.

The equations are chapter 03's (``helpers.sae.loss``), written densely; this module computes the same numbers
and gradients on the latents that matter only, as the TopK SAE does (tested equal to the equations):

- BatchTopK and Matryoshka: each vector's top r pre-activations (r = 4k or what the last batch needed, doubled
  until provably enough: no row's r-th value reaches the batch's cut) are the only candidates for the batch's k x batch largest; the
  kept ones are a prefix of each row's candidates, padded to the busiest row with masked entries.
- JumpReLU: the latents above ``threshold - bandwidth / 2`` (active, or inside the straight-through window):
  every other latent has zero output and zero gradient in the equations.

Past the selection everything is ``model``'s sparse machinery: the kept pre-activations through
``KeptPreacts`` (sparse backward into the encoder) and the sparse decoder. Each family's training state is
kept here too: BatchTopK's moving threshold, JumpReLU's penalty weight.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from helpers.sae.loss import JumpReLU, Step, matryoshka_prefixes, normalized_mse
from helpers.sae.model import SparseCode, TopKSAE

THRESHOLD_RATE = 0.01  # BatchTopK's threshold: this fraction of each batch's smallest kept activation (SAELens)
L0_STEER = 0.1  # JumpReLU: the penalty weight is multiplied by (L0 / target) ** L0_STEER each step
L0_COEF_RANGE = (1e-4, 1e4)
CANDIDATES = 4  # BatchTopK's first candidates per vector: CANDIDATES x k
BANDWIDTH_DIVISOR = 4  # JumpReLU's kernel width: the starting threshold over this


class FamilyOutput(NamedTuple):
    total: torch.Tensor  # the loss minimised
    loss: torch.Tensor  # the normalised MSE of the whole dictionary's reconstruction
    x_hat: torch.Tensor  # [batch, d_in]
    code: SparseCode  # the kept latents (values 0 where padded), as the TopK SAE's
    l0: torch.Tensor  # mean active latents per vector


@torch.no_grad()
def batchtopk_select(sae: TopKSAE, x_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx [batch, m], keep [batch, m] bool, their pre-activations [batch, m], the cut): the batch's k x batch
    largest ReLU'd pre-activations, each row's sorted by value and padded (keep False) to the busiest row's count m."""
    k, n, d_sae = sae.k, x_c.shape[0], sae.d_sae
    r = min(d_sae, max(CANDIDATES * k, getattr(sae, "_batchtopk_candidates", 0)))  # the last batch's need, if more
    while True:
        values, idx = sae._select(x_c, r, None, 0)[:2]
        values, order = values.sort(dim=-1, descending=True)
        idx = idx.gather(1, order)
        cut = torch.relu(values).flatten().kthvalue(values.numel() - k * n + 1).values
        if r == d_sae or not bool((values[:, -1] >= cut.clamp_min(torch.finfo(values.dtype).tiny)).any()):
            break  # no row holds an entry at or above the cut beyond its r candidates: exact
        r = min(d_sae, 2 * r)
    keep = (values >= cut) & (values > 0)
    m = max(1, int(keep.sum(-1).max()))
    sae._batchtopk_candidates = min(d_sae, m + m // 4)  # a hint for the next batch (a speed hint, never the answer)
    return idx[:, :m], keep[:, :m], values[:, :m], cut


@torch.no_grad()
def jumprelu_select(sae: TopKSAE, x_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx [batch, m], their pre-activations): each row's latents above ``threshold - bandwidth / 2`` (padded with
    latents below it, whose output and gradients are zero)."""
    pre = torch.addmm(sae.b_enc, x_c, sae.encoder_weight.T)
    score = pre - (sae.threshold - float(sae.bandwidth) / 2)
    m = max(1, int((score > 0).sum(-1).max()))
    idx = score.topk(m, dim=-1, sorted=False).indices
    return idx, pre.gather(1, idx)


@torch.no_grad()
def start(sae: TopKSAE, x: torch.Tensor) -> None:
    """Thresholds at the sample's BatchTopK cut (so every family starts as the BatchTopK code of k); JumpReLU's
    kernel width a quarter of it (Rajamanoharan et al. start both at 0.001, where a threshold then grows far above
    it; a narrower window also keeps the latents a step must touch few)."""
    cut = float(batchtopk_select(sae, (x - sae.b_dec).detach())[3])  # the sample's BatchTopK cut, as calibrate
    sae.threshold.fill_(cut)
    if sae.architecture == "jumprelu":
        sae.bandwidth.fill_(cut / BANDWIDTH_DIVISOR)


def forward_train(sae: TopKSAE, x: torch.Tensor) -> FamilyOutput:
    """The family's loss on the batch x, with its training-state updates that do not need the gradient."""
    x_c = (x - sae.b_dec).detach()
    if sae.architecture == "jumprelu":
        idx, pre = jumprelu_select(sae, x_c)
        pre = sae._kept(x, x_c, idx, pre)  # differentiable (KeptPreacts: a backward over these latents only)
        theta, eps = sae.threshold[idx], float(sae.bandwidth)
        values = JumpReLU.apply(pre, theta, eps)
        l0 = Step.apply(pre, theta, eps).sum(-1).mean()
        x_hat = sae.decode_topk(SparseCode(values, idx))
        loss = normalized_mse(x_hat, x)
        return FamilyOutput(loss + sae.l0_coef * l0 / sae.k, loss, x_hat, SparseCode(values.detach(), idx), l0.detach())
    idx, keep, pre, _ = batchtopk_select(sae, x_c)
    pre = sae._kept(x, x_c, idx, pre)
    values = torch.relu(pre) * keep
    with torch.no_grad():
        smallest = torch.where(keep, pre, torch.full_like(pre, float("inf"))).min()
        if torch.isfinite(smallest):
            sae.threshold.lerp_(smallest.expand_as(sae.threshold), THRESHOLD_RATE)
    code, l0 = SparseCode(values, idx), keep.sum(-1).float().mean()
    x_hat = sae.decode_topk(code)
    if sae.architecture == "batchtopk":
        loss = normalized_mse(x_hat, x)
        return FamilyOutput(loss, loss, x_hat, SparseCode(values.detach(), idx), l0)
    losses = [normalized_mse(sae.decode_topk(SparseCode(values * (idx < m), idx)), x)  # Matryoshka: each prefix
              for m in matryoshka_prefixes(sae.d_sae, sae.prefixes)[:-1]] + [normalized_mse(x_hat, x)]
    return FamilyOutput(torch.stack(losses).mean(), losses[-1], x_hat, SparseCode(values.detach(), idx), l0)


@torch.no_grad()
def calibrate(sae: TopKSAE, x: torch.Tensor) -> None:
    """BatchTopK and Matryoshka, at the end of training: the inference threshold is the sample's own BatchTopK cut
    (so the trained SAE keeps k latents per vector on average, as it was trained to). The moving average of
    training lags when the pre-activations' scale moves, by far in a short run (24 steps of the smoke profile:
    33 latents per vector at inference for k = 8)."""
    if sae.architecture in ("batchtopk", "matryoshka"):
        sae.threshold.fill_(float(batchtopk_select(sae, (x - sae.b_dec).detach())[3]))


@torch.no_grad()
def after_step(sae: TopKSAE, out: FamilyOutput) -> None:
    """JumpReLU: thresholds stay >= 0 (the inference form's ReLU), and the penalty weight is steered to the target L0."""
    if sae.architecture == "jumprelu":
        sae.threshold.clamp_min_(0)
        ratio = float(out.l0) / sae.k
        sae.l0_coef.mul_(max(ratio, 1e-3) ** L0_STEER).clamp_(*L0_COEF_RANGE)
