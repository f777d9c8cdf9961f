"""How much memory an SAE training needs, by part, and the refusal of one that cannot fit (``train``)."""

from __future__ import annotations

import torch

from helpers.config import TrainConfig


def memory_estimate(d_in: int, d_sae: int, k: int = 32, batch: int = 4096, tied: str = "full", *, aux_k: int = 0,
                    cuda: bool = False, encode_chunk: int | None = None, store_rows: int = 0,
                    dense: bool = False) -> dict[str, int]:
    """Bytes one training process needs, by part (the largest transient buffers included).

    weights ``P = d_sae*d_in*m + d_sae + d_in`` floats, m = 1 (tied full) or 2 (tied init):
    parameters, gradients and Adam's two moments are 4P floats, plus one transient
    [d_sae, d_in] gradient term in the backward pass (on CUDA also a bf16 weight copy and the
    dense [batch, d_sae] float32 coefficients of the weight gradient, ``kernels.scatter_rows``).
    Pre-activations: one dense [rows, d_sae] buffer, rows = batch on CUDA (bf16) or
    ``encode_chunk`` on CPU (float32). Per-batch tensors: about 8 [batch, d_in] float32s and
    the kept latents' values and indices. The device store: rows*d_in float16. ``dense`` (the families
    after TopK, ``families``): about six [batch, d_sae] float32 tensors (pre-activations, mask, code and
    their gradients) instead of the pre-activation buffer.
    """
    m = 1 if tied == "full" else 2
    params = d_sae * d_in * m + d_sae + d_in
    rows = batch if (cuda or not encode_chunk) else min(encode_chunk, batch)
    return {
        "weights, gradients, Adam": 4 * params * 4,
        "backward transient": d_sae * d_in * 4 + (d_sae * d_in * m * 2 + batch * d_sae * 4 if cuda else 0),
        "pre-activations": 6 * batch * d_sae * 4 if dense else rows * d_sae * (2 if cuda else 4),
        "batch tensors": 8 * batch * d_in * 4 + batch * (k + aux_k) * (4 + 8) * 3,
        "device store": store_rows * d_in * 2,
    }


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a training on ``device``: the GPU's free memory, or the host's MemAvailable (Linux), else
    None (unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_memory(cfg: TrainConfig, d_in: int, d_sae: int, device: torch.device) -> None:
    """Refuse, before allocating, a training that the memory estimate says cannot fit (``--expansion 4096`` once
    ended in the allocator's own error)."""
    from helpers.sae.model import ENCODE_CHUNK

    need = sum(memory_estimate(d_in, d_sae, cfg.sae.k, cfg.batch_size, cfg.sae.tied, aux_k=cfg.sae.aux_k,
                               cuda=device.type == "cuda", encode_chunk=ENCODE_CHUNK,
                               dense=cfg.sae.architecture != "topk").values())
    free = available_bytes(device)
    if free is not None and need > 0.9 * free:
        raise MemoryError(f"this training needs about {need / 2**30:.1f} GiB ({d_sae} latents x {d_in} channels, batch "
                          f"{cfg.batch_size}) but {free / 2**30:.1f} GiB is free on {device}; lower --expansion or "
                          "--batch-size")
