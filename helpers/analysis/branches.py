# GENERATED from nbs/04_branch_specialization.ipynb by `python -m helpers export`: edit the chapter, not this file
# (tests/test_export.py fails when the two differ).
"""Branch specialization (chapter 04): how each SAE feature's decoder vector splits over a
layer's 1x1 / 3x3 / 5x5 / pool branches, against the split that chance gives."""

import functools
from dataclasses import dataclass

import numpy as np
import torch

from helpers.data.inception import BRANCHES

Slices = dict[str, tuple[int, int]]  # branch -> (first channel, end) in the layer's concatenation


def fraction_in_branch(decoder, slices: Slices, positive: bool = True) -> np.ndarray:
    """[n_features, 4]: ||relu(d[S])|| / ||relu(d)|| of each decoder vector d (rows of ``decoder``,
    [n_features, width]) and branch slice S, in BRANCHES order; ``positive=False``: ||d[S]|| / ||d||.

    Defined in chapter 04, *Branch specialization* (nbs/04_branch_specialization.ipynb).
    """
    d = torch.as_tensor(np.asarray(decoder) if not isinstance(decoder, torch.Tensor) else decoder).detach().float()
    width = max(end for _, end in slices.values())
    if d.ndim != 2 or d.shape[1] != width:
        raise ValueError(f"decoder vectors of width {d.shape[-1]} do not fit branch slices of a {width}-wide "
                         "layer; pass the slices of the layer the SAE was trained on")
    if positive:
        d = d.clamp_min(0)
    total = d.norm(dim=1)
    parts = torch.stack([d[:, start:end].norm(dim=1) for start, end in (slices[b] for b in BRANCHES)], dim=1)
    return torch.where(total[:, None] > 0, parts / total.clamp_min(1e-12)[:, None], 0.0).cpu().numpy()


@dataclass
class Baseline:
    """The fractions of random directions: ``samples`` [n, 4]; ``threshold`` [4] is their upper quantile.

    Defined in chapter 04, *Branch specialization* (nbs/04_branch_specialization.ipynb).
    """

    kind: str
    samples: np.ndarray
    quantile: float

    @functools.cached_property  # (read for every feature: computed once)
    def threshold(self) -> np.ndarray:
        """[4] the ``quantile`` of each branch's fraction by chance."""
        return np.quantile(self.samples, self.quantile, axis=0)

    @functools.cached_property
    def mean(self) -> np.ndarray:
        """[4] each branch's mean fraction by chance."""
        return self.samples.mean(axis=0)


def baseline(decoder, slices: Slices, kind: str = "shuffled", positive: bool = True, n: int = 20_000,
             quantile: float = 0.99, seed: int = 0) -> Baseline:
    """The fraction a branch gets by chance: ``kind="gaussian"`` (isotropic random directions of the
    layer's width) or ``kind="shuffled"`` (the decoder vectors with their channels permuted; ``n`` of them).

    Defined in chapter 04, *Branch specialization* (nbs/04_branch_specialization.ipynb).
    """
    d = np.asarray(decoder.detach().cpu() if isinstance(decoder, torch.Tensor) else decoder, dtype=np.float32)
    if kind == "gaussian":  # the same for every decoder of the layer's width: drawn once per process
        return Baseline(kind, _gaussian_fractions(d.shape[1], tuple(sorted(slices.items())), positive, n, seed), quantile)
    if kind != "shuffled":
        raise ValueError(f"baseline kind {kind!r}; choose 'gaussian' or 'shuffled'")
    rng = np.random.default_rng(seed)
    random = rng.permuted(d[rng.integers(0, len(d), n)], axis=1)  # each row's channels shuffled on its own
    return Baseline(kind, fraction_in_branch(random, slices, positive), quantile)


@functools.lru_cache(maxsize=32)
def _gaussian_fractions(width: int, slices: tuple, positive: bool, n: int, seed: int) -> np.ndarray:
    """``fraction_in_branch`` of ``n`` isotropic directions of the width, drawn from ``seed`` (read-only: shared).

    Defined in chapter 04, *Branch specialization* (nbs/04_branch_specialization.ipynb).
    """
    random = np.random.default_rng(seed).standard_normal((n, width), dtype=np.float32)
    fractions = fraction_in_branch(random, dict(slices), positive)
    fractions.flags.writeable = False
    return fractions


def excess(fractions: np.ndarray, base: Baseline) -> np.ndarray:
    """[n, 4]: each fraction minus the baseline's mean for that branch.

    Defined in chapter 04, *Branch specialization* (nbs/04_branch_specialization.ipynb).
    """
    return fractions - base.mean[None, :]


def specialised(fractions: np.ndarray, base: Baseline, alive: np.ndarray | None = None) -> np.ndarray:
    """[n, 4] bool: the fraction is above the baseline's upper quantile (dead features excluded).

    Defined in chapter 04, *Branch specialization* (nbs/04_branch_specialization.ipynb).
    """
    mask = fractions > base.threshold[None, :]
    if alive is not None:
        mask &= np.asarray(alive, bool)[:, None]
    return mask


def dominant_branch(fractions: np.ndarray, base: Baseline | None = None) -> np.ndarray:
    """[n] index into BRANCHES of each feature's most over-represented branch (largest excess).

    Defined in chapter 04, *Branch specialization* (nbs/04_branch_specialization.ipynb).
    """
    return (excess(fractions, base) if base is not None else fractions).argmax(axis=1)


def specialised_branch(fractions: np.ndarray, base: Baseline, alive: np.ndarray | None = None) -> np.ndarray:
    """[n] the branch index a feature is specialised to (its largest excess among those passed); -1 if none.

    Defined in chapter 04, *Branch specialization* (nbs/04_branch_specialization.ipynb).
    """
    mask = specialised(fractions, base, alive)
    best = np.where(mask, excess(fractions, base), -np.inf).argmax(axis=1)
    return np.where(mask.any(axis=1), best, -1)


def most_specialised(fractions: np.ndarray, base: Baseline, branch: str, n: int | None = 10,
                     alive: np.ndarray | None = None) -> list[int]:
    """The ``n`` (None: all) live features with the largest excess fraction in ``branch``, best first.

    Defined in chapter 04, *Branch specialization* (nbs/04_branch_specialization.ipynb).
    """
    b = BRANCHES.index(branch)
    score = excess(fractions, base)[:, b].copy()
    if alive is not None:
        score[~np.asarray(alive, bool)] = -np.inf
    order = np.argsort(-score)
    return [int(i) for i in order[:n] if np.isfinite(score[i])]


def specialisation_table(fractions: np.ndarray, base: Baseline, alive: np.ndarray | None = None) -> list[dict]:
    """Per branch: the features specialised to it, the count expected by chance, and their ratio.

    Defined in chapter 04, *Branch specialization* (nbs/04_branch_specialization.ipynb).
    """
    mask = specialised(fractions, base, alive)
    n = int(mask.shape[0] if alive is None else np.asarray(alive, bool).sum())
    expected = n * (1 - base.quantile)
    return [{"branch": b, "specialised": int(mask[:, i].sum()), "expected by chance": round(expected, 1),
             "ratio to chance": round(float(mask[:, i].sum()) / expected, 2) if expected else float("nan"),
             "threshold (fraction)": round(float(base.threshold[i]), 3)} for i, b in enumerate(BRANCHES)]


@dataclass
class BranchAnalysis:
    """A layer's branch fractions (``fractions`` [n, 4], ``plain`` [n, 4]), both baselines, and
    each feature's firing ``frequency`` [n] on the harvested vectors.

    Defined in chapter 04, *Branch specialization* (nbs/04_branch_specialization.ipynb).
    """

    layer: str
    slices: Slices
    fractions: np.ndarray
    plain: np.ndarray
    shuffled: Baseline
    gaussian: Baseline
    frequency: np.ndarray

    @property
    def alive(self) -> np.ndarray:
        """[n] bool: the features that fire at least once."""
        return self.frequency > 0

    def most_specialised(self, branch: str, n: int | None = 10) -> list[int]:
        """The live features with the largest excess in ``branch`` over the shuffled baseline."""
        return most_specialised(self.fractions, self.shuffled, branch, n, self.alive)

    def dominant(self, features=None) -> np.ndarray:
        """Each feature's dominant branch (index into BRANCHES), by excess over the shuffled baseline."""
        f = self.fractions if features is None else self.fractions[np.asarray(features, int)]
        return dominant_branch(f, self.shuffled)

    def specialised_branch(self) -> np.ndarray:
        """[n] the branch each live feature is specialised to, or -1."""
        return specialised_branch(self.fractions, self.shuffled, self.alive)

    def table(self) -> list[dict]:
        """``specialisation_table`` against the shuffled baseline, live features only."""
        return [{"layer": self.layer, **row} for row in specialisation_table(self.fractions, self.shuffled, self.alive)]


def analyse_branches(layer: str, decoder, slices: Slices, frequency: np.ndarray, seed: int = 0) -> BranchAnalysis:
    """The branch analysis of one layer's decoder vectors [n, width].

    Defined in chapter 04, *Branch specialization* (nbs/04_branch_specialization.ipynb).
    """
    return BranchAnalysis(layer, slices, fraction_in_branch(decoder, slices),
                          fraction_in_branch(decoder, slices, positive=False),
                          baseline(decoder, slices, "shuffled", seed=seed),
                          baseline(decoder, slices, "gaussian", seed=seed), np.asarray(frequency))


# the paper's appendix figures: figure number -> (layer, branch)
PAPER_FIGURES = {5: ("mixed4d", "1x1"), 6: ("mixed4d", "5x5"), 7: ("mixed4c", "5x5"), 8: ("mixed4a", "5x5"),
                 9: ("mixed4b", "5x5"), 10: ("mixed4e", "5x5")}
