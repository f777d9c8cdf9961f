import numpy as np
import pytest
import torch

from helpers.store import ActivationStore, DeviceBatches, ShuffledBatches, StoreError


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
