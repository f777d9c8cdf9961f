"""One image's features and switching them off (chapter 08), on planted truth: a feature planted at known
positions is listed there first with the activation the SAE's equation gives, the branch maps are the sums a
loop over features gives, and switching it off drops the one class it drives."""

import numpy as np
import torch

from helpers.analysis.image_features import ImageProbe, class_moves, image_features
from helpers.sae.loss import topk_sae
from helpers.sae.model import TopKSAE
from test_switch import Planted


def planted():
    g = torch.Generator().manual_seed(0)
    c = 32
    sae = TopKSAE(c, 64, 4, "full", seed=2)
    d = sae.decoder_directions[7].detach().clone()  # feature 7 writes the direction class 3 reads
    model = Planted(d).eval()
    x = torch.relu(torch.randn(2, c, 4, 4, generator=g)) * 0.1
    x[0, :, 1:3, 1:3] += 3.0 * d[:, None, None]  # the feature fires here, in the first image only
    dominant = np.arange(64) % 4
    return model, sae, x, dominant


def test_each_position_lists_its_features_and_the_branch_maps_sum_them():
    model, sae, x, dominant = planted()
    found = image_features(model, "mixed4c", sae, x, dominant, top=3)
    assert len(found) == 2
    W = sae.W_enc.detach()
    with torch.no_grad():
        _, z = topk_sae(x.permute(0, 2, 3, 1).reshape(-1, 32), W, sae.b_enc, sae.W_dec, sae.b_dec, sae.k)
    z = z.reshape(2, 4, 4, 64).numpy()
    for y, xx in [(1, 1), (1, 2), (2, 1), (2, 2)]:
        f, v = found[0].features_at(y, xx)[0]
        assert f == 7 and np.isclose(v, z[0, y, xx, 7], rtol=1e-5)  # the planted feature, strongest there
    assert 7 not in [f for f, _ in found[1].features_at(1, 1)]  # not planted in the second image
    for i in range(2):
        for y in range(4):
            for xx in range(4):
                want = sorted(((f, z[i, y, xx, f]) for f in range(64) if z[i, y, xx, f] > 0), key=lambda t: -t[1])[:3]
                got = found[i].features_at(y, xx)
                assert [f for f, _ in got] == [f for f, _ in want]
                for b in range(4):  # M_b(p): the sum over the features dominant in b, by a loop
                    assert np.isclose(found[i].branch_maps[b, y, xx],
                                      sum(z[i, y, xx, f] for f in range(64) if dominant[f] == b), rtol=1e-5, atol=1e-6)
    assert found[0].strongest[0][0] == 7
    assert np.isclose(found[0].strongest[0][1], z[0, :, :, 7].sum(), rtol=1e-5)


def test_switching_the_planted_feature_off_in_the_image_drops_its_class():
    model, sae, x, dominant = planted()
    specialised = np.full(64, -1)
    specialised[[7, 9]] = 2
    probe = ImageProbe(model, "mixed4c", sae, dominant, specialised, names=[f"class {i}" for i in range(10)])
    assert probe.specialised_to("5x5") == [7, 9] and probe.specialised_to("1x1") == []
    rows = probe.switch(x[:1], [7], k=3)[0]
    by_class = {r["class"]: r for r in rows}
    assert rows[0]["class"] == 3 and rows[0]["name"] == "class 3"  # the planted class leads before
    assert by_class[3]["change"] < -0.2 and np.isclose(by_class[3]["after"] - by_class[3]["before"], by_class[3]["change"])
    assert all(r["change"] > -0.01 for r in rows if r["class"] != 3)
    same = probe.switch(x[:1], [7], scale=1.0, k=3)[0]
    assert all(abs(r["change"]) < 1e-9 for r in same)


def test_class_moves_lists_the_top_classes_before_then_those_that_enter_after():
    clean = np.log([0.5, 0.3, 0.1, 0.06, 0.04])
    edited = np.log([0.2, 0.3, 0.1, 0.06, 0.34])
    rows = class_moves(clean, edited, k=2)
    assert [r["class"] for r in rows] == [0, 1, 4]  # class 4 enters the top 2
    assert np.isclose(rows[0]["change"], -0.3) and np.isclose(rows[2]["change"], 0.3)
    assert rows[2]["name"] == "output 4"  # no names: by index


def test_an_images_switches_run_from_its_kept_layer_output_with_the_whole_networks_numbers(random_model):
    """The atlas switches features off in images it has looked into (``found``): their kept layer outputs run only
    the layers after the layer, with the class probabilities of the whole network run again, bit for bit."""
    from helpers.data.inception import model_input

    sae = TopKSAE(528, 2048, 16, seed=0)
    with torch.no_grad():
        x = model_input(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3)))
        sae.b_dec.copy_(torch.zeros(528))
    probe = ImageProbe(random_model, "mixed4d", sae, np.arange(2048) % 4, np.full(2048, -1))
    found = probe.features(x)
    assert all(f.acts is not None for f in found)
    features = [f for f, _ in found[0].strongest[:3]] + [f for f, _ in found[1].strongest[:2]]
    assert probe.switch(x, features, found=found) == probe.switch(x, features)
    one = probe.features(x[1:])  # (a batch of one: the convolutions' rounding depends on the batch)
    assert probe.switch(x[1:], features[:1], scale=2.0, found=one) == probe.switch(x[1:], features[:1], scale=2.0)
