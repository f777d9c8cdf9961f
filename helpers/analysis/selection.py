# GENERATED from nbs/07_feature_visualization.ipynb by `python -m helpers export`: edit the chapter, not this file
# (tests/test_export.py fails when the two differ).
"""Which dataset examples and which features the book shows (chapter 07)."""

import numpy as np
import torch


def strongest_examples(z: torch.Tensor, top: int, width: int = 14) -> tuple[np.ndarray, ...]:
    """Each feature's ``top`` strongest images from dense activation maps ``z`` [images, positions, features]:
    (value, image, y, x), each [features, top], strongest first; image -1 (value 0) where it fires on fewer.

    Defined in chapter 07, *Feature visualisation and dataset examples* (nbs/07_feature_visualization.ipynb).
    """
    best, where = z.max(dim=1)  # per image and feature: the strongest position
    value, image = best.T.topk(min(top, z.shape[0]), dim=1)  # [features, top]
    position = where.T.gather(1, image)
    pad = lambda t, fill: torch.nn.functional.pad(t, (0, top - t.shape[1]), value=fill).numpy()  # fewer images
    return (pad(value.clamp_min(0), 0), pad(torch.where(value > 0, image, -1), -1), pad(position // width, 0),
            pad(position % width, 0))


def activation_bands(value: np.ndarray, image: np.ndarray, y: np.ndarray, x: np.ndarray, maximum: float,
                     n_bands: int = 4, per_band: int = 3) -> list[list[tuple[float, int, int, int]]]:
    """A feature's sampled examples (``value``, ``image`` (-1: empty slot), ``y``, ``x``) split into ``n_bands``
    equal-width bands of activation up to ``maximum``; up to ``per_band`` (value, image, y, x) from each, weakest band first.

    Defined in chapter 07, *Feature visualisation and dataset examples* (nbs/07_feature_visualization.ipynb).
    """
    ok = image >= 0
    value, image, y, x = value[ok], image[ok], y[ok], x[ok]
    out = []
    for b in range(n_bands):
        lo, hi = maximum * b / n_bands, maximum * (b + 1) / n_bands
        chosen = np.flatnonzero((value > lo) & (value <= hi))[:per_band]
        out.append([(float(value[j]), int(image[j]), int(y[j]), int(x[j])) for j in chosen])
    return out


# the paper's caption: "the 5x5 branch of each layer (besides the mixed4a layer) are something animal related",
# with mixed4a's 5x5 branch the geometric shapes of its section 3.1, and mixed4e "not depicted"
PAPER_FIGURE1_BRANCH = {"mixed4a": "5x5", "mixed4b": "5x5", "mixed4c": "5x5", "mixed4d": "5x5", "mixed4e": "5x5"}
PAPER_FIGURE1_LAYERS = ("mixed4a", "mixed4b", "mixed4c", "mixed4d")  # what the paper's figure depicts


def figure1_features(analysis, top_image: np.ndarray, branch: str, n: int) -> list[int]:
    """The ``n`` features of a layer's BranchAnalysis most specialised to ``branch`` that have an example
    (``top_image`` [features, top], -1: none).

    Defined in chapter 07, *Feature visualisation and dataset examples* (nbs/07_feature_visualization.ipynb).
    """
    return [f for f in analysis.most_specialised(branch, None) if top_image[f, 0] >= 0][:n]
