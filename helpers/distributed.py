"""torch.distributed under ``torchrun``: which process this is, and the few collectives we use.

Outside torchrun (no WORLD_SIZE), everything here is a no-op for a single process, so the
same harvest and training code runs on a laptop and across GPUs.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when there is a GPU, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def setup(device: str | torch.device) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); each rank gets its GPU."""
    device = resolve_device(device)
    rank, size = world()
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)
    if size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return rank, size, device


def _leave() -> None:
    """The process group destroyed at exit, while the interpreter is whole: left to the interpreter's teardown, gloo's
    worker threads still held tensors and a rank sometimes died with "terminate called without an active exception"
    (SIGABRT; seen once in the torchrun tests; pytorch/pytorch#190489)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def average_gradients(params) -> None:
    """All-reduce and average the gradients of ``params`` across ranks (one flat buffer)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t
