# GENERATED from nbs/03_training.ipynb by `python -m helpers export`: edit the chapter, not this file
# (tests/test_export.py fails when the two differ).
"""Spatial coherence of SAE features (chapter 03): Moran's I of each feature's map over the layer's grid,
against the same maps with their positions shuffled."""

import numpy as np
import torch

from helpers.data.inception import clean_pass


def morans_i(maps: torch.Tensor) -> torch.Tensor:
    """Moran's I of each map in ``maps`` [..., H, W] with rook (4-neighbour) weights; NaN for a constant map.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    z = maps.double() - maps.double().mean(dim=(-2, -1), keepdim=True)
    h, w = maps.shape[-2:]
    pairs = (z[..., 1:, :] * z[..., :-1, :]).sum(dim=(-2, -1)) + (z[..., :, 1:] * z[..., :, :-1]).sum(dim=(-2, -1))
    weights = 2 * ((h - 1) * w + h * (w - 1))  # every neighbour pair counted in both directions
    total = z.pow(2).sum(dim=(-2, -1))
    return torch.where(total > 0, (h * w / weights) * 2 * pairs / total, torch.full_like(total, float("nan")))


@torch.no_grad()
def spatial_coherence(model, layer: str, sae, x: torch.Tensor, batch: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per feature of ``sae`` over the images ``x``: the mean Moran's I of its maps where it fires at two or more
    positions (``moran``, NaN where it never does), the same for the maps with positions shuffled (``shuffled``),
    and the number of maps counted (``maps``).

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    g = torch.Generator().manual_seed(seed)
    n = sae.d_sae
    sums, shuffled, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), torch.zeros(n)
    for s in range(0, len(x), batch):
        _, acts = clean_pass(model, layer, x[s:s + batch])
        b, c, h, w = acts.shape
        z = sae.encode(acts.permute(0, 2, 3, 1).reshape(-1, c)).reshape(b, h * w, n).permute(0, 2, 1)  # [b, n, hw]
        fires = (z > 0).sum(-1) >= 2  # [b, n]
        order = torch.randperm(h * w, generator=g)
        for maps, acc in ((z, sums), (z[..., order], shuffled)):
            i = morans_i(maps.reshape(b, n, h, w))
            acc += torch.where(fires, i.nan_to_num(0.0), torch.zeros_like(i)).sum(0)
        counts += fires.sum(0)
    seen = counts.clamp_min(1).double()
    nan = torch.full((n,), float("nan"), dtype=torch.float64)
    return {"moran": torch.where(counts > 0, sums / seen, nan), "shuffled": torch.where(counts > 0, shuffled / seen, nan),
            "maps": counts}


def coherence_summary(c: dict) -> dict:
    """A layer's line of the coherence table: how many features fired in two or more positions of some image,
    their mean Moran's I, the shuffled maps' mean, and the fraction of features above the 99th percentile of the
    shuffled values (chance: 1%).

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    measured = (torch.as_tensor(c["maps"]) > 0).numpy()
    moran, shuffled = (torch.as_tensor(c[k], dtype=torch.float64).numpy()[measured] for k in ("moran", "shuffled"))
    if not measured.any():
        return {"features measured": 0}
    cut = float(np.quantile(shuffled, 0.99))
    return {"features measured": int(measured.sum()), "mean Moran's I": round(float(moran.mean()), 4),
            "shuffled positions": round(float(shuffled.mean()), 4),
            "above the shuffled 99th percentile": round(float((moran > cut).mean()), 4)}
