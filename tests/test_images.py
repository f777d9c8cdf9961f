import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from helpers.data.images import ImageDataset, collate, decode_on_device, imagenet_classes, list_images, load_image, wnid_of


def test_imagenet_classes_table():
    classes = imagenet_classes()
    assert len(classes) == 1000 and classes[0] == ("n01440764", "tench")
    assert classes[151][1] == "Chihuahua" and classes[397][1] == "puffer"  # animals end at 397


def test_labels_from_file_and_folder_names(tmp_path):
    a = tmp_path / "n01440764_tench.JPEG"
    b = tmp_path / "train" / "n02085620" / "img_1.jpg"
    c = tmp_path / "holiday.png"
    for p in (a, b, c):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30)).save(p, format="PNG")
    images = list_images(tmp_path)
    by_name = dict(zip([p.name for p in images.paths], images.classes))
    assert by_name == {"n01440764_tench.JPEG": 0, "img_1.jpg": 151, "holiday.png": -1}
    assert wnid_of(b) == "n02085620"
    assert images.to_record()["labels"][images.paths.index(a)] == "tench"


def test_preprocessing_is_resize256_centercrop224(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)).save(path)
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])(Image.open(path).convert("RGB"))
    got = torch.from_numpy(load_image(path)).permute(2, 0, 1)
    assert got.shape == (3, 224, 224) and torch.equal(got, reference)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (256, 256), (257, 256), (224, 224), (300, 299), (299, 300),
                                  (513, 257), (1000, 333), (80, 56), (56, 80), (3, 5)])
@pytest.mark.parametrize("resize,crop", [(256, 224), (224, 224), (200, 224), (64, 100)])
def test_pil_resize_and_crop_are_torchvisions_pixel_for_pixel(size, resize, crop):
    """``resize_and_crop`` does in PIL what torchvision's Resize and CenterCrop do (no torchvision import in a
    process that reads images): the same pixels at every shape, upsampled, odd-sized, and where the crop is larger
    than the resized image (torchvision pads with zeros)."""
    from helpers.data.images import resize_and_crop

    img = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    reference = T.CenterCrop(crop)(T.Resize(resize)(img))
    got = resize_and_crop(img, resize, crop)
    assert got.size == reference.size == (crop, crop) and np.array_equal(np.asarray(got), np.asarray(reference))


def _odd_images(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.jpg")                      # 'L'
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")              # CMYK JPEG
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "rgba.png")   # RGBA
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")              # palette
    Image.fromarray(rgb[:20, :30]).save(tmp_path / "tiny.png")                    # 30x20 px
    Image.fromarray(rgb).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.jpg").write_text("this is not an image")
    return list_images(tmp_path)


def test_odd_and_corrupt_images(tmp_path):
    images = _odd_images(tmp_path)
    items = [ImageDataset(images)[i] for i in range(len(images))]
    errors = {images.paths[i].name: err for i, _, err in items if err}
    assert set(errors) == {"truncated.jpg", "notes.jpg"}
    for i, x, err in items:
        if err is None:
            assert x.dtype == torch.uint8 and x.shape == (3, 224, 224)
    idx, batch, bad = collate(items)
    assert batch.shape == (6, 3, 224, 224) and len(bad) == 2
    assert sorted(images.paths[i].name for i, _ in bad) == ["notes.jpg", "truncated.jpg"]
    grey = dict(zip((p.name for p in images.paths), items))["grey.jpg"][1]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_empty_folder_and_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images in"):
        list_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        list_images(tmp_path / "nowhere")


def test_text_list_of_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (50, 50)).save(tmp_path / "imgs" / "n01443537_goldfish.png")
    (tmp_path / "list.txt").write_text("# my images\nimgs/n01443537_goldfish.png\n\n")
    images = list_images(tmp_path / "list.txt")
    assert images.paths == [tmp_path / "imgs" / "n01443537_goldfish.png"] and images.classes == [1]


def test_imagenette_offline_says_what_to_do(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*a, **k):
        raise RuntimeError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.datasets, "Imagenette", offline)
    with pytest.raises(FileNotFoundError, match="could not download Imagenette .*pass --images"):
        list_images("imagenette", cache_dir=tmp_path)


def test_a_downloaded_image_set_is_fetched_once_and_labelled(tmp_path, monkeypatch):
    """Two archives laid out as Imagenette's and Imagewoof's (class folders named by wnid, train and val),
    served over HTTP from this machine: both unpacked, listed in order with their classes, not fetched again."""
    import functools
    import http.server
    import tarfile
    import threading

    from helpers.data import images as images_module

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    archives = []
    for name, wnids in (("nette", ["n01440764", "n03000684"]), ("woof", ["n02086240", "n02087394"])):
        src = tmp_path / "src" / name / f"{name}-320"
        for split in ("train", "val"):
            for w in wnids:
                (src / split / w).mkdir(parents=True)
                Image.new("RGB", (40, 30), (10, 20, 30)).save(src / split / w / f"{w}_1.JPEG")
        with tarfile.open(tmp_path / f"{name}.tgz", "w:gz") as tar:
            tar.add(src, arcname=f"{name}-320")
        archives.append((f"{url}/{name}.tgz", f"{name}-320", ("train", "val")))
    monkeypatch.setitem(images_module.DOWNLOADS, "test-set", archives)
    cache = tmp_path / "cache"
    got = list_images("test-set", cache_dir=cache)
    assert got.source == "test-set" and len(got) == 8
    assert [p.parent.name for p in got.paths[:4]] == ["n01440764", "n03000684"] * 2  # nette train, then val
    assert got.classes[:2] == [0, 491] and set(got.classes[4:]) == {155, 159}  # tench, chain saw; two dog breeds
    for archive in ("nette.tgz", "woof.tgz"):
        (tmp_path / archive).unlink()  # gone: a second listing must not need them
    assert list_images("test-set", cache_dir=cache).paths == got.paths
    server.shutdown()


def test_a_download_offline_says_what_to_do(tmp_path, monkeypatch):
    from helpers.data import images as images_module

    monkeypatch.setitem(images_module.DOWNLOADS, "test-set", [("http://nowhere.invalid/x.tgz", "x", ("",))])
    with pytest.raises(FileNotFoundError, match="could not download http://nowhere.invalid/x.tgz .*pass --images"):
        list_images("test-set", cache_dir=tmp_path)


def test_decoding_on_the_device_matches_pil_within_one_level(tmp_path):
    """The ``--decode device`` path (here on the CPU) against PIL decode + Resize + CenterCrop."""
    rng = np.random.default_rng(2)
    for i, size in enumerate([(375, 500), (500, 333), (260, 900)]):
        smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size[::-1], Image.BICUBIC)
        smooth.save(tmp_path / f"photo{i}.jpg", quality=90)
    images = _odd_images(tmp_path)
    pil = [ImageDataset(images)[i] for i in range(len(images))]
    encoded = [ImageDataset(images, encoded=True)[i] for i in range(len(images))]
    names = [p.name for p in images.paths]
    # JPEG files come undecoded (bytes), the rest decoded; unreadable files are reported in both
    assert {names[i] for i, x, err in encoded if err is None and x.ndim == 1} == {
        "grey.jpg", "cmyk.jpg", "full.jpg", "truncated.jpg", "photo0.jpg", "photo1.jpg", "photo2.jpg"}
    assert {names[i] for i, _, err in encoded if err} == {"notes.jpg"}
    idx, items, bad = collate(encoded)
    assert isinstance(items, list) and len(bad) == 1
    keep, pixels, errors = decode_on_device(items, torch.device("cpu"))
    assert [names[int(idx[j])] for j, _ in errors] == ["truncated.jpg"] and "truncated" in errors[0][1]
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(items) - 1, 3, 224, 224)
    for j, got in zip(keep, pixels):
        i = int(idx[j])
        want = pil[i][1]
        assert (got.int() - want.int()).abs().max() <= 1, names[i]


# --- images that convert("RGB") would blank, or that would blow up the resize ----------------------
def test_16_bit_and_float_greyscale_keep_their_content(tmp_path):
    ramp = np.linspace(0, 1, 300 * 300).reshape(300, 300)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float01.tif")
    Image.fromarray((ramp * 255).astype(np.float32)).save(tmp_path / "float255.tif")
    Image.fromarray((ramp * 255).astype(np.uint8)).save(tmp_path / "grey8.png")
    reference = load_image(tmp_path / "grey8.png").astype(int)
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")  # what convert("RGB") clips to white
    for name in ("grey16.png", "float01.tif", "float255.tif"):
        got = load_image(tmp_path / name).astype(int)
        assert np.abs(got - reference).max() <= 1, name  # the same ramp, within a grey level
    Image.fromarray((ramp * 1000).astype(np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(ValueError, match=r"float image with values in \[0, 1e\+03\].*save it as 8-bit"):
        load_image(tmp_path / "hdr.tif")


def test_an_extreme_aspect_ratio_is_cropped_before_the_resize(tmp_path):
    strip = np.zeros((1, 6000, 3), np.uint8)
    strip[:, 2990:3010] = 255  # the centre, which the centre crop shows
    Image.fromarray(strip).save(tmp_path / "strip.png")  # 18 KB; resized whole, 256 x 1.5M pixels
    out = load_image(tmp_path / "strip.png")
    assert out.shape == (224, 224, 3) and out.max() == 255
    wide = np.random.default_rng(0).integers(0, 255, (300, 900, 3), np.uint8)  # 3:1, under the cap: untouched
    Image.fromarray(wide).save(tmp_path / "wide.png")
    with Image.open(tmp_path / "wide.png") as img:
        expected = np.array(T.CenterCrop(224)(T.Resize(256)(img.convert("RGB"))))
    assert np.array_equal(load_image(tmp_path / "wide.png"), expected)


def test_a_binary_file_as_the_image_list_is_refused(tmp_path):
    (tmp_path / "list.txt").write_bytes(b"\x00\x01\x02PK\x03\x04" * 10)
    with pytest.raises(FileNotFoundError, match="list.txt is not text .*one image path per line"):
        list_images(tmp_path / "list.txt")


def test_a_file_name_that_is_not_utf8_is_harvested(tmp_path, image_dir):
    import os
    import shutil

    from helpers.config import HarvestConfig
    from helpers.data.harvest import harvest
    from helpers.data.store import ActivationStore

    folder = tmp_path / "imgs"
    folder.mkdir()
    first = sorted(image_dir.iterdir())[0]
    shutil.copy(first, os.fsdecode(bytes(folder) + b"/caf\xe9" + first.suffix.encode()))
    run = harvest(HarvestConfig(images=str(folder), out=str(tmp_path / "run"), layers="mixed4a", weights="random",
                                workers=0, device="cpu"))
    store = ActivationStore(run, "mixed4a")
    assert len(store) == 10 and os.fsencode(store.manifest.images["paths"][0]).endswith(b"caf\xe9.png")
