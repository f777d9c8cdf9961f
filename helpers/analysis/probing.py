# GENERATED from nbs/03_training.ipynb by `python -m helpers export`: edit the chapter, not this file
# (tests/test_export.py fails when the two differ).
"""Sparse probing (chapter 03): per ImageNet class, a logistic probe on the k best max-pooled features of the SAE,
of the layer's neurons, and of random directions."""

import numpy as np
import torch

from helpers.data.inception import LayerCapture


@torch.no_grad()
def max_pooled(model, layer: str, sae, x: torch.Tensor, batch: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Each image's SAE features, neurons and random directions (as many as features), max over positions.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    g = torch.Generator().manual_seed(seed)
    out = {"SAE features": [], "neurons": [], "random directions": []}
    directions = None
    for s in range(0, len(x), batch):
        acts = LayerCapture(model, [layer])(x[s:s + batch])[layer]
        b, c, h, w = acts.shape
        vec = acts.permute(0, 2, 3, 1).reshape(-1, c)
        if directions is None:
            directions = torch.nn.functional.normalize(torch.randn(sae.d_sae, c, generator=g), dim=1)
        out["SAE features"].append(sae.encode(vec).reshape(b, h * w, -1).amax(1))
        out["neurons"].append(acts.amax(dim=(2, 3)))
        out["random directions"].append((vec @ directions.T).reshape(b, h * w, -1).amax(1))
    return {k: torch.cat(v).float().numpy() for k, v in out.items()}


def rank_columns(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Columns by |mean on positives - mean on negatives| / pooled standard deviation, best first.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    pos, neg = X[y], X[~y]
    spread = np.sqrt((pos.var(0) * len(pos) + neg.var(0) * len(neg)) / len(X)) + 1e-12
    return np.argsort(-np.abs(pos.mean(0) - neg.mean(0)) / spread, kind="stable")


def sparse_probe(X: np.ndarray, y: np.ndarray, ks=(1, 5, 20), seed: int = 0, test_fraction: float = 0.3) -> dict:
    """Balanced accuracy on a held-out split of a logistic probe on the k best columns (ranked on the training
    split), for each k; and the best column.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for label in (True, False):  # stratified
        where = np.flatnonzero(y == label)
        test[rng.choice(where, max(1, int(round(test_fraction * len(where)))), replace=False)] = True
    order = rank_columns(X[~test], y[~test])
    scores = {}
    for k in ks:
        cols = order[:k]
        mu, sd = X[~test][:, cols].mean(0), X[~test][:, cols].std(0) + 1e-12
        probe = LogisticRegression(class_weight="balanced", max_iter=2000)
        probe.fit((X[~test][:, cols] - mu) / sd, y[~test])
        scores[k] = float(balanced_accuracy_score(y[test], probe.predict((X[test][:, cols] - mu) / sd)))
    return {"best": int(order[0]), **{f"k={k}": v for k, v in scores.items()}}


def probe_classes(pooled: dict[str, np.ndarray], classes, names=None, ks=(1, 5, 20), min_images: int = 10,
                  seed: int = 0) -> list[dict]:
    """One row per class with at least ``min_images`` images (and as many others) and per representation.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    classes = np.asarray(classes)
    rows = []
    for c in sorted(set(classes[classes >= 0].tolist())):
        y = classes == c
        if y.sum() < min_images or (~y).sum() < min_images:
            continue
        for kind, X in pooled.items():
            rows.append({"class": names[c] if names else int(c), "images": int(y.sum()), "basis": kind,
                         **sparse_probe(X, y, ks, seed)})
    return rows


def absorption(X: np.ndarray, classes, ancestors: dict, names=None, min_images: int = 10) -> list[dict]:
    """Per parent concept (a key of the classes' ``ancestors`` lists, nearest first, shared by two or more classes
    with ``min_images`` images each, not by all): its best single feature of ``X`` [images, features] (max-pooled),
    the feature's recall on the parent's images, its absorption rate and the absorbed child classes.

    Defined in chapter 03, *Training the TopK sparse autoencoders* (nbs/03_training.ipynb).
    """
    classes = np.asarray(classes)
    kept = [c for c in sorted(set(classes[classes >= 0].tolist())) if (classes == c).sum() >= min_images]
    parents = {}
    for c in kept:
        for a in ancestors.get(c, []):
            parents.setdefault(a, set()).add(c)
    seen, rows = set(), []
    for parent, children in sorted(parents.items(), key=lambda p: (-len(p[1]), str(p[0]))):
        key = frozenset(children)
        if len(children) < 2 or len(children) == len(kept) or key in seen:
            continue  # one child (no hierarchy), every class (no negatives), or the same classes as a nearer parent
        seen.add(key)
        y = np.isin(classes, list(children))
        f = int(rank_columns(X, y)[0])
        fires = X[:, f] > 0
        absorbed, covered = [], 0
        for c in sorted(children):
            mine = classes == c
            missed = mine & ~fires
            own = int(rank_columns(X, mine)[0])
            hit = int((missed & (X[:, own] > 0)).sum())
            covered += hit if own != f else 0
            if missed.sum() >= 0.5 * mine.sum() and own != f and hit >= 0.5 * missed.sum():
                absorbed.append(names[c] if names else int(c))
        rows.append({"parent": parent, "children": len(children), "images": int(y.sum()), "feature": f,
                     "recall": round(float(fires[y].mean()), 3), "absorption rate": round(covered / int(y.sum()), 3),
                     "absorbed children": absorbed})
    return rows
