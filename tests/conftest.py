import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import pytest

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "imagenet-sample"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"the ImageNet sample is not at {SAMPLE}")


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from helpers.data.images import generate_images

    return generate_images(folder, n, seed).paths


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    make_images(folder, 7)
    return folder


@pytest.fixture(scope="session")
def random_model():
    from helpers.data.inception import load_model

    return load_model("random", seed=0)[0]


@pytest.fixture(scope="session")
def harvest_run(tmp_path_factory, image_dir) -> Path:
    """A small finished harvest over two layers, made once per session."""
    from helpers.data.harvest import HarvestConfig, harvest

    out = tmp_path_factory.mktemp("runs") / "harvest"
    return harvest(HarvestConfig(images=str(image_dir), out=str(out), layers="mixed4a,mixed4c", weights="random",
                                 batch_size=3, shard_images=4, workers=0, device="cpu"))


# what `make book` says offline (helpers.data.inception's message): the built book shows it in its banner
FALLBACK = ("- could not download the pretrained InceptionV1 weights (offline). Download that file on a machine with "
            "internet and put it at ~/.cache/torch/hub/checkpoints/inception5h.pth, or pass --weights PATH.pth")


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """Every notebook executed in the smoke profile, and the book built from them (once)."""
    from helpers.run import book
    from helpers.run.artifacts import open_run

    root = tmp_path_factory.mktemp("book")
    env = {"SAE_PROFILE": "smoke", "SAE_BOOK_BUILD": "1", "SAE_FALLBACK_REASON": FALLBACK, "TQDM_DISABLE": "1",
           "SAE_RUN_DIR": str(root / "run")}
    executed = book.execute_notebooks(root / "executed", env, timeout=900)
    os.environ.update({k: v for k, v in env.items() if k != "SAE_BOOK_BUILD"})
    banner = open_run("smoke").banner()
    html = book.build_html(book.stage(executed, banner, root / "src", root / "run" / "atlas"), root / "out")
    return {"executed": {p.stem: p for p in executed}, "html": html, "run": root / "run"}


def stub_hub(monkeypatch, snapshot: Path, downloads: Path, dates: dict | None = None) -> None:
    """The Hugging Face hub, answering from a local folder: ``snapshot``'s files are the repository's (listing,
    digests, last commits from ``dates``), a download copies one into ``downloads`` as the hub cache would."""
    import hashlib
    import shutil
    from types import SimpleNamespace

    import huggingface_hub

    from helpers.run import author

    def entry(path):
        digest = hashlib.sha256((snapshot / path).read_bytes()).hexdigest()
        return SimpleNamespace(path=path, size=(snapshot / path).stat().st_size, lfs=SimpleNamespace(sha256=digest),
                               blob_id=digest, last_commit=SimpleNamespace(date=(dates or {}).get(path)))

    class Api:
        def list_repo_tree(self, repo, revision=None, recursive=False):
            return [entry(str(p.relative_to(snapshot))) for p in snapshot.rglob("*") if p.is_file()]

        def get_paths_info(self, repo, paths, expand=False, revision=None):
            return [entry(p) for p in paths]

    def download(repo, filename, revision=None, cache_dir=None):
        out = downloads / "snapshots" / ("d" * 40) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(snapshot / filename, out)
        return str(out)

    monkeypatch.setattr(author, "_reachable", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
