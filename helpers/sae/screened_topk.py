"""The TopK of the encoder's pre-activations on a CPU: exact, without the float32 matmul.

On a CPU the training step's biggest cost is the dense encoder product
``pre = (x - b_dec) W^T + b_enc`` ([batch, d_sae], float32) and the TopK over it: 106 and
45 ms of a 225 ms step here (batch 4096, d_in 512, d_sae 8192). A CPU with AMX multiplies
bfloat16 matrices about six times faster than float32 ones (one with AVX512-BF16 but no AMX,
such as AMD's Zen 4, about three times), but a bf16 product is not the
float32 one, and a TopK taken on it would sometimes keep the wrong latents. Its error is
bounded, though, and the bound lets us keep exactly the float32 TopK:

1. **Screen.** ``s = bf16(x~ W~^T) + b_enc``, where ``x~``, ``W~`` are x_c and W rounded to bf16
   (``x_lo = x_c - x~``, ``w_lo = w - w~`` what rounding lost) and the product accumulates in
   float32 and is rounded to bf16 once.
2. **Bound.** For every latent j of row x: ``|s_j - pre_j| <= E + rho |s_j|`` with

   ``E = ||x~|| max_j||w_lo_j|| + ||x_lo|| max_j||w~_j|| + ||x_lo|| max_j||w_lo_j||``
   ``    + gamma_d ||x~|| max_j||w~_j|| + u' max|b_enc|``,    ``rho = u' + 2^-22``,

   because ``x.w - x~.w~ = x~.w_lo + x_lo.w~ + x_lo.w_lo`` (Cauchy-Schwarz on each term; the
   norms are measured, not bounded), float32 accumulation over d_in terms errs by at most
   ``gamma_d = d u32 / (1 - d u32)`` of ``sum |x~_i w~_i|``, and rounding the product to bf16 by
   at most ``u' = u / (1 - u)`` of the result, ``u = 2^-8`` (``|a| <= |s| + max|b|``; the bias
   add in float32 is the ``2^-22``). E is widened by 0.1%, and by ``2^-100`` times the norms for
   values below float32's normal range, which a CPU may flush to zero.
3. **Threshold.** ``t``: the k-th largest of the row's 128 strided block maxima of s, which is
   at most the k-th largest s (k blocks each hold an s at least t). Every latent of the screen's
   top k then has ``pre >= L = t - E - rho |t|``.
4. **Candidates.** A latent can be in the float32 top k only if its upper bound reaches L:
   ``s_j + E + rho |s_j| >= L`` (the threshold on s this gives is lowered by ``2^-20`` of itself
   against the rounding of its own float32 arithmetic). About 60 of 8192 pass here (32 of them
   the answer).
5. **Rescore** the candidates in float32 (``x_c . w_j + b_enc_j``), latent by latent over a chunk of rows (each row
   of W read once, in order), and keep the top k.

No latent left out in step 4 can be in the top k (k latents are above it for sure), so the
result is the float32 TopK, up to ties within float32 rounding, and the kept values are
float32 dot products. ``tests/test_screened_topk.py`` checks the bound and the selection
against float64 truth on adversarial data (offsets, big biases, uneven norms, ties, zeros).

Without hardware bf16 products the float32 product is made (1024 rows at a time), and its TopK
is taken by ``topk_rows``, the same selection without the screen: the k-th largest of the row's
128 strided block maxima bounds the k-th largest entry from below, so only the entries at or
above it (a few dozen of 8192) are ranked. It reads the product once, at memory speed: about
half of torch's ``topk`` on an AMD EPYC (measured in ``bench/bench_peers.py``).

The kernels are compiled by Numba (umap-learn's dependency) on first use and cached.
The training config's ``--screen off`` turns the screen off, ``--screen on`` on anywhere (where
bf16 products are slower than float32 ones too); the default, ``auto``, screens where the CPU
multiplies bf16 in hardware (AMX tiles or AVX512-BF16, as torch reports them). Inputs with a NaN or an
infinity, k above 128 and GPUs take the float32 path (``TopKSAE._select``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from helpers.numba_threads import numba, numba_region

LANES = 128  # strided blocks of a row: block l holds latents l, l + LANES, l + 2 LANES, ...
U = 2.0 ** -8  # bf16's unit roundoff
MIN_ROWS = 256
SUB = 8  # rounds of a strided block whose maximum the gather looks at before their entries (``_gather_sub``)
CAP = 256  # candidates a row may leave for the rescoring by latent (``_rescore_by_latent``); a row with more rescores its own
_FAST = {"nsz", "arcp", "contract", "reassoc", "afn"}  # no 'nnan'/'ninf': inputs are checked finite anyway


def enabled(x_c: torch.Tensor, weight: torch.Tensor, k: int, mode: str = "auto") -> bool:
    """Whether ``screened_topk`` applies: a CPU, float32, k <= 128 <= d_sae, Numba, and with ``mode`` "auto"
    (the training config's ``--screen``) hardware bf16 products and at least ``MIN_ROWS`` rows (rounding W costs about a float32
    product of 100 rows); "on" drops those two conditions, "off" never screens."""
    if numba is None or mode == "off" or x_c.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if mode != "on" and x_c.shape[0] < MIN_ROWS:
        return False
    if x_c.dtype != torch.float32 or weight.dtype != torch.float32 or not 0 < k <= LANES <= weight.shape[0]:
        return False
    return mode == "on" or fast_bf16()


def topk_rows(pre: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> bool:
    """The k largest entries of each row of ``pre`` [rows, n] (float32, on the CPU), unordered, written into
    ``values`` [rows, k] and ``indices`` [rows, k] (int64), as ``torch.topk(pre, k, sorted=False)`` gives them
    (up to the order, and which of equal values are kept). False, with nothing written, where it does not apply:
    no Numba, k above 128 or above n, another dtype, or a NaN in ``pre`` (torch ranks NaN first)."""
    n = pre.shape[1]
    if numba is None or not 0 < k <= min(LANES, n) or pre.dtype != torch.float32 or pre.device.type != "cpu" \
            or values.dtype != torch.float32 or indices.dtype != torch.int64:
        return False
    pre = pre.detach().contiguous()
    with numba_region():
        ok = _topk_rows(pre.numpy(), k, values.numpy(), indices.numpy())
    return bool(ok)


def fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles, or AVX512-BF16 dot products), as torch reports
    it: there a bf16 product costs a third to a sixth of the float32 one, and the screen pays."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # an older torch: no way to ask
        return False


def rounding_norms(a: torch.Tensor, a_b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``a`` (float32, [rows, d]) and its bf16 rounding ``a_b``: (||a~||, ||a - a~||), float64."""
    hi, lo = np.empty(a.shape[0]), np.empty(a.shape[0])
    _rounding_norms(a.detach().contiguous().numpy(), a_b.contiguous().view(torch.int16).numpy(), hi, lo)
    return hi, lo


class RoundedWeight(NamedTuple):
    bits: torch.Tensor  # W~, [d_sae, d_in] bf16
    norm: float  # max_j ||w~_j||
    lost: float  # max_j ||w_j - w~_j||


def rounded_weight(weight: torch.Tensor) -> RoundedWeight:
    """W rounded to bf16, with the two norms E needs. Made again on every call: Adam changes W in place every
    training step, and not every in-place change shows in a tensor's version counter (torch's fused Adam kernel
    leaves it alone), so a kept copy could go stale unseen."""
    w = weight.detach().contiguous()
    w_b = w.to(torch.bfloat16)
    norm, lost = (float(v.max()) for v in rounding_norms(w, w_b))
    return RoundedWeight(w_b, norm, lost)


def screen_error(x_c: torch.Tensor, x_b: torch.Tensor, w: RoundedWeight, b_enc: torch.Tensor) -> np.ndarray:
    """``E`` of step 2 per row of x_c (float64, widened by 0.1% against the rounding of the bound's own
    arithmetic); x_b: x_c rounded to bf16. Not finite where an input is not."""
    xt, xlo = rounding_norms(x_c, x_b)
    d = x_c.shape[1]
    gamma = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
    b_max = float(b_enc.detach().abs().max())
    tiny = 2.0 ** -100 * (1 + xt + w.norm) * d  # underflow: products flushed to zero, sums below float32's normal range
    return (xt * w.lost + xlo * w.norm + xlo * w.lost + gamma * xt * w.norm + U / (1 - U) * b_max + tiny) * 1.001


RHO = U / (1 - U) + 2.0 ** -22


def screened_topk(x_c: torch.Tensor, weight: torch.Tensor, b_enc: torch.Tensor, k: int, chunk: int = 1024,
                  counts: torch.Tensor | None = None):
    """``topk(x_c @ weight.T + b_enc, k)`` (unsorted) as (values, indices), or None where an input is not
    finite (the caller then takes the float32 path). x_c: [batch, d_in]; weight: [d_sae, d_in]. ``counts``
    ([batch] int64), if given, receives how many latents step 4 left for rescoring in each row."""
    with numba_region():  # Numba's fallback thread pool (workqueue) must not be entered from two threads
        rounded = rounded_weight(weight)
        x_c, weight, b_enc = (t.detach().contiguous() for t in (x_c, weight, b_enc))
        x_b = x_c.to(torch.bfloat16)
        err = screen_error(x_c, x_b, rounded, b_enc)
        if not np.isfinite(err).all():
            return None
        n = x_c.shape[0]
        values, indices = torch.empty(n, k), torch.empty(n, k, dtype=torch.long)
        buf = torch.empty(min(chunk, n), weight.shape[0], dtype=torch.bfloat16)
        x_np, w_np, b_np, e_np = x_c.numpy(), weight.numpy(), b_enc.numpy(), err.astype(np.float32)
        counts = counts if counts is not None else torch.empty(n, dtype=torch.long)
        v_np, i_np, c_np = values.numpy(), indices.numpy(), counts.numpy()
        cand, cval = np.empty((min(chunk, n), CAP), np.int64), np.empty((min(chunk, n), CAP), np.float32)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            screen = torch.mm(x_b[s:e], rounded.bits.T, out=buf[: e - s])
            _candidates(screen.view(torch.int16).numpy(), b_np, x_np[s:e], w_np, e_np[s:e], np.float32(RHO), k,
                        cand, v_np[s:e], i_np[s:e], c_np[s:e])
            _rescore_and_keep(cand, c_np[s:e], x_np[s:e], w_np, b_np, k, cval, v_np[s:e], i_np[s:e])
    return values, indices


if numba is not None:

    @numba.njit(cache=True, fastmath=_FAST, boundscheck=False)
    def _kth_largest(v, k, scratch):
        """The k-th largest of v (Hoare quickselect on a copy in scratch)."""
        n = v.shape[0]
        for i in range(n):
            scratch[i] = v[i]
        lo, hi, want = 0, n - 1, k - 1
        while lo < hi:
            pivot = scratch[(lo + hi) >> 1]
            i, j = lo, hi
            while i <= j:
                while scratch[i] > pivot:
                    i += 1
                while scratch[j] < pivot:
                    j -= 1
                if i <= j:
                    scratch[i], scratch[j] = scratch[j], scratch[i]
                    i += 1
                    j -= 1
            if want <= j:
                hi = j
            elif want >= i:
                lo = i
            else:
                break
        return scratch[want]

    @numba.njit(cache=True, fastmath=_FAST, boundscheck=False)
    def _block_max(bmax, seg):
        """bmax[l] = max(bmax[l], seg[l]) (Python's max: seg[l] only where strictly larger, so a NaN is never taken),
        and the sum of seg. Over a slice the loop vectorises; indexing the row at i * lanes + l in place kept it
        scalar (1.9 against 4.5 us for a row of 8192 with its bf16 conversion, the same maxima, NaN and infinities
        included)."""
        total = np.float32(0.0)
        for lane in range(seg.shape[0]):
            v, m = seg[lane], bmax[lane]
            bmax[lane] = v if v > m else m
            total += v
        return total

    @numba.njit(cache=True, fastmath=_FAST, boundscheck=False)
    def _sub_maxima(s, smax, bmax, lanes, depth, tail):
        """bmax[l] = the maximum of row ``s``'s strided block l (entries l, l + lanes, ...: ``depth`` whole rounds of
        ``lanes``, then a partial round of ``tail``, round ``depth``), from the maxima of its runs of SUB rounds:
        smax[q, l] = the maximum of block l's entries in rounds SUB q .. SUB q + SUB - 1 (-inf where it holds none).
        NaN is never taken. Returns the row's sum (NaN where the row holds one, or both infinities)."""
        total = np.float32(0.0)
        for q in range(smax.shape[0]):
            m = smax[q]
            for lane in range(lanes):
                m[lane] = -np.inf
            for i in range(q * SUB, min(q * SUB + SUB, depth)):
                total += _block_max(m, s[i * lanes:(i + 1) * lanes])
            if tail and depth // SUB == q:
                total += _block_max(m[:tail], s[depth * lanes:depth * lanes + tail])
            for lane in range(lanes):
                v = m[lane]
                bmax[lane] = v if (q == 0 or v > bmax[lane]) else bmax[lane]
        return total

    @numba.njit(cache=True, fastmath=_FAST, boundscheck=False)
    def _gather_sub(s, smax, bmax, thr, lanes, depth, tail, cand, cval):
        """The entries of row ``s`` at or above ``thr`` (block by block, each in order), visiting only the strided
        blocks whose maximum ``bmax`` reaches it and in them only the runs of SUB rounds whose maximum ``smax`` does:
        their latents into ``cand``, their values into ``cval``; returns how many. About 900 entries and run maxima
        of a row of 8192 are read, against 3,100 entries with the blocks' maxima alone (1.1 against 1.7 ms for 1024
        rows at the paper's shape)."""
        c = 0
        rounds = depth + (1 if tail else 0)
        for lane in range(lanes):
            if bmax[lane] >= thr:
                for q in range(smax.shape[0]):
                    if smax[q, lane] >= thr:
                        for i in range(q * SUB, min(q * SUB + SUB, rounds)):
                            if i == depth and lane >= tail:
                                break
                            j = i * lanes + lane
                            if s[j] >= thr:
                                cand[c] = j
                                cval[c] = s[j]
                                c += 1
        return c

    @numba.njit(cache=True, fastmath=_FAST, boundscheck=False)
    def _keep_top(cval, cand, c, k, scratch, out_val, out_idx):
        """The k largest of the c candidates' values ``cval`` (latents ``cand``) into out_val, out_idx [k]: those
        above the k-th largest, then enough of those equal to it."""
        kth = _kth_largest(cval[:c], k, scratch) if c > k else -np.inf
        m = 0
        for i in range(c):
            if cval[i] > kth:
                out_val[m] = cval[i]
                out_idx[m] = cand[i]
                m += 1
        for i in range(c):
            if m < k and cval[i] == kth:
                out_val[m] = cval[i]
                out_idx[m] = cand[i]
                m += 1

    @numba.njit(cache=True, fastmath=_FAST, boundscheck=False)
    def _dot(a, b):
        acc = np.float32(0.0)
        for q in range(a.shape[0]):
            acc += a[q] * b[q]
        return acc

    @numba.njit(parallel=True, cache=True, fastmath=_FAST, boundscheck=False)
    def _candidates(screen_bits, b_enc, x, w, err, rho, k, cand_out, out_val, out_idx, out_count):
        """Steps 3-4 for each row: screen_bits [rows, d_sae] (the bf16 screen's bits), x [rows, d_in] (x_c),
        w [d_sae, d_in], err [rows] (E) -> out_count [rows] (how many candidates), and the candidates' latents in
        cand_out [rows, CAP]. A row with more than CAP (or, where the screen overflowed to infinity, fewer than k: then
        all n) is rescored and ranked here, into out_val, out_idx [rows, k], and its cand_out row starts with -1."""
        rows, n = screen_bits.shape
        depth = n // LANES
        tail = n - depth * LANES
        per = 8
        for g in numba.prange((rows + per - 1) // per):
            bits = np.empty(n, np.uint32)
            s = bits.view(np.float32)
            bmax = np.empty(LANES, np.float32)
            smax = np.empty(((depth + (1 if tail else 0) + SUB - 1) // SUB, LANES), np.float32)
            scratch = np.empty(n, np.float32)
            cand = np.empty(n, np.int64)
            cval = np.empty(n, np.float32)
            for r in range(g * per, min(rows, (g + 1) * per)):
                for j in range(n):  # bf16 -> float32: the bits in the high half
                    bits[j] = np.uint32(np.uint16(screen_bits[r, j])) << np.uint32(16)
                for j in range(n):
                    s[j] += b_enc[j]
                _sub_maxima(s, smax, bmax, LANES, depth, tail)
                t = _kth_largest(bmax, k, scratch)
                low = t - err[r] - rho * abs(t)  # every latent of the screen's top k is at least this
                need = low - err[r]  # a candidate's s must reach this with its own margin added
                thr = need / (1 + rho) if need >= 0 else need / (1 - rho)
                thr -= 2.0 ** -20 * (abs(thr) + err[r])  # against this float32 arithmetic's own rounding
                c = _gather_sub(s, smax, bmax, thr, LANES, depth, tail, cand, cval)
                out_count[r] = c
                if k <= c <= CAP:
                    cand_out[r, :c] = cand[:c]
                    continue
                cand_out[r, 0] = -1  # ranked here
                if c < k:  # only where the screen overflowed to infinity: rescore the whole row
                    c = n
                    for j in range(n):
                        cand[j] = j
                for i in range(c):
                    cval[i] = _dot(x[r], w[cand[i]]) + b_enc[cand[i]]
                _keep_top(cval, cand, c, k, scratch, out_val[r], out_idx[r])

    @numba.njit(parallel=True, cache=True, fastmath=_FAST, boundscheck=False)
    def _rescore_and_keep(cand, count, x, w, b_enc, k, cval, out_val, out_idx):
        """Step 5 for the rows ``_candidates`` left: cval[r, i] = x[r] . w[cand[r, i]] + b_enc[cand[r, i]], computed
        latent by latent (each of w's rows read once, in order, for all the rows that kept it as a candidate; row by
        row, the rows of w came in random order from memory, the bf16 screen just made having pushed w out of the
        cache: twice as long here), each value the same ``_dot`` as a row's own rescoring; then each row's k
        largest into out_val, out_idx."""
        rows, n = count.shape[0], w.shape[0]
        start = np.zeros(n + 1, np.int64)
        for r in range(rows):
            if cand[r, 0] >= 0:
                for i in range(count[r]):
                    start[cand[r, i] + 1] += 1
        start = np.cumsum(start)
        fill = start[:n].copy()
        pair = np.empty(start[n], np.int64)  # r * CAP + i, grouped by latent
        for r in range(rows):
            if cand[r, 0] >= 0:
                for i in range(count[r]):
                    j = cand[r, i]
                    pair[fill[j]] = r * CAP + i
                    fill[j] += 1
        flat = cval.reshape(-1)
        for j in numba.prange(n):
            for p in range(start[j], start[j + 1]):
                flat[pair[p]] = _dot(x[pair[p] // CAP], w[j]) + b_enc[j]
        for r in numba.prange(rows):
            if cand[r, 0] >= 0:
                _keep_top(cval[r], cand[r], count[r], k, np.empty(count[r], np.float32), out_val[r], out_idx[r])

    @numba.njit(parallel=True, cache=True, fastmath=_FAST, boundscheck=False)
    def _topk_rows(pre, k, out_val, out_idx):
        """``topk_rows``' kernel: per row, the k-th largest of the 128 strided block maxima (a lower bound on the
        k-th largest entry, since k blocks each hold an entry at least that), then the entries at or above it
        ranked. Returns False (rows possibly written) where a row holds a NaN, which no comparison selects, or
        both infinities."""
        rows, n = pre.shape
        lanes = min(LANES, n)
        depth = n // lanes
        tail = n - depth * lanes
        per = 8
        bad = 0
        for g in numba.prange((rows + per - 1) // per):
            bmax = np.empty(lanes, np.float32)
            smax = np.empty(((depth + (1 if tail else 0) + SUB - 1) // SUB, lanes), np.float32)
            scratch = np.empty(n, np.float32)
            cand = np.empty(n, np.int64)
            cval = np.empty(n, np.float32)
            for r in range(g * per, min(rows, (g + 1) * per)):
                s = pre[r]
                total = _sub_maxima(s, smax, bmax, lanes, depth, tail)  # NaN if the row holds one (or both infinities)
                if total != total:  # then torch decides
                    bad += 1
                    continue
                t = _kth_largest(bmax, k, scratch)
                c = _gather_sub(s, smax, bmax, t, lanes, depth, tail, cand, cval)
                _keep_top(cval, cand, c, k, scratch, out_val[r], out_idx[r])
        return bad == 0

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _rounding_norms(a, a_bits, hi, lo):
        """Per row j: hi[j] = ||a~_j||, lo[j] = ||a_j - a~_j|| (a~: a's bf16 rounding, given as bits), float64."""
        n, d = a.shape
        for j in numba.prange(n):
            bits = np.empty(d, np.uint32)
            t = bits.view(np.float32)
            for q in range(d):
                bits[q] = np.uint32(np.uint16(a_bits[j, q])) << np.uint32(16)
            h = 0.0
            m = 0.0
            for q in range(d):
                h += np.float64(t[q]) * np.float64(t[q])
                diff = np.float64(a[j, q]) - np.float64(t[q])
                m += diff * diff
            hi[j] = math.sqrt(h)
            lo[j] = math.sqrt(m)
