"""helpers.allocator: inside ``reuse_freed_memory`` freed memory stays in the process and a large tensor made again
reuses its pages (the kernel faults none in); after the outermost job the free memory goes back to the kernel, and
freed large tensors do again. Counted by the kernel's own counters (minor faults, resident pages), not by timing."""

import resource
import threading

import pytest
import torch

from helpers.allocator import glibc, reuse_freed_memory

pytestmark = pytest.mark.skipif(glibc() is None, reason="the policy is glibc's (Linux); elsewhere it does nothing")

BIG = 24 << 20  # float32 entries: 96 MiB, three times glibc's largest mmap threshold
PAGES = BIG * 4 // 4096


def _faults_to_make_and_fill() -> int:
    """Minor page faults taken to make a 96 MiB tensor, write every page, and free it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(BIG)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _steady(rounds: int = 16) -> list[int]:
    """The faults of each of ``rounds`` makes: the first few grow the heap (each freed block sits under the small
    allocations made after it, so the next request, a little larger for its alignment, is taken from the top);
    once adjacent freed blocks have merged, a make takes its pages from them."""
    return [_faults_to_make_and_fill() for _ in range(rounds)]


def _kept_after_free() -> float:
    """MiB still resident after making 288 MiB of tensors and freeing them."""
    base = _rss_mib()
    kept = [torch.ones(BIG) for _ in range(3)]
    del kept
    return _rss_mib() - base


def test_a_large_tensor_made_again_reuses_freed_pages():
    plain = _steady(3)
    assert min(plain) > PAGES // 2, f"outside the policy every make should fault its pages in: {plain}"
    with reuse_freed_memory():
        inside = _steady()
    assert max(inside[-3:]) < PAGES // 100, f"inside, once the heap has grown, a make should fault ~nothing: {inside}"


def test_freed_memory_is_kept_inside_and_given_back_after():
    assert _kept_after_free() < 50, "outside the policy, freed large tensors go back to the kernel"
    base = _rss_mib()
    with reuse_freed_memory():
        kept = _kept_after_free()
    after = _rss_mib() - base
    assert kept > 200, f"inside, freed memory is kept ({kept:.0f} MiB)"
    assert after < 50, f"after the job, it is given back ({after:.0f} MiB over the start)"
    assert _kept_after_free() < 50, "after the job, freed large tensors go back to the kernel again"


def test_nested_jobs_keep_the_policy_until_the_outermost_ends():
    with reuse_freed_memory():
        with reuse_freed_memory():
            pass
        kept = _kept_after_free()  # the inner job's end must not restore the plain policy
    assert kept > 200, kept
    assert _kept_after_free() < 50


def test_jobs_on_two_threads_overlap_safely():
    """One thread's job ending while another's runs leaves the policy on for the other."""
    started, release, seen = threading.Event(), threading.Event(), {}

    def other():
        with reuse_freed_memory():
            started.set()
            release.wait(30)

    t = threading.Thread(target=other)
    t.start()
    started.wait(30)
    with reuse_freed_memory():
        pass  # ends while the other thread's job runs
    seen["kept"] = _kept_after_free()
    release.set()
    t.join()
    assert seen["kept"] > 200, seen
    assert _kept_after_free() < 50


def test_a_decorated_function_computes_the_same_numbers():
    @reuse_freed_memory()
    def work(x):
        return (x @ x.T).sum(dim=1)

    x = torch.randn(512, 300, generator=torch.Generator().manual_seed(0))
    assert torch.equal(work(x), (x @ x.T).sum(dim=1))
    assert torch.equal(work(x), work(x))
