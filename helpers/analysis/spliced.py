# GENERATED from nbs/03_training.ipynb by `python -m helpers export`: edit the chapter, not this file
# (tests/test_export.py fails when the two differ).
"""The spliced-in evaluation (chapter 03): how much of the network an SAE keeps when its reconstruction
replaces a layer's output, in all channels or one branch at a time."""

import torch

from helpers.data.inception import clean_pass, spliced_log_probs


@torch.no_grad()
def reconstruct_positions(sae, acts: torch.Tensor) -> torch.Tensor:
    """``acts`` [B, C, H, W] with every position's vector replaced by the SAE's reconstruction.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    b, c, h, w = acts.shape
    return sae(acts.permute(0, 2, 3, 1).reshape(-1, c)).reshape(b, h, w, c).permute(0, 3, 1, 2)


@torch.no_grad()
def spliced_evaluation(model, layer: str, sae, x: torch.Tensor, slices: dict, floors: list[dict] | None = None,
                       clean: tuple | None = None) -> list[dict]:
    """Top-1 agreement with the clean network and KL(clean || spliced) on ``x``, for the SAE's reconstruction
    spliced in at ``layer`` (all channels, then each branch of ``slices`` alone, the other channels kept) and
    for two floors: the layer zeroed and replaced by its mean vector (over ``x``'s images and positions).
    ``floors``: the floors' rows, already measured on the same ``x`` (a sweep of many SAEs of one layer);
    ``clean``: ``clean_pass(model, layer, x)``, where the caller has it (the same sweep).

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    clean, acts = clean or clean_pass(model, layer, x)
    rec = reconstruct_positions(sae, acts)  # once: every SAE case below splices from it

    def branch_only(channels):
        out = acts.clone()
        out[:, channels[0]:channels[1]] = rec[:, channels[0]:channels[1]]
        return out

    cases = {"SAE reconstruction": lambda: rec,
             **{f"SAE, {b} branch only": (lambda s=s: branch_only(s)) for b, s in slices.items()},
             "zeros (floor)": lambda: torch.zeros_like(acts),
             "mean vector (floor)": lambda: acts.mean(dim=(0, 2, 3), keepdim=True).expand_as(acts).clone()}
    rows = [{k: r[k] for k in ("layer", "spliced in", "top-1 agreement", "KL")} for r in floors or []]
    for name in (r["spliced in"] for r in rows):
        del cases[name]
    for name, make in cases.items():
        replaced = make()
        q = spliced_log_probs(model, layer, x, lambda _: replaced, acts=acts)  # the layers after it
        kl = (clean.exp() * (clean - q)).sum(dim=1).mean()
        rows.append({"layer": layer, "spliced in": name, "top-1 agreement": float((q.argmax(1) == clean.argmax(1)).float().mean()),
                     "KL": float(kl)})
    floors = {name: next(r["KL"] for r in rows if r["spliced in"] == f"{name} (floor)") for name in ("mean vector", "zeros")}
    for r in rows:
        r["KL recovered"] = 1 - r["KL"] / floors["mean vector"] if floors["mean vector"] > 0 else float("nan")
        r["KL recovered (zero)"] = 1 - r["KL"] / floors["zeros"] if floors["zeros"] > 0 else float("nan")
    return rows
