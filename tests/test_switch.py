"""Switching features off (chapter 05) on planted truth: a class that only a planted feature drives
drops when that feature is switched off, and nothing else moves much; scale 1 changes nothing."""

import numpy as np
import torch
from torch import nn

from helpers.analysis.circuits import class_shifts, switch_features
from helpers.sae.model import TopKSAE


class Planted(nn.Module):
    """A layer called mixed4c (the identity on the input [B, C, H, W]), then the average over positions
    and a linear read-out named as InceptionV1's, then softmax: class 3 reads the planted direction."""

    def __init__(self, direction: torch.Tensor, classes: int = 10):
        super().__init__()
        self.mixed4c = nn.Identity()
        self.softmax2_pre_activation_matmul = nn.Linear(len(direction), classes)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            w = torch.randn(classes, len(direction), generator=g) * 0.05
            w -= (w @ direction)[:, None] * direction[None]  # the other classes ignore the direction
            w[3] = 8.0 * direction
            self.softmax2_pre_activation_matmul.weight.copy_(w)
            self.softmax2_pre_activation_matmul.bias.zero_()

    def forward(self, x):
        return torch.softmax(self.softmax2_pre_activation_matmul(self.mixed4c(x).mean(dim=(2, 3))), dim=-1)


def test_switching_off_the_planted_feature_drops_its_class():
    g = torch.Generator().manual_seed(0)
    c = 32
    sae = TopKSAE(c, 64, 4, "full", seed=2)
    d = sae.decoder_directions[7].detach().clone()  # feature 7 writes the planted direction
    model = Planted(d).eval()
    x = torch.relu(torch.randn(6, c, 4, 4, generator=g)) * 0.1
    x[:, :, 1:3, 1:3] += 3.0 * d[None, :, None, None]  # where the feature fires
    with torch.no_grad():
        z = sae.encode(x.permute(0, 2, 3, 1).reshape(-1, c))
    assert (z[:, 7] > 0).any()
    clean, edited = switch_features(model, "mixed4c", sae, x, [7])
    shifts = class_shifts(clean, edited, top=3)
    assert shifts[0]["class"] == 3 and shifts[0]["change"] < -0.2  # the planted class drops most, and a lot
    others = np.delete((edited.exp() - clean.exp()).mean(0).numpy(), 3)
    assert others.min() > -0.01  # no other class drops much
    same, unchanged = switch_features(model, "mixed4c", sae, x, [7], scale=1.0)
    torch.testing.assert_close(unchanged, same)  # scale 1: nothing changes
    _, boosted = switch_features(model, "mixed4c", sae, x, [7], scale=2.0)
    assert boosted.exp()[:, 3].mean() > clean.exp()[:, 3].mean()  # scaling up raises it
    _, untouched = switch_features(model, "mixed4c", sae, x, [])
    torch.testing.assert_close(untouched, clean)
