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


def batchtopk_code(pre: torch.Tensor, k: int) -> torch.Tensor:
    """BatchTopK's code of a batch: the k x batch largest ReLU'd pre-activations of the whole batch, 0 elsewhere.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    acts = torch.relu(pre).flatten()
    kept = acts.topk(k * pre.shape[0]).indices
    return torch.zeros_like(acts).scatter(0, kept, acts.gather(0, kept)).view_as(pre)


def batchtopk_sae(x, W_enc, b_enc, W_dec, b_dec, k: int):
    """BatchTopK in training, densely: (x_hat, z).

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    z = batchtopk_code((x - b_dec) @ W_enc + b_enc, k)
    return z @ W_dec + b_dec, z


def threshold_sae(x, W_enc, b_enc, W_dec, b_dec, threshold: torch.Tensor):
    """Every family but TopK once trained (SAELens' jumprelu): z_i = ReLU(p_i) [p_i > theta_i]; (x_hat, z).

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    pre = (x - b_dec) @ W_enc + b_enc
    z = torch.relu(pre) * (pre > threshold)
    return z @ W_dec + b_dec, z


def matryoshka_prefixes(d_sae: int, count: int) -> list[int]:
    """Prefix sizes n / 2^(P-1), ..., n / 2, n.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    return [max(1, d_sae >> (count - 1 - j)) for j in range(count)]


def matryoshka_loss(x, z, W_dec, b_dec, prefixes: list[int]) -> torch.Tensor:
    """The mean over prefixes m of the normalised MSE of the reconstruction from latents [0, m) alone.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    return torch.stack([normalized_mse(z[:, :m] @ W_dec[:m] + b_dec, x) for m in prefixes]).mean()


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The kernel K of the straight-through estimates: 1 on (-1/2, 1/2), 0 elsewhere.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """p H(p - theta); d/dp = H(p - theta), d/dtheta = -(theta / eps) K((p - theta) / eps) (summed to theta's shape:
    theta [d_sae] against p [batch, d_sae], or one theta per entry).

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        g_theta = -(theta / ctx.eps) * rectangle((pre - theta) / ctx.eps) * grad
        return grad * (pre > theta), g_theta.sum_to_size(theta.shape), None


class Step(torch.autograd.Function):
    """H(p - theta); no gradient to p, d/dtheta = -(1 / eps) K((p - theta) / eps).

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        return None, (-(1 / ctx.eps) * rectangle((pre - theta) / ctx.eps) * grad).sum_to_size(theta.shape), None


def jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta: torch.Tensor, eps: float):
    """JumpReLU in training, densely: (x_hat, z, L0 per vector, differentiable in theta by the STE).

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    pre = (x - b_dec) @ W_enc + b_enc
    z = JumpReLU.apply(pre, theta, eps)
    return z @ W_dec + b_dec, z, Step.apply(pre, theta, eps).sum(-1)


def least_squares_scale(x_c: torch.Tensor, r: torch.Tensor) -> float:
    """The s minimising sum ||x_c - s r||^2 over the rows: <x_c, r> / <r, r> (the SAE's starting scale;
    x_c = x - b_dec, r = the reconstruction minus b_dec at unit scale). 1 when r is 0.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    rr = float(r.double().pow(2).sum())
    return float((x_c.double() * r.double()).sum()) / rr if rr > 0 else 1.0


def reconstruction_stats(x: torch.Tensor, x_hat: torch.Tensor, l0: torch.Tensor) -> dict[str, float]:
    """The held-out measures beside FVU, as dictionary_learning reports them; ``l0`` [n] counts each vector's
    active latents.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    x, x_hat = x.double(), x_hat.double()
    dot, xh2 = (x * x_hat).sum(-1), x_hat.pow(2).sum(-1)
    return {"L0": float(l0.double().mean()), "FVU": float(fvu(x_hat, x)),
            "cosine": float((dot / (x.norm(dim=-1) * x_hat.norm(dim=-1)).clamp_min(1e-12)).mean()),
            "L2 ratio": float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).mean()),
            "relative reconstruction bias": float(xh2.mean() / dot.mean())}
