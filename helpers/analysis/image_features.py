# GENERATED from nbs/08_feature_explorer.ipynb by `python -m helpers export`: edit the chapter, not this file
# (tests/test_export.py fails when the two differ).
"""One image through one layer's SAE (chapter 08): the features firing at each grid position, grouped by
their dominant branch, and the network's top classes when chosen features are switched off or scaled."""

from dataclasses import dataclass, field

import numpy as np
import torch

from helpers.analysis.branches import BRANCHES
from helpers.analysis.circuits import switch_features
from helpers.data.inception import class_label, model_input_from_uint8
from helpers.sae.model import input_scale_for
from helpers.data.inception import clean_pass


@dataclass
class ImageFeatures:
    """One image at one layer: the strongest features at each grid position, and per branch the map of
    M_b(p) = sum of z_f(p) over the features f dominant in branch b.

    Defined in chapter 08, *Feature explorer* (nbs/08_feature_explorer.ipynb).
    """

    layer: str
    ids: np.ndarray  # [H, W, top] the strongest features at each position, strongest first; -1: fewer fire
    values: np.ndarray  # [H, W, top] their activations z_f(p)
    branch_maps: np.ndarray  # [branches, H, W]
    strongest: list[tuple[int, float]]  # the features with the largest sum of z_f(p) over the image, (id, sum)
    log_probs: np.ndarray  # [classes] the network's log class probabilities on the image
    # [C, H, W] the layer's output on the image: an edit of it runs only the layers after the layer (chapter 03)
    acts: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def features_at(self, y: int, x: int) -> list[tuple[int, float]]:
        """(feature, activation) of the features firing at grid position (y, x), strongest first."""
        return [(int(f), float(v)) for f, v in zip(self.ids[y, x], self.values[y, x]) if f >= 0]


@torch.no_grad()
def image_features(model, layer: str, sae, x: torch.Tensor, dominant: np.ndarray, top: int = 5,
                   strongest: int = 10) -> list[ImageFeatures]:
    """Each image of the batch ``x`` [B, 3, 224, 224] at ``layer``: every position's vector encoded by the SAE;
    ``dominant`` [d_sae] is each feature's dominant branch (an index into BRANCHES, chapter 04).

    Defined in chapter 08, *Feature explorer* (nbs/08_feature_explorer.ipynb).
    """
    log_probs, acts = clean_pass(model, layer, x)
    b, c, h, w = acts.shape
    z = sae.encode(acts.permute(0, 2, 3, 1).reshape(-1, c)).float()  # [B*H*W, d_sae], k nonzero per row
    values, ids = z.topk(top, dim=1)
    ids = torch.where(values > 0, ids, -1)
    groups = torch.nn.functional.one_hot(torch.as_tensor(dominant, dtype=torch.long), len(BRANCHES)).float()
    maps = (z @ groups).reshape(b, h, w, len(BRANCHES)).permute(0, 3, 1, 2)
    totals = z.reshape(b, h * w, -1).sum(dim=1)  # [B, d_sae]
    out = []
    for i in range(b):
        sums, best = totals[i].topk(strongest)
        out.append(ImageFeatures(layer, ids.reshape(b, h, w, top)[i].numpy(), values.reshape(b, h, w, top)[i].numpy(),
                                 maps[i].numpy(), [(int(f), float(s)) for f, s in zip(best, sums) if s > 0],
                                 log_probs[i].numpy(), acts[i]))
    return out


def class_moves(clean: np.ndarray, edited: np.ndarray, k: int = 5, names: list[str] | None = None) -> list[dict]:
    """One image's log class probabilities before and after an edit: its top ``k`` classes before, then those that
    enter the top ``k`` after, each with its probability before and after and the change.

    Defined in chapter 08, *Feature explorer* (nbs/08_feature_explorer.ipynb).
    """
    p, q = np.exp(np.asarray(clean, dtype=np.float64)), np.exp(np.asarray(edited, dtype=np.float64))
    classes = list(dict.fromkeys([*np.argsort(-p)[:k].tolist(), *np.argsort(-q)[:k].tolist()]))
    return [{"class": int(c), "name": class_label(int(c), names), "before": float(p[c]), "after": float(q[c]),
             "change": float(q[c] - p[c])} for c in classes]


@dataclass
class ImageProbe:
    """What looking into images at one layer needs: the network, the layer, its SAE, each feature's dominant
    and specialised branch (chapter 04's ``BranchAnalysis``: ``dominant()``, ``specialised_branch()``, -1 for
    none), the names of the network's outputs (None: shown by index) and the input convention.

    Defined in chapter 08, *Feature explorer* (nbs/08_feature_explorer.ipynb).
    """

    model: torch.nn.Module
    layer: str
    sae: object
    dominant: np.ndarray
    specialised: np.ndarray
    names: list[str] | None = None
    input_scale: str | None = None  # the network's input convention (inception.INPUT_SCALES); None: the SAE's

    def __post_init__(self):
        """The SAE's own convention by default; another than the one it was trained on is refused."""
        self.input_scale = input_scale_for(self.sae, self.input_scale, f"the SAE of {self.layer}")

    def input(self, images) -> torch.Tensor:
        """The network's input [B, 3, 224, 224] for uint8 [224, 224, 3] images (``images.load_image``'s)."""
        pixels = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in images])
        return model_input_from_uint8(pixels, self.input_scale)

    def features(self, x: torch.Tensor, top: int = 5) -> list[ImageFeatures]:
        return image_features(self.model, self.layer, self.sae, x, self.dominant, top)

    def specialised_to(self, branch: str) -> list[int]:
        """The features specialised to ``branch`` (above chance in it, chapter 04)."""
        return [int(f) for f in np.flatnonzero(self.specialised == BRANCHES.index(branch))]

    @torch.no_grad()
    def switch(self, x: torch.Tensor, features, scale: float = 0.0, k: int = 5, found=None) -> list[list[dict]]:
        """Per image of ``x``: ``class_moves`` when ``features`` are scaled by ``scale`` (0: off) at every position
        where they fire (chapter 05's ``switch_features``: the SAE's error stays in place). ``found``: the images'
        ``ImageFeatures``, whose clean class probabilities save a forward pass and whose layer outputs the layers
        before the layer."""
        clean = None if found is None else torch.from_numpy(np.stack([f.log_probs for f in found]))
        acts = None if found is None or any(f.acts is None for f in found) else torch.stack([f.acts for f in found])
        clean, edited = switch_features(self.model, self.layer, self.sae, x, features, scale, clean, acts)
        return [class_moves(c, e, k, self.names) for c, e in zip(clean.numpy(), edited.numpy())]
