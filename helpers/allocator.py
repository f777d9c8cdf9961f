"""Large tensors on a CPU without the kernel's page faults in every step.

glibc's ``malloc`` serves a block above its mmap threshold (at most 32 MiB) with fresh pages from the kernel and
unmaps them when the block is freed. A loop that makes the same large tensors in every step (a forward pass's
activations of 32 images: 100 MB at the first convolution; a training step's [d_sae, d_in] gradients) therefore
has the kernel fault in and zero every page of them again in every step. Measured on 2 cores of an AMD EPYC
(``bench/bench_allocator.py``, a fresh process each, in turns): a forward pass of 32 images to mixed4e took 1.32x
as long so, a training step at mixed4e's shape 1.37x.

``reuse_freed_memory()`` keeps freed memory in the process while a long job runs (no block is served by mmap, no
free memory given back), so each step's tensors reuse the pages of the step before, and gives the free memory back
to the kernel (``malloc_trim``) when the outermost job ends. The numbers computed are the same: only where memory
comes from changes. The cost is memory: a job's first steps grow the heap (a freed block sits under the small
allocations made after it, so the next request, a little larger for its alignment, comes from the top) until freed
neighbours merge, so a job's peak resident memory is a few per cent higher (``bench/bench_allocator.py`` prints
both). After it, glibc is left as its own dynamic threshold leaves it once a block of its maximum was freed (blocks
up to 32 MiB from the heap; free memory above 64 MiB at its top given back), since setting any of these options
turns that adjustment off for the process. Elsewhere than glibc (macOS, Windows, musl) it does nothing. The
harvest, the trainings, the example pass, feature visualisation and the circuit attribution run inside it; a
caller's own loop can too (``with reuse_freed_memory(): ...``, or as a decorator).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's mallopt options (malloc.h)
_DURING = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
_AFTER = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 64 << 20))  # glibc's settled state
_LOCK = threading.Lock()
_DEPTH = [0]  # jobs inside the policy now (nested or on other threads): the outermost one sets and restores it


@functools.lru_cache(maxsize=1)
def glibc():
    """The process's C library where it is glibc (with ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own symbol: musl's mallopt is a stub that does nothing
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def _set(libc, options) -> None:
    for option, value in options:
        libc.mallopt(option, value)


@contextlib.contextmanager
def reuse_freed_memory():
    """Inside: freed memory is kept for the next allocations instead of returned to the kernel (see the module)."""
    libc = glibc()
    if libc is None:
        yield
        return
    with _LOCK:
        _DEPTH[0] += 1
        if _DEPTH[0] == 1:
            _set(libc, _DURING)
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                _set(libc, _AFTER)
                libc.malloc_trim(0)
