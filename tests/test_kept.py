"""The harvest's kept layer input: the example pass that starts from it finds what the whole network finds."""

import errno
import logging
import shutil

import numpy as np
import pytest
import torch

from conftest import make_images
from helpers.analysis.examples import example_passes
from helpers.data import kept as kept_module
from helpers.data.harvest import HarvestConfig, harvest
from helpers.data.images import list_images
from helpers.data.inception import LayerCapture, load_model
from helpers.data.kept import KeptInputs, input_name
from helpers.data.store import read_manifest
from helpers.sae.model import TopKSAE

LAYERS = ("mixed4a", "mixed4c", "mixed4e")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eleven images, the eighth of them unreadable (inside a batch of five that crosses a shard of four)."""
    folder = tmp_path_factory.mktemp("kept-images")
    make_images(folder, 10, seed=3)
    (folder / "n02104029_kuvasz_0006b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def _harvest(folder, out, **kw):
    cfg = dict(images=str(folder), out=str(out), layers=",".join(LAYERS), weights="random", batch_size=3,
               shard_images=4, workers=0, device="cpu", keep_input_of="mixed4a")
    return harvest(HarvestConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def kept_run(images, tmp_path_factory):
    return _harvest(images, tmp_path_factory.mktemp("kept") / "run")


@pytest.fixture(scope="module")
def saes(random_model, images):
    """Random SAEs of the three layers with their decoder bias at the layer's mean (features that fire)."""
    x = torch.rand(4, 3, 224, 224) * 255 - 117
    with torch.no_grad():
        acts = LayerCapture(random_model, list(LAYERS))(x)
    out = {}
    for i, (layer, a) in enumerate(acts.items()):
        out[layer] = TopKSAE(a.shape[1], 64, 6, "full", seed=i)
        with torch.no_grad():
            out[layer].b_dec.copy_(a.mean(dim=(0, 2, 3)))
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for layer in a:
        for name, value in a[layer].__dict__.items():
            if isinstance(value, np.ndarray):
                assert np.array_equal(value, getattr(b[layer], name)), (layer, name)
        assert a[layer].images_seen == b[layer].images_seen


def _stem_calls(model):
    calls = []
    return calls, model.conv2d0_pre_relu_conv.register_forward_pre_hook(lambda *_: calls.append(1))


def test_the_kept_tensor_is_the_one_mixed4a_reads():
    model = load_model("random", seed=0)[0]
    assert input_name(type(model), "mixed4a") == "maxpool4"
    assert input_name(type(model), "mixed4c") == "mixed4b"


def test_the_pass_from_the_kept_input_finds_what_the_whole_network_finds(kept_run, images, saes, random_model):
    manifest = read_manifest(kept_run)
    assert len(manifest.skipped) == 1
    kept = KeptInputs.find(kept_run, manifest)
    assert kept is not None and kept.layer == "mixed4a" and kept.name == "maxpool4"
    listed = list_images(images)
    calls, hook = _stem_calls(random_model)
    try:
        # batches of 5 cross the shards of 4 and the unreadable image
        fast = example_passes(random_model, saes, listed, top=3, reservoir=4, batch_size=5, kept=kept)
        from_kept = len(calls)
        whole = example_passes(random_model, saes, listed, top=3, reservoir=4, batch_size=5)
    finally:
        hook.remove()
    assert from_kept == 1  # the stem ran once, for the check of the first images, not per batch
    assert len(calls) == from_kept + 3
    _same(fast, whole)
    assert (fast["mixed4c"].top_image >= 0).any()


def test_kept_inputs_of_other_weights_are_not_used(kept_run, images, saes):
    other = load_model("random", seed=1)[0]
    listed = list_images(images)
    with pytest.warns(UserWarning, match="differ from what the network computes now"):
        got = example_passes(other, saes, listed, top=3, reservoir=4, batch_size=5,
                             kept=KeptInputs.find(kept_run, read_manifest(kept_run)))
    _same(got, example_passes(other, saes, listed, top=3, reservoir=4, batch_size=5))


def test_a_kept_file_missing_or_cut_short_means_none(kept_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(kept_run, run)
    shard = run / "kept-maxpool4" / "000001.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert KeptInputs.find(run, read_manifest(run)) is None
    shard.unlink()
    assert KeptInputs.find(run, read_manifest(run)) is None


def test_two_passes_over_one_harvest_each_remove_the_kept_input_once(kept_run, tmp_path):
    """Two example passes over the same harvest at once (a chapter and a test, two readers' kernels): the first to end
    deletes the kept files and counts their bytes; the other reads its rows on, then removes nothing, without error."""
    run = tmp_path / "run"
    shutil.copytree(kept_run, run)
    first, second = (KeptInputs.find(run, read_manifest(run)) for _ in range(2))
    want = second.rows(0, 3).clone()
    size = sum(p.stat().st_size for p in (run / "kept-maxpool4").iterdir())
    assert first.remove() == size > 0 and not (run / "kept-maxpool4").exists()
    torch.testing.assert_close(second.rows(0, 3), want, rtol=0, atol=0)
    assert second.remove() == 0


def test_an_interrupted_harvest_resumes_to_the_same_kept_files(images, kept_run, tmp_path, monkeypatch):
    real_add, calls = kept_module.KeptWriter.add, []

    def dying_add(self, *args):  # killed in the middle of shard 1
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_add(self, *args)

    monkeypatch.setattr(kept_module.KeptWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        _harvest(images, tmp_path / "run")
    assert not list((tmp_path / "run").rglob("*.tmp"))
    monkeypatch.setattr(kept_module.KeptWriter, "add", real_add)
    _harvest(images, tmp_path / "run")
    files = sorted(p.name for p in (kept_run / "kept-maxpool4").glob("*.npy"))
    assert files == ["000000.npy", "000001.npy", "000002.npy"]
    for name in files:
        assert (tmp_path / "run" / "kept-maxpool4" / name).read_bytes() == (kept_run / "kept-maxpool4" / name).read_bytes()


def test_no_room_on_the_disk_means_no_kept_files_and_the_same_store(images, kept_run, tmp_path, monkeypatch, caplog):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(kept_module.shutil, "disk_usage", lambda path: usage._replace(free=1 << 30))
    with caplog.at_level(logging.WARNING):
        run = _harvest(images, tmp_path / "run")
    assert "not keeping mixed4a's input" in caplog.text and "GB are free" in caplog.text
    assert not list(run.glob("kept-*")) and KeptInputs.find(run, read_manifest(run)) is None
    for layer in LAYERS:
        for p in sorted((kept_run / layer).iterdir()):
            assert (run / layer / p.name).read_bytes() == p.read_bytes()


def test_a_disk_that_fills_while_keeping_gives_them_up_and_the_harvest_finishes(images, tmp_path, monkeypatch, caplog):
    real_commit = kept_module.KeptWriter.commit

    def full(self, shard, n):
        if shard == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_commit(self, shard, n)

    monkeypatch.setattr(kept_module.KeptWriter, "commit", full)
    with caplog.at_level(logging.WARNING):
        run = _harvest(images, tmp_path / "run")
    assert "no longer keeping" in caplog.text and "No space left" in caplog.text
    assert read_manifest(run).complete and not list(run.glob("kept-*"))


def test_the_option_names_a_layer_the_pass_reaches():
    assert HarvestConfig(layers="mixed4b,mixed4c", keep_input_of="mixed4a").keep_input_of == "mixed4a"
    with pytest.raises(ValueError, match="--keep-input-of 'mixed4d' is not a mixed layer the harvest's pass reaches"):
        HarvestConfig(layers="mixed4a,mixed4c", keep_input_of="mixed4d")
    with pytest.raises(ValueError, match="name one of mixed3a, mixed3b, mixed4a"):
        HarvestConfig(layers="mixed4a", keep_input_of="4a")
