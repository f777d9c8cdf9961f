# GENERATED from nbs/03_training.ipynb by `python -m helpers export`: edit the chapter, not this file
# (tests/test_export.py fails when the two differ).
"""The TopK SAE and its loss as the paper writes them (chapter 03): the reference that the fast
``helpers.sae.TopKSAE`` (sparse backward pass, Triton decoder) is tested equal to, and the loss
``helpers.train`` minimises."""

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


@torch.no_grad()
def spliced_log_probs(model, layer: str, x: torch.Tensor, replace=None) -> torch.Tensor:
    """The network's log class probabilities [B, classes] on input ``x``, with ``layer``'s output [B, C, H, W]
    replaced by ``replace(output)`` (None: the clean network). Taken from the logits in float64, so that the
    KL of two nearly equal distributions is not lost to rounding.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    logits = {}
    hooks = [model.softmax2_pre_activation_matmul.register_forward_hook(
        lambda module, inputs, out: logits.__setitem__("z", out))]
    if replace is not None:
        hooks.append(getattr(model, layer).register_forward_hook(lambda module, inputs, out: replace(out)))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return torch.log_softmax(logits["z"].double(), dim=-1)


def clean_pass(model, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean network's log class probabilities on ``x`` and ``layer``'s output [B, C, H, W], from one pass.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    seen = {}
    log_probs = spliced_log_probs(model, layer, x, lambda a: seen.__setitem__("acts", a))  # the hook only looks
    return log_probs, seen["acts"]


@torch.no_grad()
def reconstruct_positions(sae, acts: torch.Tensor) -> torch.Tensor:
    """``acts`` [B, C, H, W] with every position's vector replaced by the SAE's reconstruction.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    b, c, h, w = acts.shape
    return sae(acts.permute(0, 2, 3, 1).reshape(-1, c)).reshape(b, h, w, c).permute(0, 3, 1, 2)


@torch.no_grad()
def spliced_evaluation(model, layer: str, sae, x: torch.Tensor, slices: dict) -> list[dict]:
    """Top-1 agreement with the clean network and KL(clean || spliced) on ``x``, for the SAE's reconstruction
    spliced in at ``layer`` (all channels, then each branch of ``slices`` alone, the other channels kept) and
    for two floors: the layer zeroed and replaced by its mean vector (over ``x``'s images and positions).

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    clean, acts = clean_pass(model, layer, x)
    rec = reconstruct_positions(sae, acts)  # once: every SAE case below splices from it

    def branch_only(channels):
        out = acts.clone()
        out[:, channels[0]:channels[1]] = rec[:, channels[0]:channels[1]]
        return out

    cases = {"SAE reconstruction": lambda: rec,
             **{f"SAE, {b} branch only": (lambda s=s: branch_only(s)) for b, s in slices.items()},
             "zeros (floor)": lambda: torch.zeros_like(acts),
             "mean vector (floor)": lambda: acts.mean(dim=(0, 2, 3), keepdim=True).expand_as(acts).clone()}
    rows = []
    for name, make in cases.items():
        replaced = make()
        q = spliced_log_probs(model, layer, x, lambda _: replaced)
        kl = (clean.exp() * (clean - q)).sum(dim=1).mean()
        rows.append({"layer": layer, "spliced in": name, "top-1 agreement": float((q.argmax(1) == clean.argmax(1)).float().mean()),
                     "KL": float(kl)})
    floor = next(r["KL"] for r in rows if r["spliced in"] == "mean vector (floor)")
    for r in rows:
        r["KL recovered"] = 1 - r["KL"] / floor if floor > 0 else float("nan")
    return rows
