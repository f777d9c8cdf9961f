# GENERATED from nbs/10_what_holds.ipynb by `python -m helpers export`: edit the chapter, not this file
# (tests/test_export.py fails when the two differ).
"""What holds (chapter 10): each claim of the paper, and of the Distill article it builds on, as a statistic
with a 99% interval, held against a control by one written rule."""

from dataclasses import dataclass

import numpy as np
import torch

from helpers.analysis.circuits import positions
from helpers.data.inception import LayerCapture, model_input_from_uint8

LEVEL = 0.99  # every interval of the chapter
HOLDS, FRAGILE, FAILS = "holds", "fragile", "does not hold"
NO_RESULT, NOT_MEASURED = "no result (random weights)", "not measured"


@dataclass(frozen=True)
class Estimate:
    """A statistic's ``value`` and its interval ``low``-``high``.

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """

    value: float
    low: float
    high: float

    def __repr__(self) -> str:
        return f"Estimate({self.value:.4g} [{self.low:.4g}, {self.high:.4g}])"

    def shifted(self, by: float) -> "Estimate":
        """The same estimate less ``by`` (an effect over a control's value)."""
        return Estimate(self.value - by, self.low - by, self.high - by)


def bootstrap(n: int, statistic, draws: int = 1000, level: float = LEVEL, seed: int = 0) -> Estimate:
    """``statistic(indices)`` over all ``n`` items (features, edges, cases), with the percentile interval of
    ``draws`` resamples of the items with replacement.

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """
    if n == 0:
        return Estimate(np.nan, np.nan, np.nan)
    rng = np.random.default_rng(seed)
    samples = np.array([statistic(rng.integers(0, n, n)) for _ in range(draws)], float)
    low, high = np.nanquantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(statistic(np.arange(n))), float(low), float(high))


def permutation_null(statistic, labels, draws: int = 1000, level: float = LEVEL, seed: int = 0) -> Estimate:
    """What ``statistic(labels)`` is by chance: its mean and interval over random permutations of ``labels``.

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """
    labels = np.asarray(labels)
    if len(labels) == 0:
        return Estimate(np.nan, np.nan, np.nan)
    rng = np.random.default_rng(seed)
    samples = np.array([statistic(rng.permutation(labels)) for _ in range(draws)], float)
    low, high = np.nanquantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(np.nanmean(samples)), float(low), float(high))


@dataclass(frozen=True)
class Condition:
    """One measurement of a claim: the ``measured`` statistic of one SAE (``sae``: its family, sparsity and seed)
    and the ``control`` it is held against (``control_name``: what the control is).

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """

    sae: str
    measured: Estimate
    control: Estimate
    control_name: str

    @property
    def cleared(self) -> bool:
        """The measured value lies above the control's 99% interval."""
        return bool(self.measured.value > self.control.high)

    @property
    def effect(self) -> Estimate:
        """The measured value over the control's, with the measured value's interval."""
        return self.measured.shifted(self.control.value)


def verdict(conditions, random_weights: bool = False) -> str:
    """The chapter's rule: a claim *holds* when its value clears the control's 99% interval for every SAE it was
    measured on (every seed, family and sparsity); it is *fragile* when it does for some; it *does not hold*
    when it does for none. Random weights give no result, whatever the numbers.

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """
    if random_weights:
        return NO_RESULT
    measured = [c for c in conditions if np.isfinite(c.measured.value) and np.isfinite(c.control.high)]
    if not measured:
        return NOT_MEASURED
    cleared = sum(c.cleared for c in measured)
    return HOLDS if cleared == len(measured) else FRAGILE if cleared else FAILS


def share(hits) -> Estimate:
    """The share of items that are hits (bool [n]: e.g. live features specialised to a branch), bootstrapped.

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """
    hits = np.asarray(hits, float)
    return bootstrap(len(hits), lambda i: hits[i].mean())


def chance_share(n: int, p: float, draws: int = 10_000, seed: int = 0) -> Estimate:
    """The share of ``n`` items that are hits when each is one with probability ``p``: ``p`` and its interval.

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """
    counts = np.random.default_rng(seed).binomial(n, p, draws) / max(n, 1)
    low, high = np.quantile(counts, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(float(p), float(low), float(high))


def concentration(group, score):
    """How much more of ``score`` (bool or float [n] per feature: animal-labelled, colour selectivity) the features
    of ``group`` (bool [n]: e.g. specialised to the 5x5 branch) carry than all features: the mean of ``score`` in
    the group minus its mean over all, bootstrapped over features, and the same with ``score`` permuted over the
    features (what chance gives).

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """
    group, score = np.asarray(group, bool), np.asarray(score, float)
    stat = lambda s, g: s[g].mean() - s.mean() if g.any() else np.nan
    return (bootstrap(len(group), lambda i: stat(score[i], group[i])),
            permutation_null(lambda s: stat(s, group), score))


def agreement(src, dst):
    """How often two paired labels agree (``src``, ``dst`` [m]: the branches at the two ends of each edge), over
    the pairs and with ``dst`` permuted (chance).

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """
    src, dst = np.asarray(src), np.asarray(dst)
    return (bootstrap(len(src), lambda i: (src[i] == dst[i]).mean()),
            permutation_null(lambda d: (src == d).mean(), dst))


def neighbour_agreement(neighbours, labels):
    """The share of each feature's nearest neighbours (``neighbours`` [n, k] indices) that carry its label
    (``labels`` [n]), averaged over features (bootstrapped) and with the labels permuted (chance).

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """
    neighbours, labels = np.asarray(neighbours), np.asarray(labels)
    per_feature = lambda l: (l[neighbours] == l[:, None]).mean(axis=1)
    observed = per_feature(labels)
    return (bootstrap(len(labels), lambda i: observed[i].mean()),
            permutation_null(lambda l: per_feature(l).mean(), labels))


@torch.no_grad()
def feature_maxima(model, layer: str, saes, pixels: torch.Tensor, input_scale: str = "lucent",
                   batch: int = 8) -> list[np.ndarray]:
    """[images, features] for each SAE of the layer in ``saes``: each feature's largest activation over the grid of
    each image (``pixels``: uint8 [images, 3, H, W]); one pass of the network serves them all.

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """
    out = [[] for _ in saes]
    for start in range(0, len(pixels), batch):
        acts = LayerCapture(model, [layer])(model_input_from_uint8(pixels[start:start + batch], input_scale))[layer]
        for found, sae in zip(out, saes):
            z = sae.encode(positions(acts).reshape(-1, acts.shape[1]).float())
            found.append(z.reshape(acts.shape[0], -1, z.shape[-1]).amax(dim=1))
    return [torch.cat(found).numpy() for found in out]


def grey(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] images as their luminance (ITU-R 601), in all three channels.

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """
    luma = (0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]).round().clamp(0, 255)
    return luma.to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()


def selectivity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[features]: (mean of ``a`` - mean of ``b``) / (their sum), per feature, over images (0 where neither fires).

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """
    ma, mb = np.asarray(a).mean(axis=0), np.asarray(b).mean(axis=0)
    total = ma + mb
    return np.where(total > 0, (ma - mb) / np.where(total > 0, total, 1), 0.0)


def stroke_images(size: int = 224, radii=(24, 48, 96), angles: int = 16, width: float = 5.0) -> dict[str, torch.Tensor]:
    """Synthetic curves and lines, white strokes on black, uint8 [n, 3, size, size] each: ``"curve"``, a quarter of
    a circle of each radius at each of ``angles`` orientations, centred; ``"line"``, a straight stroke of the same
    length through the centre at each orientation.

    Defined in chapter 10, *What holds* (nbs/10_what_holds.ipynb).
    """
    yy, xx = np.mgrid[:size, :size].astype(np.float32) - (size - 1) / 2
    curves, lines = [], []
    for r in radii:
        for a in np.arange(angles) * 2 * np.pi / angles:
            cy, cx = -r * np.sin(a), -r * np.cos(a)  # the circle's centre: the arc's midpoint sits at the image centre
            dist = np.abs(np.hypot(yy - cy, xx - cx) - r)
            theta = np.angle(np.exp(1j * (np.arctan2(yy - cy, xx - cx) - a)))  # angle from the arc's midpoint
            curves.append((dist <= width / 2) & (np.abs(theta) <= np.pi / 4))
            half = np.pi * r / 4  # half the arc's length
            along, across = xx * -np.sin(a) + yy * np.cos(a), xx * np.cos(a) + yy * np.sin(a)
            lines.append((np.abs(across) <= width / 2) & (np.abs(along) <= half))
    def as_pixels(masks):
        return torch.from_numpy(np.stack(masks).astype(np.uint8) * 255)[:, None].expand(-1, 3, -1, -1).contiguous()

    return {"curve": as_pixels(curves), "line": as_pixels(lines)}
