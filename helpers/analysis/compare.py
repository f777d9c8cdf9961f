# GENERATED from nbs/09_comparing_saes.ipynb by `python -m helpers export`: edit the chapter, not this file
# (tests/test_export.py fails when the two differ).
"""Comparing two SAEs of one layer (chapter 09): decoder directions matched one to one, and the
reconstruction and sparsity of each on the same vectors."""

import numpy as np
import torch


def match_features(dec_a, dec_b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one-to-one matching of two dictionaries' rows [n, d] and [m, d] that maximises the total
    cosine: (rows of A, their partners in B, the cosines), min(n, m) pairs, by descending cosine.

    Defined in chapter 09, *Comparing SAEs: two seeds, and ours against the author's* (nbs/09_comparing_saes.ipynb).
    """
    from scipy.optimize import linear_sum_assignment

    a = torch.nn.functional.normalize(torch.as_tensor(np.asarray(dec_a), dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.as_tensor(np.asarray(dec_b), dtype=torch.float64), dim=1)
    cos = (a @ b.T).numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    order = np.argsort(-cos[rows, cols])
    return rows[order], cols[order], cos[rows, cols][order]


def matched_share(cosines: np.ndarray, thresholds=(0.7, 0.9)) -> dict[str, float]:
    """The share of matched pairs whose cosine exceeds each threshold, and the median cosine.

    Defined in chapter 09, *Comparing SAEs: two seeds, and ours against the author's* (nbs/09_comparing_saes.ipynb).
    """
    out = {f"matched above {t}": float((cosines > t).mean()) for t in thresholds}
    out["median cosine"] = float(np.median(cosines))
    return out


@torch.no_grad()
def reconstruction(sae, vectors: np.ndarray, batch: int = 8192) -> dict[str, float]:
    """FVU (sum of squared errors over the total variance) and L0 (latents firing per vector) of
    ``sae`` on ``vectors`` [N, d].

    Defined in chapter 09, *Comparing SAEs: two seeds, and ours against the author's* (nbs/09_comparing_saes.ipynb).
    """
    x = torch.from_numpy(np.asarray(vectors, dtype=np.float32))
    err = fired = 0.0
    for s in range(0, len(x), batch):
        code = sae.encode_topk(x[s:s + batch])
        err += float((sae.decode_topk(code) - x[s:s + batch]).pow(2).sum())
        fired += float((code.values > 0).sum())
    return {"FVU": err / float((x - x.mean(0)).pow(2).sum()), "L0": fired / len(x)}
