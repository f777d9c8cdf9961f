import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import pytest
from PIL import Image

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "imagenet-sample"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"the ImageNet sample is not at {SAMPLE}")


def make_images(folder: Path, n: int, seed: int = 0, size=(256, 320)) -> list[Path]:
    """Smooth random colour images named like ImageNet files (wnid_label.png)."""
    from helpers.images import imagenet_classes

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize(size[::-1], Image.BICUBIC)
        wnid, label = imagenet_classes()[(i * 37) % 1000]
        path = folder / f"{wnid}_{label.replace(' ', '_')}_{i:03d}.png"
        img.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    make_images(folder, 7)
    return folder


@pytest.fixture(scope="session")
def random_model():
    from helpers.inception import load_model

    return load_model("random", seed=0)[0]


@pytest.fixture(scope="session")
def harvest_run(tmp_path_factory, image_dir) -> Path:
    """A small finished harvest over two layers, made once per session."""
    from helpers.harvest import HarvestConfig, harvest

    out = tmp_path_factory.mktemp("runs") / "harvest"
    return harvest(HarvestConfig(images=str(image_dir), out=str(out), layers="mixed4a,mixed4c", weights="random",
                                 batch_size=3, shard_images=4, workers=0, device="cpu"))
