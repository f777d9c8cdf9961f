"""The running top of a streaming pass, per feature: each batch's values merged into the m largest so far.

``merge_top`` keeps, for every column (feature) of ``best`` [m, n] (sorted descending), the m largest of it and a
batch's ``new`` [B, n], with their ids (``best_loc``, from ``loc``) and, optionally, a value carried beside each (the
reservoir's activation beside its random key). A new value enters only where it is strictly larger than the column's
m-th: it is inserted after the entries it does not exceed, so of equal values the one seen first ranks first. After
the first few hundred images few of a batch's values enter, so the merge costs about a compare per value (Numba;
torch's ``topk`` over the [m + B, n] concatenation, which it replaced, ranked every column again: 12-15 ms a batch of
32 images for m = 64 at 8192 features on 2 CPU cores).
"""

from __future__ import annotations

import torch

from helpers.numba_threads import numba, numba_region


def merge_top(best: torch.Tensor, best_loc: torch.Tensor, new: torch.Tensor, loc: torch.Tensor,
              carried: torch.Tensor | None = None, new_carried: torch.Tensor | None = None) -> None:
    """In place: see the module's text. ``best``, ``new``, ``carried``: float32; ``best_loc``, ``loc``: int64."""
    if carried is None:
        carried, new_carried = best, new  # carried along as itself: the same numbers
    if numba is not None and best.device.type == "cpu" and best.dtype == new.dtype == carried.dtype == torch.float32:
        with numba_region():
            _merge(best.numpy(), best_loc.numpy(), carried.numpy(), new.contiguous().numpy(), loc.contiguous().numpy(),
                   new_carried.contiguous().numpy())
        return
    # elsewhere (a GPU): every column ranked again (of equal values, torch's topk decides which is kept)
    v, at = torch.cat([best, new]).topk(len(best), dim=0)
    best_loc.copy_(torch.cat([best_loc, loc]).gather(0, at))
    if carried is not best:
        carried.copy_(torch.cat([carried, new_carried]).gather(0, at))
    best.copy_(v)


if numba is not None:

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _merge(best, best_loc, carried, new, loc, new_carried):
        m, n = best.shape
        for block in numba.prange((n + 255) // 256):  # 256 columns a thread, each batch row read along them
            for b in range(new.shape[0]):
                for col in range(block * 256, min(n, block * 256 + 256)):
                    v = new[b, col]
                    if not v > best[m - 1, col]:
                        continue
                    i = m - 1
                    while i > 0 and best[i - 1, col] < v:  # shift the smaller ones down
                        best[i, col], best_loc[i, col] = best[i - 1, col], best_loc[i - 1, col]
                        carried[i, col] = carried[i - 1, col]
                        i -= 1
                    best[i, col], best_loc[i, col], carried[i, col] = v, loc[b, col], new_carried[b, col]
