# GENERATED from nbs/02_harvesting.ipynb by `python -m helpers export`: edit the chapter, not this file
# (tests/test_export.py fails when the two differ).
"""Which grid positions of a layer's output a harvest keeps (chapter 02)."""

import torch

SAMPLINGS = ("top-norm", "norm-weighted")


def select_positions(acts: torch.Tensor, per_image: int, sampling: str, uniforms: torch.Tensor | None = None):
    """Pick ``per_image`` grid positions per image from one layer's output ``acts`` [B, C, H, W].

    Returns (vectors [B, P, C], positions [B, P] as y * W + x, norms [B, P] float32).
    ``uniforms`` [B, P] in [0, 1) drive the norm-weighted draws.

    Defined in chapter 02, *Harvesting activation vectors* (nbs/02_harvesting.ipynb).
    """
    b, c, h, w = acts.shape
    if sampling == "top-norm" and per_image > h * w:
        raise ValueError(f"--per-image {per_image} exceeds the {h}x{w} grid of positions")
    flat = acts.flatten(2).transpose(1, 2)  # [B, HW, C]: one vector per grid cell
    norms = flat.float().norm(dim=-1)  # [B, HW]
    if sampling == "top-norm":
        pos = norms.topk(per_image, dim=1).indices
    elif sampling == "norm-weighted":
        # P(position) = norm / sum of norms, with replacement: where each uniform falls in the cumulative sum
        cdf = norms.cumsum(dim=1)
        pos = torch.searchsorted(cdf, uniforms.to(cdf) * cdf[:, -1:], right=True).clamp_max(h * w - 1)
    else:
        raise ValueError(f"sampling {sampling!r} is unknown; choose from {', '.join(SAMPLINGS)}")
    vectors = flat.gather(1, pos.unsqueeze(-1).expand(-1, -1, c))
    return vectors, pos, norms.gather(1, pos)
