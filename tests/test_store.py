from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.data.batches import DeviceBatches, ShuffledBatches
from helpers.data.store import ActivationStore, StoreError


def _rows(n, d=3, offset=0):
    return (np.arange(offset, offset + n)[:, None] * np.ones((1, d))).astype(np.float16)


def test_every_row_once_per_epoch_in_a_new_order():
    arrays = [_rows(50), _rows(30, offset=50), _rows(20, offset=80)]
    stream = ShuffledBatches(arrays, batch_size=10, seed=0, buffer_rows=40, block_rows=16).batches()
    epoch1 = np.concatenate([next(stream)[:, 0].numpy() for _ in range(10)])
    epoch2 = np.concatenate([next(stream)[:, 0].numpy() for _ in range(10)])
    assert sorted(epoch1) == list(range(100)) and sorted(epoch2) == list(range(100))
    assert not np.array_equal(epoch1, np.arange(100)) and not np.array_equal(epoch1, epoch2)


def test_resuming_mid_stream_continues_exactly():
    arrays = [_rows(70), _rows(45, offset=70)]
    make = lambda: ShuffledBatches(arrays, batch_size=8, seed=3, buffer_rows=32, block_rows=16)
    stream = make().batches()
    full = np.concatenate([next(stream)[:, 0].numpy() for _ in range(40)])  # crosses epochs
    for start_batch in (1, 9, 14, 15, 29):
        resumed = make().batches(start=start_batch * 8)
        rest = np.concatenate([next(resumed)[:, 0].numpy() for _ in range(40 - start_batch)])
        assert np.array_equal(rest, full[start_batch * 8:])


def test_seed_changes_order_and_batches_are_float32():
    arrays = [_rows(64)]
    a = next(ShuffledBatches(arrays, 16, seed=0).batches())
    b = next(ShuffledBatches(arrays, 16, seed=1).batches())
    assert a.dtype.is_floating_point and a.element_size() == 4 and not np.array_equal(a.numpy(), b.numpy())


def test_empty_source_is_an_error():
    with pytest.raises(StoreError, match="no vectors"):
        ShuffledBatches([np.zeros((0, 4), np.float16)], 8)


def test_store_errors_name_the_fix(harvest_run):
    with pytest.raises(StoreError, match="'mixed4e' was not harvested .* holds mixed4a, mixed4c"):
        ActivationStore(harvest_run, "mixed4e")
    store = ActivationStore(harvest_run, "mixed4c")
    assert len(store) == 70 and store.d == 512 and store.branch_slices["pool"] == (448, 512)
    assert store.vectors(0).dtype == np.float16 and isinstance(store.vectors(0), np.memmap)
    assert len(store.load(max_vectors=45)) == 45


def test_device_batches_visit_every_row_once_per_epoch_and_resume_exactly():
    # row i holds the number i, so each batch says which rows it took
    arrays = [np.arange(30, dtype=np.float16)[:, None].repeat(3, 1), np.arange(30, 70, dtype=np.float16)[:, None]
              .repeat(3, 1)]
    stream = DeviceBatches(arrays, batch_size=16, seed=2).batches()
    rows = torch.cat([next(stream) for _ in range(9)])  # 144 rows: two full epochs and a bit
    assert rows.dtype == torch.float32 and rows.shape == (144, 3)
    ids = rows[:, 0].long()
    for epoch in range(2):
        assert sorted(ids[epoch * 70:(epoch + 1) * 70].tolist()) == list(range(70))
    assert not torch.equal(ids[:70], ids[70:140])  # a new order each epoch
    for start in (32, 40, 75):  # a batch boundary, mid-batch, and past an epoch
        resumed = torch.cat([next(DeviceBatches(arrays, 16, seed=2).batches(start=start)) for _ in range(1)])
        assert torch.equal(resumed[:, 0].long(), ids[start:start + 16])
    other = next(DeviceBatches(arrays, 16, seed=3).batches())
    assert not torch.equal(other[:, 0].long(), ids[:16])


def test_device_batches_larger_than_the_store_wrap_around():
    arrays = [np.arange(5, dtype=np.float16)[:, None]]
    batch = next(DeviceBatches(arrays, batch_size=12, seed=0).batches())
    ids = batch[:, 0].long().tolist()
    assert sorted(ids[:5]) == sorted(ids[5:10]) == [0, 1, 2, 3, 4]


# --- a damaged store is refused, named, and repaired by rerunning the harvest ----------------------
import json
import shutil

from helpers.config import HarvestConfig
from helpers.data.harvest import harvest
from helpers.data.store import read_manifest, shard_record_path, verify


@pytest.fixture
def run_copy(tmp_path, harvest_run):
    """A private copy of the session's finished harvest (7 images, shards of 4: two shards)."""
    return Path(shutil.copytree(harvest_run, tmp_path / "run"))


def _same_harvest(run, image_dir):
    return harvest(HarvestConfig(images=str(image_dir), out=str(run), layers="mixed4a,mixed4c", weights="random",
                                 batch_size=3, shard_images=4, workers=0, device="cpu"))


def test_a_deleted_commit_record_is_refused_then_redone(run_copy, image_dir):
    before = np.asarray(ActivationStore(run_copy, "mixed4c").vectors(1)).copy()
    shard_record_path(run_copy, 1).unlink()
    with pytest.raises(StoreError, match=r"(?s)damaged.*shard 1: no commit record.*same harvest command again"):
        ActivationStore(run_copy, "mixed4c")
    _same_harvest(run_copy, image_dir)
    store = ActivationStore(run_copy, "mixed4c")
    assert len(store) == 70 and np.array_equal(np.asarray(store.vectors(1)), before)
    assert verify(run_copy) == []


def test_a_vectors_file_with_half_its_rows_is_refused_then_redone(run_copy, image_dir):
    path = run_copy / "mixed4c" / "000000.vectors.npy"
    full = np.load(path)
    np.save(path, full[: len(full) // 2])  # a valid .npy, half the rows
    with pytest.raises(StoreError, match="shard 0: mixed4c/000000.vectors.npy has .* bytes, its record says"):
        ActivationStore(run_copy, "mixed4c")
    ActivationStore(run_copy, "mixed4a")  # the other layer is whole
    _same_harvest(run_copy, image_dir)  # the rerun notices and redoes shard 0
    assert np.array_equal(np.load(path), full) and verify(run_copy) == []


def test_verify_finds_a_flipped_byte_that_the_lengths_cannot(run_copy, capsys):
    from helpers.cli import main

    path = run_copy / "mixed4a" / "000001.vectors.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    ActivationStore(run_copy, "mixed4a")  # same length and rows: opening does not read the data
    assert verify(run_copy) == ["shard 1: mixed4a/000001.vectors.npy differs from its checksum (corrupted)"]
    assert main(["verify", "--run", str(run_copy)]) == 1
    assert "differs from its checksum" in capsys.readouterr().err


def test_shards_of_another_configuration_are_never_adopted(run_copy, image_dir):
    old = np.asarray(ActivationStore(run_copy, "mixed4a").vectors(0)).copy()
    (run_copy / "manifest.json").unlink()
    harvest(HarvestConfig(images=str(image_dir), out=str(run_copy), layers="mixed4a,mixed4c", weights="random",
                          batch_size=3, shard_images=4, workers=0, device="cpu", seed=1))
    assert read_manifest(run_copy).seed == 1
    new = np.asarray(ActivationStore(run_copy, "mixed4a").vectors(0))
    assert not np.array_equal(new, old)  # seed 1: other random weights, so other activations, all redone
    records = [json.loads(shard_record_path(run_copy, k).read_text()) for k in (0, 1)]
    assert {r["identity"] for r in records} == {read_manifest(run_copy).identity_hash()}


def test_a_second_harvest_into_the_same_directory_stops_at_once(run_copy, image_dir):
    from helpers.files import LockedError, exclusive_lock

    with exclusive_lock(run_copy / ".harvest.lock", "the harvest directory"):
        with pytest.raises(LockedError, match=r"in use by pid \d+ .*wait for it to finish, or choose another --out"):
            _same_harvest(run_copy, image_dir)
    _same_harvest(run_copy, image_dir)  # free again


def test_two_harvests_at_once_one_runs_one_stops(tmp_path, image_dir):
    """Two real processes into one directory: exactly one harvests, the other says why it stopped."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "helpers", "harvest", "--images", str(image_dir), "--out", str(tmp_path / "r"),
            "--layers", "mixed4a", "--weights", "random", "--workers", "0", "--device", "cpu", "--batch-size", "1"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.returncode, err) for p in procs for _, err in [p.communicate()]]  # reads both pipes while waiting
    codes = sorted(code for code, _ in results)
    if codes == [0, 0]:  # the first finished before the second started: no overlap to test
        pytest.skip("the two harvests did not overlap")
    assert codes == [0, 2], "\n\n".join(f"exit {code}:\n{err[-2000:]}" for code, err in results)
    assert "in use by pid" in next(err for code, err in results if code == 2)
    assert verify(tmp_path / "r") == []


def test_prefetch_keeps_the_order_and_raises_the_readers_error():
    from helpers.data.batches import prefetch

    arrays = [_rows(50), _rows(30, offset=50)]
    plain = ShuffledBatches(arrays, batch_size=8, seed=1, buffer_rows=32, block_rows=16).batches(start=13)
    ahead = prefetch(ShuffledBatches(arrays, batch_size=8, seed=1, buffer_rows=32, block_rows=16).batches(start=13))
    for _ in range(30):
        assert torch.equal(next(plain), next(ahead))

    def failing():
        yield torch.zeros(1)
        raise StoreError("cannot read shard 3")

    stream = prefetch(failing())
    assert torch.equal(next(stream), torch.zeros(1))
    with pytest.raises(StoreError, match="cannot read shard 3"):
        next(stream)


def test_one_copy_loading_gives_the_order_of_concatenate_then_permute():
    """The chunk is assembled by scattering each block to its rows' places; the order is the one of
    concatenating the blocks and permuting the rows (the stream's definition), checked directly."""
    from helpers.data.batches import _rng

    arrays = [_rows(50), _rows(30, offset=50), _rows(20, offset=80)]
    sb = ShuffledBatches(arrays, batch_size=10, seed=4, buffer_rows=40, block_rows=16)
    for c, chunk in enumerate(sb._chunks(0)):
        concatenated = np.concatenate([arrays[i][s:e] for i, s, e in chunk])
        expected = concatenated[_rng(4, "rows", 0, c).permutation(len(concatenated))]
        assert np.array_equal(sb._load(chunk, 0, c), expected)


def test_a_rerun_repairs_every_shard_verify_flags(run_copy, image_dir):
    """One flipped byte in a shard's vectors: `verify` says corrupted; the same harvest command again redoes that
    shard (it once checked lengths only and left it), and `verify` then finds nothing."""
    before = np.asarray(ActivationStore(run_copy, "mixed4c").vectors(1)).copy()
    path = run_copy / "mixed4c" / "000001.vectors.npy"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x5A
    path.write_bytes(bytes(data))
    assert any("000001.vectors.npy differs from its checksum" in p for p in verify(run_copy))
    _same_harvest(run_copy, image_dir)
    assert verify(run_copy) == []
    assert np.array_equal(np.asarray(ActivationStore(run_copy, "mixed4c").vectors(1)), before)


def test_a_changed_header_or_a_damaged_record_is_refused_and_repaired(run_copy, image_dir):
    """float16 relabelled int16 (the same bytes: it once trained to an FVU of 1.9), a commit record that is a
    list: each named, and the rerun repairs both."""
    path = run_copy / "mixed4c" / "000000.vectors.npy"
    path.write_bytes(path.read_bytes().replace(b"'<f2'", b"'<i2'", 1))
    with pytest.raises(StoreError, match="000000.vectors.npy holds int16 numbers, the store holds float16"):
        ActivationStore(run_copy, "mixed4c")
    shard_record_path(run_copy, 1).write_text("[]")
    problems = verify(run_copy)
    assert any("shard 1: damaged commit record" in p for p in problems), problems
    _same_harvest(run_copy, image_dir)
    assert verify(run_copy) == []


@pytest.mark.parametrize("n_shards", [0, 1, 3, 10**8])
def test_the_manifests_shard_count_must_fit_its_images(run_copy, n_shards):
    """7 images in shards of 4 are 2 shards: an edited count (half the data silently; 0 'all 0 shards match';
    10^8 hung) is refused at once."""
    record = json.loads((run_copy / "manifest.json").read_text())
    record["n_shards"] = n_shards
    (run_copy / "manifest.json").write_text(json.dumps(record))
    with pytest.raises(StoreError, match=f"says {n_shards} shards, but its 7 images make 2 of 4 images"):
        read_manifest(run_copy)


def test_a_manifest_that_is_not_an_object_is_named(run_copy):
    (run_copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(StoreError, match="not a readable harvest manifest .*not an object"):
        read_manifest(run_copy)


def test_a_busy_harvest_folder_is_refused_before_the_model_loads(run_copy, image_dir, monkeypatch):
    """The second harvest once loaded the model first (44 s with the real weights) and only then met the lock."""
    from helpers.data import harvest as harvest_module
    from helpers.files import LockedError, exclusive_lock

    loads = []
    real = harvest_module.load_model
    monkeypatch.setattr(harvest_module, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    with exclusive_lock(run_copy / ".harvest.lock", "the harvest directory"):
        with pytest.raises(LockedError):
            _same_harvest(run_copy, image_dir)
    assert loads == []
    with pytest.raises(ValueError, match="per-image"):  # a setting only the model checks leaves no new folder behind
        harvest(HarvestConfig(images=str(image_dir), out=str(run_copy.parent / "new"), layers="mixed4a",
                              weights="random", per_image=500, workers=0, device="cpu"))
    assert not (run_copy.parent / "new").exists()
    (run_copy.parent / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="--out .*afile is a file"):
        harvest(HarvestConfig(images=str(image_dir), out=str(run_copy.parent / "afile"), weights="random", workers=0))


def test_a_shards_buffer_is_bounded_in_bytes_and_stale_temporaries_go(run_copy, image_dir):
    """1,000 images at 196 positions once buffered 5 GiB before a shard was written: shards are now cut to fit
    SHARD_BYTES. A temporary file a kill left behind (57 MB once) is removed by the rerun."""
    from helpers.data.harvest import SHARD_BYTES, bounded_shards

    big = bounded_shards(HarvestConfig(per_image=196))
    assert big.shard_images < 1000
    assert big.shard_images * 196 * (2 * (508 + 512 + 512 + 528 + 832) + 5 * 28) <= SHARD_BYTES
    assert bounded_shards(HarvestConfig()).shard_images == 1000  # the default harvest is not cut
    stale = run_copy / "mixed4c" / ".000001.vectors.npy.abcd.tmp"
    stale.write_bytes(b"\0" * 1000)
    _same_harvest(run_copy, image_dir)
    assert not stale.exists() and verify(run_copy) == []
