"""Automatic feature labels, instead of the paper's hand-picked lists (its section 4 asks for this).

* From the ImageNet classes of a feature's top example images: ``animal`` (classes 0-397),
  ``dog`` (151-268), and the most common class, each with a confidence (the share of the
  feature's labelled top images that agree).
* From the colours around its top examples' activating cells: a hue name when they are
  saturated and agree on a hue (confidence: the share that agree).

``highlight_sets`` turns labels into the ``{name: feature ids}`` the analysis figures draw.
"""

from __future__ import annotations

import colorsys

import numpy as np

ANIMALS = range(0, 398)
DOGS = range(151, 269)
HUES = [("red", 0), ("orange", 30), ("yellow", 60), ("green", 120), ("cyan", 180), ("blue", 230), ("purple", 280),
        ("magenta", 320), ("red", 360)]


def class_labels(top_image: np.ndarray, image_classes, min_labelled: int = 4, threshold: float = 0.75) -> list[dict]:
    """Per feature: animal/dog shares of its labelled top images and the commonest class.

    top_image: [n_features, top] image indices (-1: none); image_classes: class per image (-1: unknown).
    """
    classes = np.asarray(image_classes)
    out = []
    for row in np.asarray(top_image):
        cls = classes[row[row >= 0]]
        cls = cls[cls >= 0]
        entry = {"labelled": int(len(cls))}
        if len(cls) >= min_labelled:
            animal = float(np.isin(cls, ANIMALS).mean())
            dog = float(np.isin(cls, DOGS).mean())
            values, counts = np.unique(cls, return_counts=True)
            entry.update(animal=animal, dog=dog, top_class=int(values[counts.argmax()]),
                         top_class_share=float(counts.max() / len(cls)))
            entry["labels"] = {name: share for name, share in (("animal", animal), ("dog", dog)) if share >= threshold}
        else:
            entry["labels"] = {}
        out.append(entry)
    return out


def hue_name(rgb) -> tuple[str | None, float, float]:
    """(name or None, saturation, value) of a mean RGB colour in 0-255."""
    h, s, v = colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255))
    deg = h * 360
    name = min(HUES, key=lambda hue: abs(hue[1] - deg))[0]
    return (name if s > 0.35 and v > 0.2 else None), float(s), float(v)


def colour_label(colours, threshold: float = 0.75) -> dict:
    """The hue a feature's top examples share: ``colours`` [m, 3] mean RGB (0-255) around each
    example's activating cell. {name: share of examples with that hue} if the share is high."""
    names = [hue_name(c)[0] or "" for c in np.asarray(colours, float)]
    if not names:
        return {}
    values, counts = np.unique(names, return_counts=True)
    best, share = values[counts.argmax()], float(counts.max() / len(names))
    return {str(best): share} if best and share >= threshold else {}


def highlight_sets(labels: list[dict], names=("animal", "dog")) -> dict[str, list[int]]:
    """{label: features carrying it}, for the figures' highlighted sets."""
    sets = {name: [i for i, entry in enumerate(labels) if name in entry.get("labels", {})] for name in names}
    colours = sorted({n for e in labels for n in e.get("labels", {}) if n not in ("animal", "dog")})
    sets.update({f"colour: {c}": [i for i, e in enumerate(labels) if c in e.get("labels", {})] for c in colours})
    return {k: v for k, v in sets.items() if v}


def feature_labels(top_image: np.ndarray, top_y: np.ndarray, top_x: np.ndarray, image_classes,
                   cell_colours: np.ndarray) -> list[dict]:
    """Class and colour labels of every feature from its top examples: ``top_*`` [n_features, top]
    (image -1: none), ``cell_colours`` [images, H, W, 3] mean RGB around each grid cell."""
    out = class_labels(top_image, image_classes)
    for f, entry in enumerate(out):
        ok = top_image[f] >= 0
        rgb = cell_colours[top_image[f][ok], top_y[f][ok], top_x[f][ok]]
        entry["labels"].update(colour_label(rgb) if ok.sum() >= 3 else {})
    return out
