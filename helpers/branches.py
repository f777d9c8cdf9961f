"""Branch specialization: how each feature's decoder vector splits over a layer's branches.

For a decoder vector d (one row of ``W_dec``, length = layer width) and a branch's channel
slice S, the paper's fraction is

    fraction(d, S) = ||relu(d[S])|| / ||relu(d)||

(``positive=True``); ``positive=False`` gives the plain ||d[S]|| / ||d||. A fraction means
little on its own: a random direction already puts about sqrt(|S| / width) of its norm in a
branch. ``baseline`` gives the distribution of the fraction for random directions (Gaussian)
and for the decoder vectors with their channels shuffled; a feature is *specialised* to a
branch when its fraction exceeds that baseline's upper quantile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .inception import BRANCHES

Slices = dict[str, tuple[int, int]]


def fraction_in_branch(decoder: torch.Tensor | np.ndarray, slices: Slices, positive: bool = True) -> np.ndarray:
    """[n_features, 4]: the fraction of each decoder vector's norm in each branch (BRANCHES order)."""
    d = torch.as_tensor(np.asarray(decoder) if not isinstance(decoder, torch.Tensor) else decoder).float()
    if positive:
        d = d.clamp_min(0)
    total = d.norm(dim=1)
    parts = torch.stack([d[:, s:e].norm(dim=1) for s, e in (slices[b] for b in BRANCHES)], dim=1)
    return torch.where(total[:, None] > 0, parts / total.clamp_min(1e-12)[:, None], 0.0).cpu().numpy()


@dataclass
class Baseline:
    """Fractions of random directions: ``samples`` [n, 4]; ``threshold`` [4] its upper quantile."""

    kind: str
    samples: np.ndarray
    quantile: float

    @property
    def threshold(self) -> np.ndarray:
        return np.quantile(self.samples, self.quantile, axis=0)

    @property
    def mean(self) -> np.ndarray:
        return self.samples.mean(axis=0)


def baseline(decoder, slices: Slices, kind: str = "shuffled", positive: bool = True, n: int = 20_000,
             quantile: float = 0.99, seed: int = 0) -> Baseline:
    """The fraction a branch gets by chance.

    kind="gaussian": isotropic random directions of the layer's width.
    kind="shuffled": the decoder vectors themselves, each with its channels permuted at random
    (same values, no alignment with any branch); resampled to ``n`` vectors.
    """
    d = np.asarray(decoder.detach().cpu() if isinstance(decoder, torch.Tensor) else decoder, dtype=np.float32)
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        random = rng.standard_normal((n, d.shape[1]), dtype=np.float32)
    elif kind == "shuffled":
        rows = d[rng.integers(0, len(d), n)]
        random = np.take_along_axis(rows, rng.random(rows.shape).argsort(axis=1), axis=1)
    else:
        raise ValueError(f"baseline kind {kind!r}; choose 'gaussian' or 'shuffled'")
    return Baseline(kind, fraction_in_branch(random, slices, positive), quantile)


def excess(fractions: np.ndarray, base: Baseline) -> np.ndarray:
    """[n, 4]: each fraction minus the baseline's mean for that branch."""
    return fractions - base.mean[None, :]


def specialised(fractions: np.ndarray, base: Baseline, alive: np.ndarray | None = None) -> np.ndarray:
    """[n, 4] bool: fraction above the baseline's upper quantile (dead features excluded)."""
    mask = fractions > base.threshold[None, :]
    if alive is not None:
        mask &= np.asarray(alive, bool)[:, None]
    return mask


def dominant_branch(fractions: np.ndarray, base: Baseline | None = None) -> np.ndarray:
    """[n] index into BRANCHES of each feature's most over-represented branch (by excess)."""
    return (excess(fractions, base) if base is not None else fractions).argmax(axis=1)


def specialisation_table(fractions: np.ndarray, base: Baseline, alive: np.ndarray | None = None) -> list[dict]:
    """Per branch: features specialised to it, the count expected by chance, and their ratio."""
    mask = specialised(fractions, base, alive)
    n = int(mask.shape[0] if alive is None else np.asarray(alive, bool).sum())
    expected = n * (1 - base.quantile)
    return [{"branch": b, "specialised": int(mask[:, i].sum()), "expected by chance": round(expected, 1),
             "ratio": round(float(mask[:, i].sum()) / expected, 2) if expected else float("nan"),
             "threshold": round(float(base.threshold[i]), 3)} for i, b in enumerate(BRANCHES)]


def same_branch_share(edges: np.ndarray, src_branch: np.ndarray, dst_branch: np.ndarray, n_perm: int = 2000,
                      seed: int = 0) -> dict:
    """The paper's cross-layer claim as a number.

    edges: [m, 2] (source feature, target feature) of strong circuit edges; src_branch and
    dst_branch give each feature's specialised branch index, or -1 where not specialised.
    Returns the share of edges between specialised features whose two ends share a branch
    type, and the same share when the targets' branches are permuted (chance).
    """
    s, t = src_branch[edges[:, 0]], dst_branch[edges[:, 1]]
    keep = (s >= 0) & (t >= 0)
    s, t = s[keep], t[keep]
    if len(s) == 0:
        return {"edges": 0, "share_same": float("nan"), "chance": float("nan"), "p_value": float("nan")}
    observed = float((s == t).mean())
    rng = np.random.default_rng(seed)
    null = np.array([(s == rng.permutation(t)).mean() for _ in range(n_perm)])
    return {"edges": int(len(s)), "share_same": observed, "chance": float(null.mean()),
            "p_value": float(((null >= observed).sum() + 1) / (n_perm + 1))}


# the paper's appendix figures: figure number -> (layer, branch)
PAPER_FIGURES = {5: ("mixed4d", "1x1"), 6: ("mixed4d", "5x5"), 7: ("mixed4c", "5x5"), 8: ("mixed4a", "5x5"),
                 9: ("mixed4b", "5x5"), 10: ("mixed4e", "5x5")}


def most_specialised(fractions: np.ndarray, base: Baseline, branch: str, n: int | None = 10,
                     alive: np.ndarray | None = None) -> list[int]:
    """The ``n`` (None: all) live features with the largest excess fraction in ``branch`` (figure 1's pick)."""
    b = BRANCHES.index(branch)
    score = excess(fractions, base)[:, b].copy()
    if alive is not None:
        score[~np.asarray(alive, bool)] = -np.inf
    order = np.argsort(-score)
    return [int(i) for i in order[:n] if np.isfinite(score[i])]  # order[:None] is all


def specialised_branch(fractions: np.ndarray, base: Baseline, alive: np.ndarray | None = None) -> np.ndarray:
    """[n] the branch (index) a feature is specialised to, by largest excess; -1 if none."""
    mask = specialised(fractions, base, alive)
    best = np.where(mask, excess(fractions, base), -np.inf).argmax(axis=1)
    return np.where(mask.any(axis=1), best, -1)


def layer_table(analyses: dict) -> list[dict]:
    """``specialisation_table`` for every analysed layer (shuffled-channel baseline)."""
    return [{"layer": layer, **row} for layer, a in analyses.items()
            for row in specialisation_table(a["fractions"], a["shuffled"], a["alive"])]


def selection_table(analyses: dict, n: int = 5) -> list[dict]:
    """Figure 1's selection: per layer and branch, the most specialised live features."""
    return [{"layer": layer, "branch": b, "features": ", ".join(map(str, most_specialised(
        a["fractions"], a["shuffled"], b, n, a["alive"])))} for layer, a in analyses.items() for b in BRANCHES]
