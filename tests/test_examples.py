import numpy as np
import pytest
import torch

from helpers.analysis.examples import CELL, activation_map, cell_colours, crop, example_pass, example_passes, overlay
from helpers.data.images import ImageDataset, list_images
from helpers.data.inception import LayerCapture, model_input_from_uint8
from helpers.sae.model import TopKSAE
from helpers.analysis.selection import strongest_examples


@pytest.fixture(scope="module")
def setup(random_model, image_dir):
    images = list_images(image_dir)
    pixels = torch.stack([ImageDataset(images)[i][1] for i in range(len(images))])
    with torch.no_grad():
        acts = LayerCapture(random_model, ["mixed4c"])(model_input_from_uint8(pixels))["mixed4c"]
    sae = TopKSAE(512, 128, 8, "full", seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(dim=(0, 2, 3)))
        z = sae.encode(acts.flatten(2).transpose(1, 2).reshape(-1, 512)).reshape(len(images), 196, -1)
    return images, sae, z, pixels


def test_the_pass_finds_every_features_strongest_images_and_positions(random_model, setup):
    images, sae, z, _ = setup
    ex = example_pass(random_model, sae, "mixed4c", images, top=3, reservoir=5, batch_size=3)
    value, image, y, x = strongest_examples(z, 3)  # chapter 07's definition, on dense maps: the oracle
    best, where = z.max(dim=1)  # and brute force: [images, features]
    for f in range(128):
        order = torch.argsort(best[:, f], descending=True)
        firing = int((best[:, f] > 0).sum())
        expected = order[: min(3, firing)].numpy()
        assert list(image[f, : len(expected)]) == list(expected) and (image[f, len(expected):] == -1).all()
        assert list(ex.top_image[f]) == list(image[f])
        np.testing.assert_allclose(ex.top_value[f], value[f], rtol=1e-5)
        assert list(ex.top_y[f, : len(expected)]) == list(y[f, : len(expected)])
        assert list(ex.top_x[f, : len(expected)]) == list(x[f, : len(expected)])
        pos = where[expected, f].numpy()
        assert list(ex.top_y[f, : len(expected)]) == list(pos // 14) and list(ex.top_x[f, : len(expected)]) == list(pos % 14)
        sampled = ex.sample_image[f][ex.sample_image[f] >= 0]
        assert len(sampled) == min(5, firing) and set(sampled) <= set(np.flatnonzero(best[:, f].numpy() > 0))
    assert ex.images_seen == len(images)


def test_one_forward_pass_serves_several_layers(random_model, image_dir):
    """Two layers from one pass of the network per batch: each layer's top examples are the brute-force ones
    from its own activations, and its reservoir is the one its own pass draws."""
    images = list_images(image_dir)
    pixels = torch.stack([ImageDataset(images)[i][1] for i in range(len(images))])
    layers = ["mixed4b", "mixed4d"]
    with torch.no_grad():
        acts = LayerCapture(random_model, layers)(model_input_from_uint8(pixels))
    saes = {}
    for i, layer in enumerate(layers):
        saes[layer] = TopKSAE(acts[layer].shape[1], 96, 6, "full", seed=i)
        with torch.no_grad():
            saes[layer].b_dec.copy_(acts[layer].mean(dim=(0, 2, 3)))
    passes = []
    hook = random_model.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        got = example_passes(random_model, saes, images, top=3, reservoir=4, batch_size=3)
    finally:
        hook.remove()
    assert len(passes) == 3  # 7 images in batches of 3: one forward pass each, not one per layer
    for layer, sae in saes.items():
        c = acts[layer].shape[1]
        with torch.no_grad():
            z = sae.encode(acts[layer].flatten(2).transpose(1, 2).reshape(-1, c)).reshape(len(images), 196, -1)
        value, image, y, x = strongest_examples(z, 3)
        assert np.array_equal(got[layer].top_image, image) and np.array_equal(got[layer].top_y, y)
        assert np.array_equal(got[layer].top_x, x)
        np.testing.assert_allclose(got[layer].top_value, value, rtol=1e-5)
        alone = example_pass(random_model, sae, layer, images, top=3, reservoir=4, batch_size=3)
        assert np.array_equal(alone.sample_image, got[layer].sample_image)


def test_bands_cover_the_range_below_the_maximum(random_model, setup, tmp_path):
    images, sae, z, _ = setup
    ex = example_pass(random_model, sae, "mixed4c", images, top=2, reservoir=7, batch_size=4)
    ex.save(tmp_path / "ex.safetensors")
    again = type(ex).load(tmp_path / "ex.safetensors")
    assert np.array_equal(again.top_image, ex.top_image) and again.images_seen == ex.images_seen
    f = int(np.argmax((z.max(1).values > 0).sum(0)))
    bands = again.bands(f, n_bands=3, per_band=7)
    top = ex.top_value[f, 0]
    for b, items in enumerate(bands):
        for value, image, y, x in items:
            assert top * b / 3 < value <= top * (b + 1) / 3 + 1e-6
    assert sum(len(b) for b in bands) == (ex.sample_image[f] >= 0).sum()


def test_crops_and_maps_sit_on_the_grid(random_model, setup):
    images, sae, z, pixels = setup
    image = (np.arange(224 * 224 * 3).reshape(224, 224, 3) % 251).astype(np.uint8)
    c = crop(image, 7, 7, window=100)
    assert c.shape == (100, 100, 3) and np.array_equal(c, image[70:170, 70:170])  # centred on cell (7, 7): pixel 120
    assert np.array_equal(crop(image, 0, 13, window=100), image[0:100, 124:224])  # clamped at the border
    f = int(np.argmax((z[0] > 0).sum(0)))
    amap = activation_map(random_model, sae, "mixed4c", pixels[0], f)
    np.testing.assert_allclose(amap.reshape(-1), z[0, :, f].numpy(), rtol=1e-5, atol=1e-6)
    shown = overlay(pixels[0].permute(1, 2, 0).numpy(), amap)
    assert shown.shape == (224, 224, 3)


def test_cell_colours():
    image = np.zeros((224, 224, 3), np.uint8)
    image[:, :112] = (255, 0, 0)
    image[:, 112:] = (0, 0, 255)
    colours = cell_colours(image, radius=0)
    assert colours.shape == (14, 14, 3)
    np.testing.assert_allclose(colours[3, 2], [255, 0, 0]) and np.testing.assert_allclose(colours[3, 12], [0, 0, 255])
    mixed = cell_colours(image, radius=1)[5, 6]  # cells 5-7 across the border
    np.testing.assert_allclose(mixed, [255 * 2 / 3, 0, 255 / 3], rtol=1e-6)
    assert CELL == 16


def test_the_overlay_shows_where_the_feature_fires():
    grey = np.full((224, 224, 3), 128, np.uint8)
    amap = np.zeros((14, 14))
    amap[3, 9], amap[10, 2] = 2.0, 1.0  # strongest at cell (3, 9), half as strong at (10, 2)
    shown = overlay(grey, amap).astype(int)
    cell = lambda y, x: shown[y * CELL + 4:(y + 1) * CELL - 4, x * CELL + 4:(x + 1) * CELL - 4].reshape(-1, 3).mean(0)
    strong, weak, silent = cell(3, 9), cell(10, 2), cell(6, 6)
    assert strong[0] - strong[2] > weak[0] - weak[2] > 0 == silent[0] - silent[2]  # redder where stronger
    assert silent.mean() < 0.5 * 128  # dimmed where it does not fire
    frame = shown[3 * CELL - 1, 9 * CELL + 8]  # just above the strongest cell: the yellow frame
    assert frame[0] > 200 and frame[1] > 200 and frame[2] < 50
    nothing = overlay(grey, np.zeros((14, 14)))  # no activation: dimmed, no frame
    assert nothing.max() < 128 and (nothing[..., 0] == nothing[..., 2]).all()


def test_an_interrupted_pass_goes_on_where_it_stopped(random_model, setup, tmp_path):
    """Stopped after three of four batches, then started again: one forward pass more, and the result of a pass
    that was never stopped; the checkpoint is gone at the end, and one of another pass is not used."""
    images, sae, _, _ = setup
    whole = example_pass(random_model, sae, "mixed4c", images, top=3, reservoir=5, batch_size=2)
    ckpt, passes = tmp_path / "examples.partial.safetensors", []

    def count_and_stop(*_):
        passes.append(1)
        if len(passes) == 4:
            raise KeyboardInterrupt

    hook = random_model.register_forward_pre_hook(count_and_stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            example_passes(random_model, {"mixed4c": sae}, images, top=3, reservoir=5, batch_size=2,
                           checkpoint=ckpt, checkpoint_seconds=0)
        assert ckpt.exists()
        passes.clear()
        again = example_passes(random_model, {"mixed4c": sae}, images, top=3, reservoir=5, batch_size=2,
                               checkpoint=ckpt, checkpoint_seconds=0)["mixed4c"]
    finally:
        hook.remove()
    assert len(passes) == 1 and not ckpt.exists()
    for name in ("top_value", "top_image", "top_y", "top_x", "sample_value", "sample_image", "sample_y", "sample_x"):
        assert np.array_equal(getattr(again, name), getattr(whole, name)), name
    # a checkpoint of other settings is not resumed from
    _stopped_after(random_model, sae, images, ckpt, batches=4)
    with pytest.warns(UserWarning, match="another example pass"):
        other = example_passes(random_model, {"mixed4c": sae}, images, top=4, reservoir=5, batch_size=2,
                               checkpoint=ckpt, checkpoint_seconds=0)["mixed4c"]
    assert other.top_image.shape[1] == 4 and other.images_seen == len(images) and not ckpt.exists()


def _stopped_after(model, sae, images, ckpt, batches: int) -> None:
    """An example pass with a checkpoint after every batch, interrupted as the network starts batch ``batches``."""
    calls = []

    def stop(*_):
        calls.append(1)
        if len(calls) == batches:
            raise KeyboardInterrupt

    hook = model.register_forward_pre_hook(stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            example_passes(model, {"mixed4c": sae}, images, top=3, reservoir=5, batch_size=2, checkpoint=ckpt,
                           checkpoint_seconds=0)
    finally:
        hook.remove()


@pytest.mark.parametrize("damage", ["done beyond the images", "an image index beyond them", "a NaN", "another shape"])
def test_a_checkpoint_with_numbers_that_do_not_fit_is_not_resumed(random_model, setup, tmp_path, damage):
    """Flipped bytes once resumed silently (a top image index of 21406 among 48 images; done=999 skipped 40
    images): a checkpoint whose numbers do not fit the pass is ignored with a warning, and the pass starts over to
    the uninterrupted result."""
    from safetensors.torch import load_file, save_file

    images, sae, _, _ = setup
    whole = example_pass(random_model, sae, "mixed4c", images, top=3, reservoir=5, batch_size=2)
    ckpt = tmp_path / "examples.partial.safetensors"
    _stopped_after(random_model, sae, images, ckpt, batches=2)
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(ckpt)
    if damage == "done beyond the images":
        meta = {**meta, "done": "999"}
    elif damage == "an image index beyond them":
        tensors["mixed4c/best_loc"][0, 0] = 21406 * 196
    elif damage == "a NaN":
        tensors["mixed4c/res_v"][1, 2] = float("nan")
    else:
        tensors["mixed4c/best_v"] = tensors["mixed4c/best_v"][:2]
    save_file(tensors, ckpt, metadata=meta)
    with pytest.warns(UserWarning, match="not a readable checkpoint"):
        again = example_passes(random_model, {"mixed4c": sae}, images, top=3, reservoir=5, batch_size=2,
                               checkpoint=ckpt, checkpoint_seconds=0)["mixed4c"]
    for name in ("top_value", "top_image", "sample_value", "sample_image"):
        assert np.array_equal(getattr(again, name), getattr(whole, name)), name


def test_a_checkpoint_that_cannot_be_written_is_skipped_with_a_warning(random_model, setup, tmp_path):
    """The checkpoint is optional: a folder where its file would go is warned about, and the pass finishes."""
    images, sae, _, _ = setup
    whole = example_pass(random_model, sae, "mixed4c", images, top=3, reservoir=5, batch_size=2)
    (tmp_path / "ckpt").mkdir()
    with pytest.warns(UserWarning, match="cannot save the example pass's checkpoint"):
        got = example_passes(random_model, {"mixed4c": sae}, images, top=3, reservoir=5, batch_size=2,
                             checkpoint=tmp_path / "ckpt", checkpoint_seconds=0)["mixed4c"]
    assert np.array_equal(got.top_image, whole.top_image) and (tmp_path / "ckpt").is_dir()


@pytest.mark.parametrize("kernel", [True, False])
def test_image_maxima_from_the_kept_latents_are_the_dense_maxima(kernel, monkeypatch):
    """The per-image maximum and its first position, read from the kept latents, against the dense codes' max(dim=1)
    (ties included: a position repeated holds the same maximum twice; features that never fire sit at position 0),
    by the Numba pass and by torch's scatter-reductions (a GPU's)."""
    from helpers.analysis import streaming
    from helpers.analysis.examples import _image_maxima

    if not kernel:
        monkeypatch.setattr(streaming, "numba", None)

    sae = TopKSAE(16, 96, 4, "full", seed=3)
    positions = torch.relu(torch.randn(5, 12, 16))
    positions[:, 7] = positions[:, 2]  # the same vector twice: its maxima tie, the first position wins
    dense = sae.encode(positions.reshape(-1, 16)).reshape(5, 12, -1)
    want_v, want_p = dense.max(dim=1)
    for budget in (1 << 26, 12 * 96 * 2):  # all images at once, and two at a time
        got_v, got_p = _image_maxima(sae, positions, budget)
        assert torch.equal(got_v, want_v) and torch.equal(got_p, want_p)
    assert (want_v == 0).any() and ((want_p == 2) | (want_p == 7)).any() and not (want_p == 7).all()
