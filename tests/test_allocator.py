"""helpers.allocator: inside ``reuse_freed_memory`` freed memory stays in the process and a large tensor made again
reuses its pages (the kernel faults none in); when the outermost job ends, the free memory goes back to the kernel.
Counted by the kernel's own counters (minor faults, resident pages), not by timing."""

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


def _make_and_free() -> None:
    """Make 288 MiB of tensors (every page written), then free them."""
    kept = [torch.ones(BIG) for _ in range(3)]
    del kept


def test_a_large_tensor_made_again_reuses_freed_pages():
    with reuse_freed_memory():
        inside = _steady()
    assert max(inside[-3:]) < PAGES // 100, f"inside, once the heap has grown, a make should fault ~nothing: {inside}"


def test_freed_memory_is_kept_inside_and_given_back_when_the_job_ends():
    """Measured as what the job's end gives back: the process's earlier history (free blocks glibc already holds)
    can serve the tensors, so the resident size before the job is no reference."""
    with reuse_freed_memory():
        _make_and_free()
        held = _rss_mib()  # freed, and still resident
    assert held - _rss_mib() > 200, "the job's end gives the freed memory back to the kernel"


def test_nested_jobs_keep_the_policy_until_the_outermost_ends():
    with reuse_freed_memory():
        with reuse_freed_memory():
            _make_and_free()
            inner = _rss_mib()
        after_inner = _rss_mib()
        _make_and_free()
        outer = _rss_mib()
    assert inner - after_inner < 50, "the inner job's end must not give memory back while the outer one runs"
    assert outer - _rss_mib() > 200, "the outermost job's end does"


def test_jobs_on_two_threads_overlap_safely():
    """One thread's job ending while another's runs leaves the policy on for the other."""
    started, release = threading.Event(), threading.Event()

    def other():
        with reuse_freed_memory():
            started.set()
            release.wait(30)

    t = threading.Thread(target=other)
    t.start()
    started.wait(30)
    with reuse_freed_memory():
        _make_and_free()
        mine = _rss_mib()  # ends while the other thread's job runs
    still = _rss_mib()
    release.set()
    t.join()
    assert mine - still < 50, "a job's end must not give memory back while another thread's job runs"
    assert still - _rss_mib() > 200, "the last job's end does"


def test_a_decorated_function_computes_the_same_numbers():
    @reuse_freed_memory()
    def work(x):
        return (x @ x.T).sum(dim=1)

    x = torch.randn(512, 300, generator=torch.Generator().manual_seed(0))
    assert torch.equal(work(x), (x @ x.T).sum(dim=1))
    assert torch.equal(work(x), work(x))
