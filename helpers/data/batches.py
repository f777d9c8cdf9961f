"""Training batches from a store's rows: shuffled, deterministic and resumable streams.

``ShuffledBatches`` streams from the memory-mapped arrays on disk (a store larger than RAM trains
fine); ``DeviceBatches`` from one copy of all rows held on a device; ``prefetch`` makes the next
item on a background thread; ``random_rows`` samples rows without shuffling a whole store.
"""

from __future__ import annotations

import zlib
from typing import Iterator, Sequence

import numpy as np
import torch

from helpers.data.store import StoreError


def _rng(*keys) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(repr(keys).encode())])


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """The same items in the same order, each made on a background thread up to ``depth`` ahead of the one in
    use, so that reading (and shuffling) overlaps training: numpy's copies and torch's kernels both release
    the GIL. At most ``depth + 1`` items are in memory. An error in the making is raised here."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    maker = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    try:
        ahead = deque(maker.submit(next, items) for _ in range(depth))
        while True:
            try:
                item = ahead.popleft().result()
            except StopIteration:
                return
            ahead.append(maker.submit(next, items))
            yield item
    finally:
        maker.shutdown(wait=False, cancel_futures=True)


def random_rows(arrays: Sequence[np.ndarray], n: int, seed: int = 0) -> torch.Tensor:
    """``n`` rows drawn without replacement from all ``arrays`` (memmaps are fine; each is read in
    row order), float32 [n, d]: a sample without shuffling the whole store."""
    sizes = np.array([len(a) for a in arrays])
    n = min(n, int(sizes.sum()))
    picked = np.sort(np.random.default_rng([seed, 7]).choice(int(sizes.sum()), n, replace=False))
    edges = np.concatenate([[0], np.cumsum(sizes)])
    parts = [np.asarray(a[picked[(picked >= lo) & (picked < hi)] - lo]) for a, lo, hi in zip(arrays, edges, edges[1:])]
    return torch.from_numpy(np.concatenate(parts)).float()


class ShuffledBatches:
    """An endless, deterministic, resumable stream of shuffled batches over row arrays.

    The rows of all ``arrays`` (memmaps are fine) are cut into blocks; each epoch visits
    the blocks in a seeded random order, loads ``buffer_rows`` rows at a time and shuffles
    them. Row position ``p`` of the stream is a fixed function of the seed, so
    ``batches(start=p)`` continues a stream exactly where an interrupted run stopped.
    """

    def __init__(self, arrays: Sequence[np.ndarray], batch_size: int, seed: int = 0, *,
                 buffer_rows: int = 1 << 20, block_rows: int = 1 << 15):
        self.arrays = [a for a in arrays if len(a)]
        if not self.arrays:
            raise StoreError("no vectors to train on: the store or file is empty")
        self.batch_size, self.seed = batch_size, seed
        self.buffer_rows = max(buffer_rows, block_rows)
        self.blocks = [(i, s, min(s + block_rows, len(a)))
                       for i, a in enumerate(self.arrays) for s in range(0, len(a), block_rows)]
        self.rows = sum(len(a) for a in self.arrays)
        self.d = self.arrays[0].shape[1]

    def _chunks(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        order = _rng(self.seed, "blocks", epoch).permutation(len(self.blocks))
        chunks, current, n = [], [], 0
        for b in order:
            block = self.blocks[b]
            if current and n + block[2] - block[1] > self.buffer_rows:
                chunks.append(current)
                current, n = [], 0
            current.append(block)
            n += block[2] - block[1]
        return chunks + [current]

    def _load(self, chunk, epoch: int, c: int) -> np.ndarray:
        """The chunk's rows in their shuffled order, with one copy: each block of the memmaps is
        read contiguously and scattered to its rows' places (the same order as concatenating
        the blocks and permuting the rows)."""
        size = sum(stop - s for _, s, stop in chunk)
        places = np.argsort(_rng(self.seed, "rows", epoch, c).permutation(size))
        rows = np.empty((size, self.d), dtype=self.arrays[0].dtype)
        at = 0
        for i, s, stop in chunk:
            rows[places[at:at + stop - s]] = self.arrays[i][s:stop]
            at += stop - s
        return rows

    def _loaded(self, start: int) -> Iterator[np.ndarray]:
        """Each chunk's shuffled rows in stream order, from stream row ``start`` (skipped chunks are not read)."""
        epoch, skip = divmod(start, self.rows)
        while True:
            for c, chunk in enumerate(self._chunks(epoch)):
                size = sum(stop - s for _, s, stop in chunk)
                if skip >= size:
                    skip -= size
                    continue
                yield self._load(chunk, epoch, c)[skip:]
                skip = 0
            epoch += 1

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """float32 tensors [batch_size, d], starting at stream row ``start``. The next chunk is read and
        shuffled on a background thread while this one's batches train (two chunks in memory at most)."""
        carry = np.zeros((0, self.d), dtype=self.arrays[0].dtype)  # the last chunk's rows short of a batch
        for rows in prefetch(self._loaded(start), depth=1):
            if len(carry):
                need = self.batch_size - len(carry)
                if len(rows) < need:
                    carry = np.concatenate([carry, rows])
                    continue
                yield torch.from_numpy(np.concatenate([carry, rows[:need]])).float()
                rows = rows[need:]
            full = len(rows) - len(rows) % self.batch_size
            for b in range(0, full, self.batch_size):
                yield torch.from_numpy(rows[b:b + self.batch_size]).float()
            carry = rows[full:].copy()


class DeviceBatches:
    """The same kind of stream as ``ShuffledBatches``, from a copy of all rows held on a device.

    At paper scale one layer's store (float16, about 13-21 GB) fits in a GPU's memory, so
    the rows are copied there once and every epoch is a seeded permutation drawn on the
    device: no disk reads and no host-to-device copies while training. Batches are gathered
    with one index_select. Row position ``p`` of the stream is a fixed function of the seed
    and the device type (CUDA and CPU draw different permutations), so ``batches(start=p)``
    resumes exactly on the same kind of device.
    """

    def __init__(self, arrays: Sequence[np.ndarray], batch_size: int, seed: int = 0, *,
                 device: str | torch.device = "cpu", copy_rows: int = 1 << 18):
        arrays = [a for a in arrays if len(a)]
        if not arrays:
            raise StoreError("no vectors to train on: the store or file is empty")
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.rows, self.d = sum(len(a) for a in arrays), arrays[0].shape[1]
        self.data = torch.empty(self.rows, self.d, dtype=torch.float16, device=self.device)
        at = 0
        for a in arrays:  # in pieces, so the host never holds a second full copy
            for s in range(0, len(a), copy_rows):
                piece = torch.from_numpy(np.array(a[s:s + copy_rows], dtype=np.float16))
                self.data[at:at + len(piece)].copy_(piece)
                at += len(piece)

    def _order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(zlib.crc32(repr((self.seed, "device", epoch)).encode()))
        return torch.randperm(self.rows, generator=gen, device=self.device)

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """float32 tensors [batch_size, d] on the device, starting at stream row ``start``."""
        epoch, pos = divmod(start, self.rows)
        order = self._order(epoch)
        while True:
            parts, need = [], self.batch_size
            while need:  # a batch may run into the next epoch
                if pos == self.rows:
                    epoch, pos = epoch + 1, 0
                    order = self._order(epoch)
                take = order[pos:pos + need]
                parts.append(take)
                pos, need = pos + len(take), need - len(take)
            yield self.data.index_select(0, parts[0] if len(parts) == 1 else torch.cat(parts)).float()
