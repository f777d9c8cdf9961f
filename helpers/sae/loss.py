# GENERATED from nbs/03_training.ipynb by `python -m helpers export`: edit the chapter, not this file
# (tests/test_export.py fails when the two differ).
"""The TopK SAE and its loss as the paper writes them (chapter 03): the reference that the fast
``helpers.sae.model.TopKSAE`` (sparse backward pass, Triton decoder) is tested equal to, and the loss
``helpers.sae.train`` minimises."""

import torch


def topk_sae(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The SAE's forward pass, densely: x [batch, d_in] -> (x_hat [batch, d_in], z [batch, d_sae]).

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    pre = (x - b_dec) @ W_enc + b_enc
    kept = pre.topk(k, dim=-1).indices
    z = torch.zeros_like(pre).scatter(-1, kept, torch.relu(pre.gather(-1, kept)))
    return z @ W_dec + b_dec, z


def normalized_mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The paper's loss: the mean over vectors of ||x' - x||^2 / ||x||^2.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    return ((x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-12)).mean()


def fvu(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: sum ||x - x'||^2 / sum ||x - mean(x)||^2.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def training_loss(x: torch.Tensor, x_hat: torch.Tensor, aux_recon: torch.Tensor | None = None,
                  aux_coef: float = 1 / 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(total, normalised MSE, AuxK loss or None): the normalised MSE plus ``aux_coef`` times the FVU of
    the dead latents' reconstruction ``aux_recon`` of the residual x - x_hat (Gao et al.'s AuxK).

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    loss = normalized_mse(x_hat, x)
    if aux_recon is None:
        return loss, loss, None
    aux = fvu(aux_recon, (x - x_hat).detach())
    return loss + aux_coef * aux, loss, aux


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to the rows of x (b_dec's start).

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    x = x.float()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * m.norm().clamp_min(1e-8):
            return new
        m = new
    return m
