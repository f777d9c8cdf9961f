"""The live explorer, driven as a user would, on the smoke book's run."""

import numpy as np

from helpers import profiles, runs
from helpers.branches import BRANCHES, dominant_branch
from helpers.dashboard import Explorer


def test_explorer_sorts_filters_and_shows_a_feature(smoke_book):
    ctx = profiles.context("smoke", run_dir=str(smoke_book["run"]))
    ex = Explorer(["mixed4c"], lambda layer: runs.get(ctx, "view", layer),
                  lambda layer, features: runs.featviz(ctx, layer, features))
    a = runs.get(ctx, "branches", "mixed4c")
    ex.sort.value = "frequency"
    ids = [v for _, v in ex.pick.options]
    assert ids and all(a.alive[ids]) and list(np.argsort(-a.frequency[ids], kind="stable")) == list(range(len(ids)))
    ex.only.value = "5x5 dominant"
    ids = [v for _, v in ex.pick.options]
    assert (dominant_branch(a.fractions[ids], a.shuffled) == BRANCHES.index("5x5")).all()
    ex.pick.value = ids[0]  # the detail view runs
    lines, strip = ex.describe(ids[0])
    assert lines[0].startswith(f"**mixed4c feature {ids[0]}**") and "5x5" in lines[0]
    assert any(line.startswith("strongest mixed4d neighbours") for line in lines)
    assert strip is not None and strip.shape[0] == 100 and strip.shape[1] >= 200  # visualisation + crops
    ex.label.value = "no-such-label"
    assert ex.pick.options == ()
