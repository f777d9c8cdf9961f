"""The two input conventions: Lucent's render_vis (x*255-117) and the author's harvest ([0, 1] as is).

The author's published SAEs were trained on activations of unshifted [0, 1] inputs. A harvest
records its convention, refuses to resume under the other, and an SAE refuses to encode a
harvest of the other; an SAE reconstructs its own convention's vectors and not the other's.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.data.harvest import HarvestConfig, harvest
from helpers.data.images import load_image
from helpers.data.inception import LayerCapture, model_input_from_uint8
from helpers.sae.loss import fvu
from helpers.run.artifacts import open_run
from helpers.sae.model import InputScaleMismatch, TopKSAE, check_input_scale
from helpers.data.store import ActivationStore, StoreError, read_manifest
from helpers.config import SaeConfig, TrainConfig
from helpers.sae.train import train


def test_model_input_under_each_convention():
    pixels = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    assert torch.allclose(model_input_from_uint8(pixels, "unit"), pixels.double().div(255).float())
    assert torch.allclose(model_input_from_uint8(pixels, "lucent"), pixels.float() - 117, atol=1e-4)
    with pytest.raises(ValueError, match="input_scale 'imagenet' is unknown"):
        model_input_from_uint8(pixels, "imagenet")


@pytest.fixture(scope="module")
def two_harvests(tmp_path_factory, image_dir):
    """The same images and random weights, harvested under each convention (100 positions per image)."""
    root = tmp_path_factory.mktemp("scales")
    return {scale: harvest(HarvestConfig(images=str(image_dir), out=str(root / scale), layers="mixed4a",
                                         weights="random", per_image=100, batch_size=4, workers=0, device="cpu",
                                         input_scale=scale))
            for scale in ("lucent", "unit")}


def test_a_unit_harvest_stores_the_activations_of_unshifted_pixels(two_harvests, random_model):
    run = two_harvests["unit"]
    manifest = read_manifest(run)
    assert manifest.input_scale == "unit" and "as is" in manifest.input
    store = ActivationStore(run, "mixed4a")
    vectors, prov = store.load().astype(np.float32), store.load_provenance()
    path = Path(manifest.images["paths"][2])
    x = torch.from_numpy(load_image(path)).permute(2, 0, 1)[None].double().div(255).float()  # [0, 1], no shift
    with torch.no_grad():
        acts = LayerCapture(random_model, ["mixed4a"])(x)["mixed4a"][0]
    for r in np.flatnonzero(prov["image"] == 2)[:20]:
        truth = acts[:, prov["y"][r], prov["x"][r]].numpy()
        np.testing.assert_allclose(vectors[r], truth, rtol=2e-3, atol=1e-3 * np.abs(truth).max())


def test_resuming_under_the_other_convention_is_refused(two_harvests, image_dir):
    run = two_harvests["lucent"]
    with pytest.raises(StoreError, match="input"):
        harvest(HarvestConfig(images=str(image_dir), out=str(run), layers="mixed4a", weights="random",
                              per_image=100, batch_size=4, workers=0, device="cpu", input_scale="unit"))


def test_an_sae_reconstructs_its_own_convention_and_not_the_other(two_harvests, tmp_path):
    """Codes of the matching convention against the mismatched one, for the same images and positions."""
    out = train(TrainConfig(run=str(two_harvests["unit"]), layer="mixed4a", out=str(tmp_path / "sae"),
                            sae=SaeConfig(expansion=2, k=16), batch_size=128, vectors_seen=40_000, holdout=64, lr=2e-3,
                            device="cpu"))
    sae = TopKSAE.load(out)
    assert sae.metadata["input_scale"] == "unit"
    unit, lucent = (ActivationStore(two_harvests[s], "mixed4a") for s in ("unit", "lucent"))
    # the same (image, y, x) under both conventions
    key = lambda p: list(zip(p["image"].tolist(), p["y"].tolist(), p["x"].tolist()))
    where = {k: i for i, k in enumerate(key(lucent.load_provenance()))}
    pairs = [(i, where[k]) for i, k in enumerate(key(unit.load_provenance())) if k in where]
    assert len(pairs) >= 100
    xu = torch.from_numpy(unit.load()[[i for i, _ in pairs]].astype(np.float32))
    xl = torch.from_numpy(lucent.load()[[j for _, j in pairs]].astype(np.float32))
    with torch.no_grad():
        matched, mismatched = fvu(sae(xu), xu).item(), fvu(sae(xl), xl).item()
        codes_u, codes_l = sae.encode_topk(xu).indices, sae.encode_topk(xl).indices
    assert matched < 0.6 and mismatched > 2 * matched, (matched, mismatched)
    shared = (codes_u[:, :, None] == codes_l[:, None, :]).any(-1).float().mean().item()
    assert shared < 0.8, shared  # the mismatched input picks other latents


def test_an_sae_refuses_a_harvest_of_the_other_convention(two_harvests, tmp_path):
    sae = TopKSAE(508, 1016, 8)
    for made_on, harvest_of in (("unit", "lucent"), ("lucent", "unit")):
        sae.save(tmp_path / made_on, layer="mixed4a", input_scale=made_on)
        loaded = TopKSAE.load(tmp_path / made_on)
        with pytest.raises(InputScaleMismatch, match=f"trained on activations of '{made_on}' inputs"):
            check_input_scale(loaded, read_manifest(two_harvests[harvest_of]).input_scale, tmp_path / made_on)
        check_input_scale(loaded, read_manifest(two_harvests[made_on]).input_scale, tmp_path / made_on)  # no error


def test_the_authors_saes_get_a_harvest_of_their_convention(tmp_path):
    author, ours = open_run("smoke", str(tmp_path), "author"), open_run("smoke", str(tmp_path), "train")
    assert author.harvest_config().input_scale == "unit" and ours.harvest_config().input_scale == "lucent"
    assert author.harvest_dir != ours.harvest_dir
    assert "[0, 1] as they are" in author.banner() and "x*255-117" in ours.banner()


def test_a_checkpoint_resumes_only_on_the_vectors_it_was_made_on(two_harvests, tmp_path):
    """Train on a lucent harvest, put a unit harvest in its place, --resume: refused, naming both (it once trained
    on and wrote 'unit' into cfg.json); the original vectors back, it resumes."""
    import shutil

    from helpers.sae.checkpoint import CheckpointError

    run = tmp_path / "harvest"
    shutil.copytree(two_harvests["lucent"], run)
    cfg = dict(run=str(run), layer="mixed4a", out=str(tmp_path / "sae"), sae=SaeConfig(expansion=2, k=16),
               batch_size=64, holdout=0, device="cpu", checkpoint_every=64 * 2)
    train(TrainConfig(**cfg, vectors_seen=64 * 2))
    shutil.rmtree(run)
    shutil.copytree(two_harvests["unit"], run)
    with pytest.raises(CheckpointError, match=r"made on other vectors \(harvest \w+, 'lucent' inputs\) than these "
                                              r"\(harvest \w+, 'unit' inputs\)"):
        train(TrainConfig(**cfg, vectors_seen=64 * 4, resume=True))
    shutil.rmtree(run)
    shutil.copytree(two_harvests["lucent"], run)
    out = train(TrainConfig(**cfg, vectors_seen=64 * 4, resume=True))
    assert TopKSAE.load(out).metadata["input_scale"] == "lucent"


def test_the_seeing_tools_feed_an_sae_its_own_convention_and_refuse_another(tmp_path, random_model, image_dir):
    """example_pass, activation_map and ImageProbe once fed an SAE trained on [0, 1] inputs the model's x*255-117
    inputs by default: now they take the SAE's recorded convention, and refuse another by name."""
    from helpers.analysis.examples import activation_map, example_pass
    from helpers.analysis.image_features import ImageProbe
    from helpers.data.images import list_images

    TopKSAE(512, 1024, 8, seed=0).save(tmp_path / "unit", layer="mixed4c", input_scale="unit")
    sae = TopKSAE.load(tmp_path / "unit")
    images = list_images(str(image_dir)).head(2)
    pixels = torch.from_numpy(load_image(images.paths[0])).permute(2, 0, 1)
    with pytest.raises(InputScaleMismatch, match="trained on activations of 'unit' inputs"):
        example_pass(random_model, sae, "mixed4c", images, top=2, reservoir=2, batch_size=2, input_scale="lucent")
    with pytest.raises(InputScaleMismatch, match="'unit' inputs"):
        activation_map(random_model, sae, "mixed4c", pixels, 0, input_scale="lucent")
    with pytest.raises(InputScaleMismatch, match="'unit' inputs"):
        ImageProbe(random_model, "mixed4c", sae, np.zeros(1024, int), np.zeros(1024, int), input_scale="lucent")
    probe = ImageProbe(random_model, "mixed4c", sae, np.zeros(1024, int), np.zeros(1024, int))
    assert probe.input_scale == "unit"
    want = activation_map(random_model, sae, "mixed4c", pixels, 0, input_scale="unit")
    assert np.array_equal(activation_map(random_model, sae, "mixed4c", pixels, 0), want)  # the SAE's own by default
    with torch.no_grad():
        acts = LayerCapture(random_model, ["mixed4c"])(model_input_from_uint8(pixels[None], "unit"))["mixed4c"][0]
        z = sae.encode(acts.reshape(512, -1).T)[:, 0].numpy()
    assert np.allclose(want.ravel(), z, atol=1e-5)
