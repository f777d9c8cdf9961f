import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE, make_images, needs_sample
from helpers.data import store as store_module
from helpers.files import DiskFullError, read_json
from helpers.data.harvest import HarvestConfig, harvest, select_positions
from helpers.data.images import list_images, load_image
from helpers.data.inception import LayerCapture, model_input_from_uint8
from helpers.data.store import ActivationStore, StoreError, finished_shards


def recompute(model, path, layers):
    """Activations of one image, from scratch: decode, preprocess, full-precision forward."""
    x = model_input_from_uint8(torch.from_numpy(load_image(path)).permute(2, 0, 1)[None])
    with torch.no_grad():
        return {k: v[0] for k, v in LayerCapture(model, layers)(x).items()}


def test_stored_vectors_are_the_activations_at_their_positions(harvest_run, random_model):
    manifest = read_json(harvest_run / "manifest.json")
    paths = [Path(p) for p in manifest["images"]["paths"]]
    for layer in ("mixed4a", "mixed4c"):
        store = ActivationStore(harvest_run, layer)
        vectors = store.load().astype(np.float32)
        prov = store.load_provenance()
        assert len(vectors) == len(prov) == 7 * 10 and vectors.shape[1] == store.d
        for image in (0, 3, 6):
            acts = recompute(random_model, paths[image], [layer])[layer]  # [C, 14, 14]
            rows = np.flatnonzero(prov["image"] == image)
            assert len(rows) == 10
            for r in rows:
                truth = acts[:, prov["y"][r], prov["x"][r]].numpy()
                np.testing.assert_allclose(vectors[r], truth, rtol=2e-3, atol=1e-3 * np.abs(truth).max())
                assert prov["norm"][r] == pytest.approx(np.linalg.norm(truth), rel=1e-4)


def test_top_norm_keeps_the_largest_norms(harvest_run, random_model):
    manifest = read_json(harvest_run / "manifest.json")
    store = ActivationStore(harvest_run, "mixed4c")
    prov = store.load_provenance()
    for image in range(7):
        acts = recompute(random_model, Path(manifest["images"]["paths"][image]), ["mixed4c"])["mixed4c"]
        norms = acts.flatten(1).norm(dim=0).numpy()
        kept = prov[prov["image"] == image]
        assert len(set(zip(kept["y"], kept["x"]))) == 10  # no position twice
        np.testing.assert_allclose(np.sort(kept["norm"]), np.sort(norms)[-10:], rtol=1e-4)


def test_manifest_records_what_made_the_store(harvest_run):
    m = read_json(harvest_run / "manifest.json")
    assert m["complete"] and m["random_weights"] and "RANDOM" in m["warning"]
    assert m["weights_id"] == "random(seed=0)" and m["layers"] == ["mixed4a", "mixed4c"]
    assert m["branch_slices"]["mixed4c"]["5x5"] == [384, 448] and m["widths"] == {"mixed4a": 508, "mixed4c": 512}
    assert m["grid"]["mixed4c"] == [14, 14] and m["per_image"] == 10 and m["sampling"] == "top-norm"
    assert m["vectors"] == 70 and m["skipped"] == [] and len(m["images"]["paths"]) == 7
    assert m["images"]["labels"][1] == "box turtle" and m["images"]["classes"][1] == 37  # from the file name
    assert finished_shards(harvest_run) == [0, 1]
    assert [r["shard"] for r in map(json.loads, (harvest_run / "harvest.jsonl").read_text().splitlines())] == [0, 1]


def test_norm_weighted_sampling_follows_the_norms():
    torch.manual_seed(0)
    norms = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 0.0])  # 6 positions on a 2x3 grid
    acts = torch.randn(1, 5, 6)
    acts = (acts / acts.norm(dim=1, keepdim=True) * norms).reshape(1, 5, 2, 3)
    draws = 200_000
    vectors, pos, got_norms = select_positions(acts, draws, "norm-weighted", torch.rand(1, draws))
    freq = torch.bincount(pos[0], minlength=6).float() / draws
    np.testing.assert_allclose(freq.numpy(), (norms / norms.sum()).numpy(), atol=0.005)
    assert torch.allclose(got_norms[0], norms[pos[0]], atol=1e-5)
    assert torch.allclose(vectors[0, :, :], acts.flatten(2).transpose(1, 2)[0, pos[0]])


def test_norm_weighted_is_deterministic_for_a_seed_and_batch_size_free(tmp_path, image_dir):
    def run(name, seed, batch):
        out = harvest(HarvestConfig(images=str(image_dir), out=str(tmp_path / name), layers="mixed4b",
                                    weights="random", sampling="norm-weighted", batch_size=batch, shard_images=4,
                                    workers=0, seed=seed, max_images=5))
        return ActivationStore(out, "mixed4b").load_provenance()

    a, b, c = run("a", 1, 2), run("b", 1, 5), run("c", 2, 2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[["y", "x"]], c[["y", "x"]])
    assert (a["norm"] > 0).all()


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*.npy"))}


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in read_json(p).items() if k != "seconds"} for p in sorted((run / "shards").glob("*.json"))]


def test_interrupted_harvest_resumes_to_an_identical_store(tmp_path, image_dir, harvest_run, monkeypatch):
    cfg = dict(images=str(image_dir), layers="mixed4a,mixed4c", weights="random", batch_size=3, shard_images=4,
               workers=0, device="cpu")
    real_write = store_module.write_npy
    calls = []

    def dying_write(path, array):  # the process dies half-way through writing shard 1
        calls.append(path)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_write(path, array)

    monkeypatch.setattr(store_module, "write_npy", dying_write)
    with pytest.raises(KeyboardInterrupt):
        harvest(HarvestConfig(out=str(tmp_path / "run"), **cfg))
    assert finished_shards(tmp_path / "run") == [0]  # shard 1 has files but no record: not done
    assert not read_json(tmp_path / "run" / "manifest.json")["complete"]
    with pytest.raises(StoreError, match="not finished"):
        ActivationStore(tmp_path / "run", "mixed4a")
    assert not list((tmp_path / "run").rglob("*.tmp"))

    monkeypatch.setattr(store_module, "write_npy", real_write)
    harvest(HarvestConfig(out=str(tmp_path / "run"), **cfg))
    assert _files(tmp_path / "run") == _files(harvest_run)
    assert _records(tmp_path / "run") == _records(harvest_run)


def test_disk_full_leaves_no_shard_looking_complete(tmp_path, image_dir, monkeypatch):
    import errno

    real_save = np.save
    saved = []

    def filling_disk(f, array, allow_pickle=False):  # room for shard 0's two files only
        if len(saved) == 2:
            f.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(1)
        return real_save(f, array, allow_pickle=allow_pickle)

    cfg = HarvestConfig(images=str(image_dir), out=str(tmp_path / "run"), layers="mixed4a", weights="random",
                        batch_size=4, shard_images=2, workers=0, max_images=5)
    monkeypatch.setattr(np, "save", filling_disk)
    with pytest.raises(DiskFullError, match="disk full while writing .*resumes"):
        harvest(cfg)
    run = tmp_path / "run"
    assert finished_shards(run) == [0]
    assert sorted(p.name for p in run.rglob("*.npy")) == ["000000.provenance.npy", "000000.vectors.npy"]
    assert not list(run.rglob("*.tmp"))

    monkeypatch.setattr(np, "save", real_save)  # space freed: the same command finishes the job
    harvest(cfg)
    assert finished_shards(run) == [0, 1, 2] and len(ActivationStore(run, "mixed4a")) == 50


def test_corrupt_files_are_counted_skipped_and_listed(tmp_path):
    folder = tmp_path / "imgs"
    make_images(folder, 3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = harvest(HarvestConfig(images=str(folder), out=str(tmp_path / "run"), layers="mixed4a", weights="random",
                                batch_size=2, workers=0))
    m = read_json(out / "manifest.json")
    assert len(m["skipped"]) == 1 and m["skipped"][0][1].endswith("broken.jpg") and m["skipped"][0][2]
    assert m["vectors"] == 30
    prov = ActivationStore(out, "mixed4a").load_provenance()
    broken = [str(p) for p in list_images(folder).paths].index(str(folder / "broken.jpg"))
    assert broken not in set(prov["image"])


def test_decoding_jpegs_on_the_device_gives_nearly_the_same_store(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    for path in make_images(folder, 5):  # as JPEGs, plus one PNG and a broken JPEG
        Image.open(path).convert("RGB").resize((533, 400)).save(path.with_suffix(".jpg"), quality=92)
        if path.stem[-1] != "0":
            path.unlink()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    runs = {}
    for decode in ("workers", "device"):
        runs[decode] = harvest(HarvestConfig(images=str(folder), out=str(tmp_path / decode), layers="mixed4a",
                                             weights="random", batch_size=3, workers=0, decode=decode))
    a, b = (read_json(runs[d] / "manifest.json") for d in ("workers", "device"))
    assert len(b["skipped"]) == 1 and b["skipped"][0][1].endswith("broken.jpg")
    assert a["vectors"] == b["vectors"] == 60 and "decoded on cpu" in b["input"] and a["input"] != b["input"]
    pa, pb = (ActivationStore(runs[d], "mixed4a").load_provenance() for d in ("workers", "device"))
    assert np.array_equal(pa["image"], pb["image"])
    # decoders differ by at most one grey level, which barely moves the activations
    assert np.abs(pa["norm"] - pb["norm"]).max() < 0.005 * pa["norm"].max()  # 0.0008 seen; 0.016 unantialiased


def test_rerun_with_other_settings_is_refused(tmp_path, image_dir):
    cfg = HarvestConfig(images=str(image_dir), out=str(tmp_path / "run"), layers="mixed4a", weights="random",
                        workers=0, max_images=2)
    harvest(cfg)
    cfg.per_image = 5
    with pytest.raises(StoreError, match="other settings \\(per_image"):
        harvest(cfg)


def test_bad_settings_have_clear_errors(tmp_path, image_dir):
    with pytest.raises(ValueError, match="exceeds the 14x14 grid"):
        harvest(HarvestConfig(images=str(image_dir), out=str(tmp_path / "a"), layers="mixed4a", weights="random",
                              workers=0, per_image=197, max_images=1))
    with pytest.raises(ValueError, match="--sampling 'random' is not a choice; choose from top-norm, norm-weighted"):
        harvest(HarvestConfig(images=str(image_dir), out=str(tmp_path / "b"), sampling="random", weights="random"))
    with pytest.raises(StoreError, match="no manifest.json"):
        ActivationStore(tmp_path, "mixed4a")


@needs_sample
def test_harvest_real_imagenet_images(tmp_path):
    """Greyscale and small images from the real sample go through; labels come from the names."""
    names = sorted(p.name for p in SAMPLE.glob("*.JPEG"))
    from PIL import Image
    odd = [n for n in names[:400] if Image.open(SAMPLE / n).mode != "RGB" or min(Image.open(SAMPLE / n).size) < 224]
    chosen = (odd[:3] + names[:3])
    (tmp_path / "list.txt").write_text("\n".join(str(SAMPLE / n) for n in chosen))
    out = harvest(HarvestConfig(images=str(tmp_path / "list.txt"), out=str(tmp_path / "run"), layers="mixed4e",
                                weights="random", workers=0))
    m = read_json(out / "manifest.json")
    assert m["vectors"] == 10 * len(chosen) and m["skipped"] == []
    assert m["images"]["classes"][-3:] == [0, 1, 2]


def _can_mount_tmpfs() -> str | None:
    """Why a private tmpfs cannot be mounted here, or None (it can: root, with unshare)."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs root and unshare to mount a small tmpfs in a private mount namespace"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    return None if probe.returncode == 0 else f"unshare -m is not allowed here ({probe.stderr.decode().strip()})"


def test_a_real_full_disk_is_named_and_the_rerun_finishes(tmp_path, image_dir):
    """A 512 KB tmpfs in a private mount namespace: the real error of a full disk, not a simulated one."""
    import subprocess
    import sys

    reason = _can_mount_tmpfs()
    if reason:
        pytest.skip(reason)
    mount = tmp_path / "small"
    mount.mkdir()
    harvest_cmd = (f"{sys.executable} -m helpers harvest --images {image_dir} --out {mount}/run --layers mixed4e "
                   "--weights random --workers 0 --device cpu --shard-images 2 --per-image 100")  # 333 KB a shard
    script = (f"mount -t tmpfs -o size=512k tmpfs {mount} && {{ {harvest_cmd}; echo first=$?; "
              f"cp -r {mount}/run {tmp_path}/copy; }}")
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True, timeout=600)
    assert "first=2" in done.stdout, done.stdout + done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "disk full while writing" in error[0] and "free some space" in error[0], done.stderr
    assert "Traceback" not in done.stderr
    copy = tmp_path / "copy"  # what the full disk left: finished shards only, no partial file, no .tmp
    assert not list(copy.rglob("*.tmp")) and not read_json(copy / "manifest.json")["complete"]
    committed = finished_shards(copy)
    assert committed and all((copy / "mixed4e" / f"{k:06d}.vectors.npy").exists() for k in committed)
    # with room again, the same command finishes the job and the store is whole
    again = subprocess.run(harvest_cmd.replace(f"{mount}/run", str(copy)).split(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert len(ActivationStore(copy, "mixed4e")) == 7 * 100


def test_a_refused_setting_writes_nothing_so_the_corrected_rerun_runs(tmp_path, image_dir):
    cfg = dict(images=str(image_dir), out=str(tmp_path / "run"), layers="mixed4a", weights="random", workers=0)
    with pytest.raises(ValueError, match="--per-image 197 exceeds the 14x14 grid"):
        harvest(HarvestConfig(per_image=197, **cfg))
    assert not (tmp_path / "run" / "manifest.json").exists()
    harvest(HarvestConfig(per_image=196, **cfg))
    for bad in (dict(per_image=0), dict(max_images=0), dict(max_images=-1), dict(shard_images=-2),
                dict(shard_images=0), dict(batch_size=-4), dict(per_image=-3), dict(workers=-1)):
        option = "--" + next(iter(bad)).replace("_", "-")
        with pytest.raises(ValueError, match=f"{option} .* is out of range"):
            HarvestConfig(**{**cfg, **bad})
