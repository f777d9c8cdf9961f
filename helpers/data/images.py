"""Image sources: a folder, a text file of paths, or a downloadable ImageNet subset; labels from ImageNet wnids.

Every source resolves to an ``ImageList``: a sorted list of files with an optional
ImageNet class per file (read from a wnid in the file or folder name, e.g.
``n01440764_tench.JPEG`` or ``train/n01440764/x.JPEG``). Loading converts any mode PIL
reads (greyscale, CMYK, RGBA, palette PNG) to RGB and resizes small images up; a file that
cannot be decoded is reported back, never raised, so a harvest counts and lists it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
WNID = re.compile(r"(?<![0-9a-z])(n\d{8})(?![0-9])")
RESIZE, CROP = 256, 224
JPEG_MAGIC = b"\xff\xd8\xff"


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 ILSVRC-2012 classes as ``(wnid, label)``; position = class index."""
    path = Path(__file__).with_name("imagenet_classes.tsv")
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines() if not line.startswith("#")]
    return tuple((w, l) for w, l in rows)


@lru_cache(maxsize=1)
def _class_index() -> dict[str, int]:
    return {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}


def wnid_of(path: Path) -> str | None:
    """The ImageNet wnid in a file's name or, failing that, its nearest folder name."""
    for part in (path.name, *(p.name for p in path.parents)):
        m = WNID.search(part)
        if m and m.group(1) in _class_index():
            return m.group(1)
    return None


@dataclass
class ImageList:
    """Files in a fixed order, with ImageNet class indices (-1 where unknown)."""

    paths: list[Path]
    classes: list[int] = field(default_factory=list)
    source: str = ""

    def __post_init__(self):
        if not self.classes:
            idx = _class_index()
            self.classes = [idx.get(wnid_of(p) or "", -1) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def head(self, n: int | None) -> "ImageList":
        if n is None or n >= len(self):
            return self
        return ImageList(self.paths[:n], self.classes[:n], self.source)

    def to_record(self) -> dict:
        labels = imagenet_classes()
        return {
            "source": self.source,
            "paths": [str(p) for p in self.paths],
            "classes": self.classes,
            "labels": [labels[c][1] if c >= 0 else None for c in self.classes],
        }


# freely downloadable ImageNet subsets (no login): name -> [(archive URL, folder it unpacks to, folders of images)]
FASTAI = "https://s3.amazonaws.com/fast-ai-imageclas"
DOWNLOADS = {
    # Imagenette (10 easy classes, 2 of them animals) and Imagewoof (10 dog breeds), both splits, 320 px:
    # 26,394 images of 20 classes, 12 of them animals (the paper's findings are about animal features)
    "imagenette+imagewoof": [(f"{FASTAI}/imagenette2-320.tgz", "imagenette2-320", ("train", "val")),
                             (f"{FASTAI}/imagewoof2-320.tgz", "imagewoof2-320", ("train", "val"))],
    # one image of each of the 1000 ImageNet classes (398 animal classes): the most diverse, but few
    "imagenet-sample": [("https://github.com/EliSchwartz/imagenet-sample-images/archive/refs/heads/master.zip",
                         "imagenet-sample-images-master", ("",))],
}


def list_images(source: str | Path, *, cache_dir: str | Path | None = None) -> ImageList:
    """Resolve an image source to an ``ImageList``.

    source: a folder (searched recursively), a ``.txt`` file of paths (one per line,
    relative to the file), ``"imagenette"`` (torchvision's Imagenette validation split), or a
    name in ``DOWNLOADS`` (``"imagenette+imagewoof"``, ``"imagenet-sample"``); the downloads
    happen once, into ``cache_dir``.
    """
    if str(source) == "imagenette":
        return _imagenette(cache_dir)
    if str(source) in DOWNLOADS:
        return _downloaded(str(source), cache_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(
                f"no images in {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively); "
                "point --images at a folder of images, a .txt list of paths, or 'imagenette'"
            )
        return ImageList(files, source=str(path))
    if path.is_file() and path.suffix.lower() == ".txt":
        try:
            lines = [ln.strip() for ln in path.read_text(errors="surrogateescape").splitlines()]
        except OSError as e:
            raise FileNotFoundError(f"cannot read the image list {path} ({e})") from e
        if any("\x00" in ln for ln in lines):
            raise FileNotFoundError(f"the image list {path} is not text (it holds NUL bytes); give a .txt file "
                                    "with one image path per line")
        files = [(path.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines if ln and not ln.startswith("#")]
        if not files:
            raise FileNotFoundError(f"the image list {path} names no files")
        return ImageList(files, source=str(path))
    raise FileNotFoundError(
        f"image source {str(source)!r} not found: give a folder of images, a .txt list of paths, or 'imagenette'"
    )


def default_cache_dir() -> Path:
    return Path(torch.hub.get_dir()).parent / "inception-sae" / "datasets"


def _imagenette(cache_dir) -> ImageList:
    from torchvision.datasets import Imagenette

    root = Path(cache_dir or default_cache_dir())
    root.mkdir(parents=True, exist_ok=True)
    try:
        ds = Imagenette(str(root), split="val", size="320px", download=not (root / "imagenette2-320").is_dir())
    except Exception as e:  # network errors surface as URLError, OSError, RuntimeError
        raise FileNotFoundError(
            f"could not download Imagenette into {root} ({e}). With internet this happens once; "
            "offline, pass --images with a folder of images instead"
        ) from e
    del ds  # downloaded and verified; its folders are named by wnid
    images = list_images(root / "imagenette2-320" / "val")
    images.source = "imagenette:val:320px"
    return images


def _downloaded(name: str, cache_dir) -> ImageList:
    """A ``DOWNLOADS`` image set: each archive downloaded and unpacked once (a folder that exists is
    reused, so an interrupted unpacking is redone by deleting it), its images listed in a fixed order."""
    from torchvision.datasets.utils import download_and_extract_archive

    root = Path(cache_dir or default_cache_dir())
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for url, folder, parts in DOWNLOADS[name]:
        if not (root / folder / ".complete").exists():
            try:
                download_and_extract_archive(url, str(root), remove_finished=True)
            except Exception as e:  # network errors surface as URLError, OSError, RuntimeError
                raise FileNotFoundError(
                    f"could not download {url} into {root} ({e}). With internet this happens once; offline, "
                    "pass --images with a folder of images instead") from e
            (root / folder / ".complete").touch()
        for part in parts:
            paths += list_images(root / folder / part).paths
    return ImageList(paths, source=name)


MAX_ASPECT = 4  # longer side / shorter side beyond which the image is centre-cropped before resizing


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB image with the same content: palettes and alpha flattened, and 16-bit and float
    greyscale scaled to 8 bits (``convert("RGB")`` alone clips them to white or black)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"a {img.mode} image with non-finite values; save it as 8-bit")
        if img.mode == "F":  # floats: [0, 1] or [0, 255]
            top = a.max()
            if a.min() < 0 or top > 255:
                raise ValueError(f"a float image with values in [{a.min():.3g}, {top:.3g}], neither [0, 1] "
                                 "nor [0, 255]; save it as 8-bit")
            a = a * 255 if top <= 1 else a
        elif img.mode.startswith("I;16") or a.max() > 255:  # 16-bit samples
            if a.min() < 0 or a.max() > 65535:
                raise ValueError(f"a 32-bit integer image with values in [{a.min():.0f}, {a.max():.0f}]; "
                                 "save it as 8- or 16-bit")
            a = a / 257
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("P", "LA", "PA"):
        return img.convert("RGBA").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path, resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """Decode (a path or file object), convert to RGB, Resize(resize) + CenterCrop(crop):
    uint8 [crop, crop, 3]. An image more than ``MAX_ASPECT`` times longer than wide (or the
    reverse) is first centre-cropped to that ratio, which keeps what the centre crop sees and
    bounds the memory of the resize (a 1 x 6000 image would become 256 x 1.5M pixels)."""
    with Image.open(path) as img:
        img.load()
        w, h = img.size
        if max(w, h) > MAX_ASPECT * min(w, h):
            long = MAX_ASPECT * min(w, h)
            left, top = (w - min(w, long)) // 2, (h - min(h, long)) // 2
            img = img.crop((left, top, left + min(w, long), top + min(h, long)))
        return np.array(resize_and_crop(to_rgb(img), resize, crop), dtype=np.uint8)


def resize_and_crop(img: Image.Image, resize: int = RESIZE, crop: int = CROP) -> Image.Image:
    """torchvision's ``CenterCrop(crop)(Resize(resize)(img))`` of a PIL image, pixel for pixel, in PIL alone: the
    shorter side bilinearly to ``resize`` (the longer one in proportion, truncated), then the centre ``crop`` x
    ``crop`` (zero-padded where the image is smaller). Importing torchvision for these two calls cost every process
    that reads an image 1.3-1.8 s (it imports all its models and, with them, ``torch._dynamo``)."""
    w, h = img.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    if size != (w, h):
        img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    pad_w, pad_h = max(crop - w, 0), max(crop - h, 0)  # torchvision pads (pad // 2 before), then crops the centre
    left = int(round((w + pad_w - crop) / 2.0)) - pad_w // 2
    top = int(round((h + pad_h - crop) / 2.0)) - pad_h // 2
    return img.crop((left, top, left + crop, top + crop))  # PIL fills outside the image with zeros


class ImageDataset(Dataset):
    """Items are ``(index, uint8 tensor or None, error message or None)``.

    The tensor is the decoded image [3, crop, crop]; with ``encoded=True`` a JPEG file is
    passed on undecoded as its bytes (1-D uint8) for ``decode_on_device``, and only other
    formats are decoded here.
    """

    def __init__(self, images: ImageList, resize: int = RESIZE, crop: int = CROP, encoded: bool = False):
        self.images, self.resize, self.crop, self.encoded = images, resize, crop, encoded

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        path = self.images.paths[i]
        try:
            if self.encoded:
                data = Path(path).read_bytes()
                if data[:3] == JPEG_MAGIC:
                    return i, torch.frombuffer(bytearray(data), dtype=torch.uint8), None
            arr = load_image(path, self.resize, self.crop)
        except Exception as e:  # a corrupt, truncated or non-image file: reported, not raised
            return i, None, f"{type(e).__name__}: {e}"
        return i, torch.from_numpy(arr).permute(2, 0, 1).contiguous(), None


def collate(items):
    """Stack the images that decoded; return ``(indices, images, [(index, error), ...])``.

    JPEG bytes (``ImageDataset(encoded=True)``) have no common shape: then ``images`` is
    the list of items, for ``decode_on_device``.
    """
    good = [(i, x) for i, x, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    if not good:
        return torch.empty(0, dtype=torch.long), None, bad
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    if any(x.ndim == 1 for _, x in good):
        return idx, [x for _, x in good], bad
    return idx, torch.stack([x for _, x in good]), bad


def decode_on_device(items: list[torch.Tensor], device: torch.device, resize: int = RESIZE, crop: int = CROP):
    """JPEG bytes -> uint8 [n, 3, crop, crop] on ``device``: decoded there (nvJPEG on CUDA),
    then Resize(resize) with antialiasing and CenterCrop(crop) as tensors. Items that are
    already decoded [3, crop, crop] pass through.

    A JPEG the device decoder refuses (e.g. CMYK on nvJPEG) is decoded by PIL instead; one
    nobody can decode is reported. Returns (positions kept, pixels or None, [(position, error)]).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(items)
    errors = []
    jpegs = [j for j, x in enumerate(items) if x.ndim == 1]
    try:
        decoded = decode_jpeg([items[j] for j in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
        decoded = [_fit(img, resize, crop) for img in decoded]
    except RuntimeError:  # one bad file fails the batch: decode one by one to find it
        decoded = [_decode_one(items[j], device, resize, crop) for j in jpegs]
    for j, img in zip(jpegs, decoded):
        if isinstance(img, str):
            errors.append((j, img))
        else:
            out[j] = img
    for j, x in enumerate(items):
        if x.ndim == 3:
            out[j] = x.to(device, non_blocking=True)
    keep = [j for j, x in enumerate(out) if x is not None]
    return keep, (torch.stack([out[j] for j in keep]) if keep else None), errors


def _fit(img: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """Resize (shorter side, antialiased, as PIL does) and centre-crop a [3, H, W] tensor."""
    from torchvision.transforms import functional as TF

    return TF.center_crop(TF.resize(img, resize, antialias=True), crop)


def _decode_one(data: torch.Tensor, device, resize, crop) -> torch.Tensor | str:
    """One JPEG on the device, else by PIL; resized and cropped. Or the error, as text."""
    import io

    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return _fit(decode_jpeg(data, mode=ImageReadMode.RGB, device=device), resize, crop)
    except RuntimeError:
        pass
    try:
        arr = load_image(io.BytesIO(data.numpy().tobytes()), resize, crop)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(device)


def generate_images(folder: str | Path, n: int, seed: int = 0, size: tuple[int, int] = (256, 320)) -> ImageList:
    """Synthetic test images: smooth colour fields with a few discs and bars, PNG.

    Named ``<wnid>_<label>_<i>.png`` after ImageNet classes spread over the 1000, so they
    carry labels like real sample images. For pipeline runs where no photographs exist.
    """
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(1, 5)):
            x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(8, 60)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
            else:
                draw.rectangle([x - r, y - r // 4, x + r, y + r // 4], fill=colour)
        wnid, label = imagenet_classes()[(i * 37) % 1000]
        path = folder / f"{wnid}_{label.replace(' ', '_').replace('/', '_')}_{i:04d}.png"
        if not path.exists():
            img.save(path)
        paths.append(path)
    return ImageList(paths, source=f"generated(n={n}, seed={seed})")


def grid(tiles, size: int, per_row: int, gap: int = 0, background=(235, 235, 235),
         width: int | None = None) -> Image.Image:
    """Images (uint8 [h, w, 3] arrays; None leaves a blank slot) resized to ``width`` x ``size`` px
    (square by default) and laid out ``per_row`` to a row with ``gap`` px between them: the one tiling
    routine of the figures and the atlas."""
    tiles, width = list(tiles), width or size
    rows = max(1, -(-len(tiles) // per_row))
    across, down = width + gap, size + gap
    sheet = Image.new("RGB", (min(len(tiles), per_row) * across - gap if tiles else width, rows * down - gap),
                      background)
    for i, t in enumerate(tiles):
        if t is not None:
            sheet.paste(Image.fromarray(np.asarray(t, np.uint8)).resize((width, size)),
                        ((i % per_row) * across, (i // per_row) * down))
    return sheet
