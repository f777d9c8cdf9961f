"""A streaming pass's bookkeeping per feature: each image's maximum (``image_maxima``), and the running top of the
images seen, each batch's values merged into the m largest so far (``merge_top``).

``merge_top`` keeps, for every row (feature) of ``best`` [n, m] (sorted descending), the m largest of it and a
batch's column ``new[:, f]`` ([B, n]), with their ids (``best_loc``, from ``loc``) and, optionally, a value carried
beside each (the reservoir's activation beside its random key). A new value enters only where it is strictly larger
than the row's m-th: it is inserted after the entries it does not exceed, so of equal values the one seen first ranks
first. After the first few hundred images few of a batch's values enter, so the merge costs about a compare per value
(Numba; torch's ``topk`` over the [m + B, n] concatenation, which it replaced, ranked every feature again: 12-15 ms a
batch of 32 images for m = 64 at 8192 features on 2 CPU cores).
"""

from __future__ import annotations

import torch

from helpers.numba_threads import numba, numba_region


def merge_top(best: torch.Tensor, best_loc: torch.Tensor, new: torch.Tensor, loc: torch.Tensor,
              carried: torch.Tensor | None = None, new_carried: torch.Tensor | None = None) -> None:
    """In place: see the module's text. ``best``, ``best_loc``, ``carried``: [n, m]; ``new``, ``loc``,
    ``new_carried``: [B, n]; values float32, ids int64."""
    if carried is None:
        carried, new_carried = best, new  # carried along as itself: the same numbers
    if numba is not None and best.device.type == "cpu" and best.dtype == new.dtype == carried.dtype == torch.float32:
        with numba_region():
            _merge(best.numpy(), best_loc.numpy(), carried.numpy(), new.contiguous().numpy(), loc.contiguous().numpy(),
                   new_carried.contiguous().numpy())
        return
    # elsewhere (a GPU): every feature ranked again (of equal values, torch's topk decides which is kept)
    v, at = torch.cat([best, new.T], 1).topk(best.shape[1], dim=1)
    best_loc.copy_(torch.cat([best_loc, loc.T], 1).gather(1, at))
    if carried is not best:
        carried.copy_(torch.cat([carried, new_carried.T], 1).gather(1, at))
    best.copy_(v)


def image_maxima(values: torch.Tensor, indices: torch.Tensor, hw: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse code of whole images (``values``, ``indices`` [images * hw, kept], each image's ``hw`` positions in
    order) -> per image and feature (of ``n``): the largest value (0 where it never fires) and the first position
    holding it (0 where it never fires), [images, n] each: the dense codes' ``max(dim=1)``. On a CPU one Numba pass
    over the kept values in position order (1.0-1.5 against 2.7 ms a batch of 32 images at 8192 features, 2 cores);
    elsewhere torch's scatter-reductions."""
    m = len(values) // hw
    if numba is not None and values.device.type == "cpu" and values.dtype == torch.float32:
        best, at = torch.empty(m, n), torch.empty(m, n, dtype=torch.long)
        with numba_region():
            _image_maxima(values.detach().contiguous().numpy(), indices.contiguous().numpy(), hw, best.numpy(),
                          at.numpy())
        return best, at
    v, idx = values.reshape(m, -1), indices.reshape(m, -1)  # [images, HW * kept], position-major
    best = torch.zeros(m, n, dtype=v.dtype, device=v.device).scatter_reduce_(1, idx, v, "amax")
    pos = torch.arange(hw, device=v.device).repeat_interleave(values.shape[1]).expand(m, -1)
    first = torch.where((v > 0) & (v == best.gather(1, idx)), pos, hw)
    at = torch.full((m, n), hw, dtype=torch.long, device=v.device).scatter_reduce_(1, idx, first, "amin")
    return best, at.masked_fill_(at == hw, 0)


if numba is not None:

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _merge(best, best_loc, carried, new, loc, new_carried):
        n, m = best.shape
        for block in numba.prange((n + 255) // 256):  # 256 features a thread, each batch row read along them
            for b in range(new.shape[0]):
                for f in range(block * 256, min(n, block * 256 + 256)):
                    v = new[b, f]
                    if not v > best[f, m - 1]:
                        continue
                    i = m - 1
                    while i > 0 and best[f, i - 1] < v:  # shift the smaller ones down
                        best[f, i], best_loc[f, i] = best[f, i - 1], best_loc[f, i - 1]
                        carried[f, i] = carried[f, i - 1]
                        i -= 1
                    best[f, i], best_loc[f, i], carried[f, i] = v, loc[b, f], new_carried[b, f]

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _image_maxima(values, indices, hw, best, at):
        """``image_maxima``'s pass: per image, its positions in order, a value replacing the feature's maximum only
        where strictly larger (so the first position of the maximum stays)."""
        kept = values.shape[1]
        for i in numba.prange(best.shape[0]):
            b, a = best[i], at[i]
            b[:] = 0.0
            a[:] = 0
            for p in range(hw):
                for j in range(kept):
                    v, f = values[i * hw + p, j], indices[i * hw + p, j]
                    if v > b[f]:
                        b[f] = v
                        a[f] = p
