import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from helpers.images import ImageDataset, collate, decode_on_device, imagenet_classes, list_images, load_image, wnid_of


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
