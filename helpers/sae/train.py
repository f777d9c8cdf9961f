"""Train a TopK SAE on harvested activation vectors (or any [N, d] array).

The budget is counted in vectors seen (the paper: about 1e9 per SAE). Batches stream
shuffled from the memory-mapped store (``batches.ShuffledBatches``), so a store larger than
RAM trains fine. A held-out slice of the vectors gives the final FVU.

Records, all in ``--out``: ``metrics.jsonl`` (one line per logging step), ``checkpoint.safetensors``
(weights, Adam state, dead-latent counters; no pickle), and at the end the SAE itself
(``cfg.json`` + ``sae_weights.safetensors``, SAELens' layout) with ``train.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from helpers import __version__
from helpers.allocator import reuse_freed_memory
from helpers.config import TrainConfig
from helpers.data.batches import ShuffledBatches, prefetch, random_rows
from helpers.files import (CFG_FILE, CHECKPOINT, METRICS, TRAIN_RECORD, append_jsonl, atomic_write, exclusive_lock,
                           read_jsonl, write_json)
from helpers.progress import progress
from helpers.sae.adam import Adam
from helpers.sae.checkpoint import data_record, load_checkpoint, save_checkpoint
from helpers.sae import families
from helpers.sae.loss import fvu, geometric_median, normalized_mse, reconstruction_stats, training_loss
from helpers.sae.memory import check_memory, memory_estimate
from helpers.sae.model import TopKSAE
from helpers.sae.source import open_source, split_holdout

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


def default_lr(d_sae: int) -> float:
    """Gao et al.'s scaling of the learning rate with the number of latents."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


@dataclass
class _State:
    """What a training run carries from step to step, and what a checkpoint holds."""

    sae: TopKSAE
    opt: Adam
    since_fired: torch.Tensor  # [d_sae] vectors since each latent last fired
    seen: int = 0
    step: int = 0


class _Step(NamedTuple):
    x: torch.Tensor
    x_hat: torch.Tensor
    code: object  # sae.SparseCode
    loss: torch.Tensor
    aux_loss: torch.Tensor | None
    dead: torch.Tensor


LOCK = ".train.lock"  # in --out: one training at a time writes there


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) one SAE; returns the output directory. The first process (rank 0 under torchrun)
    holds ``--out``'s lock for the whole run: a second training into the same folder stops at once."""
    import os

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder for the SAE, its metrics and checkpoints")
    if int(os.environ.get("RANK", "0")) > 0:
        return _train(cfg)
    with exclusive_lock(out / LOCK, f"the training directory {out}"):
        return _train(cfg)


@reuse_freed_memory()
@torch.enable_grad()  # also when called inside torch.no_grad() (an evaluation that trains what it needs)
def _train(cfg: TrainConfig) -> Path:
    """The steps: open the vectors, start (or resume) the SAE, then step, log and checkpoint until the budget is
    spent, then save."""
    from helpers import distributed

    clock = _Clock()
    with clock("open"):
        arrays, info = open_source(cfg)
    rank, ranks, device = distributed.setup(cfg.device)
    if cfg.batch_size % ranks:
        raise ValueError(f"--batch-size {cfg.batch_size} must divide evenly over the {ranks} processes")
    mine = slice(rank * cfg.batch_size // ranks, (rank + 1) * cfg.batch_size // ranks)  # this rank's rows
    train_arrays, held = split_holdout(arrays, cfg.holdout)
    if len(held) and not np.isfinite(np.asarray(held, dtype=np.float64)).all():
        raise ValueError(f"the held-out vectors of {info['source']} (its last {len(held)} rows) hold NaN or infinite "
                         "numbers; remove those rows from the vectors and train again")
    out = Path(cfg.out)
    d_sae = cfg.sae.latents or cfg.sae.expansion * arrays[0].shape[1]
    if cfg.sae.k > d_sae:
        raise ValueError(f"--k {cfg.sae.k} exceeds the {d_sae} latents (--latents, or --expansion {cfg.sae.expansion} x width "
                         f"{arrays[0].shape[1]}); lower --k or raise --expansion")
    check_memory(cfg, arrays[0].shape[1], d_sae, device)
    with clock("init"):
        state = _start(cfg, out, train_arrays, d_sae, device, rank, data_record(info))
    lr = state.opt.lr

    stream = _batches(cfg, train_arrays, device, d_sae, start=state.seen)
    total_steps = math.ceil(cfg.vectors_seen / cfg.batch_size)
    bar = progress(total=total_steps, initial=state.step, unit="step", desc=f"train {info['layer'] or 'sae'}",
               **({"disable": True} if rank > 0 else {}))
    next_ckpt = (state.seen // cfg.checkpoint_every + 1) * cfg.checkpoint_every
    t0, seen0 = time.perf_counter(), state.seen
    record, final_checkpoint = {}, None
    while state.step < total_steps:
        with clock("data"):
            x = next(stream)[mine].to(device, non_blocking=True)  # every rank reads the same global batch
        with clock("steps"):
            result = _step(cfg, state, x)
        bar.update(1)
        last = state.step == total_steps
        if last and state.sae.architecture != "topk":  # the inference threshold, before the last checkpoint
            families.calibrate(state.sae, random_rows(train_arrays, 16384, cfg.seed + 1).to(device))
        if state.step % cfg.log_every == 0 or last or state.seen >= next_ckpt:
            with clock("log"):
                record = _log(out, state, result, lr, (state.seen - seen0) / (time.perf_counter() - t0), rank)
            bar.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}", dead=f"{record['dead_fraction']:.2f}")
        if state.seen >= next_ckpt or last:
            with clock("checkpoint"):
                if rank == 0 and last:  # nothing changes the state any more: written while the evaluation runs
                    writer = ThreadPoolExecutor(1)
                    final_checkpoint = writer.submit(save_checkpoint, out / CHECKPOINT, state, cfg, data_record(info))
                    writer.shutdown(wait=False)
                elif rank == 0:
                    save_checkpoint(out / CHECKPOINT, state, cfg, data_record(info))
                distributed.barrier()
            next_ckpt += cfg.checkpoint_every
    bar.close()
    if rank > 0:
        return out
    return _finish(out, state, cfg, info, held, lr, record, device, clock, final_checkpoint)


class _Clock:
    """Seconds spent in each phase of a training run (``clock("data")`` as a context), for ``train.json``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.time()  # when the process is known to have reached train()

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t

    def record(self) -> dict:
        return {"started_at": self.started, **{k: round(v, 4) for k, v in self.seconds.items()}}


def _start(cfg: TrainConfig, out: Path, arrays, d_sae: int, device: torch.device, rank: int, data: dict) -> _State:
    """A new SAE (b_dec at the geometric median of a sample), or the one in ``out``'s checkpoint."""
    ckpt = out / CHECKPOINT
    if ckpt.exists() and not cfg.resume:
        raise FileExistsError(f"{out} already holds a training checkpoint; pass --resume to continue it "
                              "or choose another --out")
    sae = TopKSAE(arrays[0].shape[1], d_sae, cfg.sae.k, cfg.sae.tied, seed=cfg.seed, kernels=cfg.kernels,
                  architecture=cfg.sae.architecture, prefixes=cfg.sae.prefixes).to(device)
    state = _State(sae, Adam(sae.parameters(), cfg.lr or default_lr(d_sae)),
                   torch.zeros(d_sae, dtype=torch.long, device=device))
    if cfg.resume and ckpt.exists():
        load_checkpoint(ckpt, state, cfg, device, data)
        log.info("resuming %s at %d vectors", out, state.seen)
    else:
        with torch.no_grad():
            sample = random_rows(arrays, 16384, cfg.seed).to(device)
            sae.b_dec.copy_(geometric_median(sample))
        sae.fit_scale(sample[:4096])
        if cfg.sae.architecture != "topk":
            families.start(sae, sample[:4096])
    if rank == 0 and (out / METRICS).exists():  # records past the checkpoint are made again
        kept = [r for r in read_jsonl(out / METRICS) if r["step"] <= state.step]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write(out / METRICS, lambda f: f.write(text), mode="w")
    return state


def _step(cfg: TrainConfig, state: _State, x: torch.Tensor) -> _Step:
    """One optimisation step on the batch x: forward, loss, backward (gradients averaged over
    ranks), Adam, the decoder constraint, and the dead-latent counters."""
    from helpers import distributed

    sae = state.sae
    dead = state.since_fired >= min(cfg.dead_after, max(state.seen, 1))
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
        out = sae.forward_train(x, dead, cfg.sae.aux_k) if sae.architecture == "topk" else families.forward_train(sae, x)
    x_hat = out.x_hat.float()
    if sae.architecture == "topk":
        aux = None if out.aux_recon is None else out.aux_recon.float()
        total, loss, aux_loss = training_loss(x, x_hat, aux, cfg.sae.aux_coef)
    else:
        total, loss, aux_loss = out.total.float(), out.loss.float(), None
    state.opt.zero_grad(set_to_none=True)
    total.backward()
    distributed.average_gradients(sae.parameters())  # under torchrun: the global batch's gradient
    sae.remove_radial_grad()
    state.opt.step()
    sae.normalize_decoder()
    if sae.architecture != "topk":
        families.after_step(sae, out)
    # latents that fired in this batch (on any rank): counted without a boolean index, which syncs a GPU
    fired = torch.zeros(sae.d_sae, device=x.device).index_add_(0, out.code.indices.flatten(),
                                                              (out.code.values > 0).flatten().float())
    if distributed.world()[1] > 1:
        distributed.all_reduce(fired, "max")
    state.since_fired += cfg.batch_size
    state.since_fired.masked_fill_(fired > 0, 0)
    state.seen += cfg.batch_size
    state.step += 1
    return _Step(x, x_hat, out.code, loss, aux_loss, dead)


def _log(out: Path, state: _State, result: _Step, lr: float, vectors_per_s: float, rank: int) -> dict:
    """The metrics record of this step (global over ranks), appended to ``metrics.jsonl``."""
    stats = _global_stats(result.loss, result.x_hat, result.x, result.code)
    if not math.isfinite(stats["loss_nmse"]):
        raise NonFiniteLoss(
            f"the loss became {stats['loss_nmse']} at step {state.step}; the last good checkpoint is kept in "
            f"{out / CHECKPOINT} (if any). Lower --lr, check the vectors for inf/nan, and run again with --resume")
    record = {"step": state.step, "vectors_seen": state.seen, **stats,
              "dead_fraction": result.dead.float().mean().item(),
              "aux_loss": None if result.aux_loss is None else result.aux_loss.item(), "lr": lr,
              "vectors_per_s": vectors_per_s}
    if rank == 0:
        append_jsonl(out / METRICS, record)
    return record


def _batches(cfg: TrainConfig, arrays, device: torch.device, d_sae: int, start: int = 0):
    """The training stream from vector ``start`` on: from the memmaps on disk, or from a copy of all
    vectors on the device. On CUDA the disk stream is read ahead by a background thread while each
    step runs on the GPU; on a CPU that thread would take cores from the step itself (measured: 7%
    slower on 2 cores), so the next batch is read when it is needed (one copy per block)."""
    from helpers.data.batches import DeviceBatches

    rows, d = sum(len(a) for a in arrays), arrays[0].shape[1]
    mode = cfg.store
    if mode != "disk" and device.type == "cuda":
        need = sum(memory_estimate(d, d_sae, cfg.sae.k, cfg.batch_size, cfg.sae.tied, aux_k=cfg.sae.aux_k, cuda=True,
                                   store_rows=rows, dense=cfg.sae.architecture != "topk").values())
        free = torch.cuda.mem_get_info(device)[0]
        if need > 0.9 * free:
            if mode == "device":
                raise MemoryError(f"--store device needs about {need / 2**30:.1f} GiB on {device} ({rows} vectors "
                                  f"of width {d} in float16 plus training) but {free / 2**30:.1f} GiB is free; "
                                  "use --store disk (streams from the memmaps) or a smaller store")
            mode = "disk"
        else:
            mode = "device"
    elif mode == "auto":
        mode = "disk"  # on a CPU the memmapped stream keeps memory flat; --store device loads it into RAM
    log.info("training batches from %s", "a copy on " + str(device) if mode == "device" else "the memmaps on disk")
    if mode == "device":
        return DeviceBatches(arrays, cfg.batch_size, cfg.seed, device=device).batches(start=start)
    stream = ShuffledBatches(arrays, cfg.batch_size, cfg.seed).batches(start=start)
    return prefetch(stream) if device.type == "cuda" else stream


@torch.no_grad()
def _global_stats(loss, x_hat, x, code) -> dict:
    """Loss, FVU and L0 of the whole (global) batch, summed over ranks under torchrun."""
    from helpers import distributed

    x_hat = x_hat.float()
    sums = torch.stack([loss.detach().float() * len(x), (x_hat - x).pow(2).sum(), x.pow(2).sum(),
                        (code.values > 0).sum().float(), torch.tensor(float(len(x)), device=x.device)])
    col = x.sum(0)
    distributed.all_reduce(sums)
    distributed.all_reduce(col)
    n = sums[4]
    variance = sums[2] - col.pow(2).sum() / n
    return {"loss_nmse": (sums[0] / n).item(), "fvu": (sums[1] / variance.clamp_min(1e-12)).item(),
            "l0": (sums[3] / n).item()}


def _finish(out, state, cfg, info, held, lr, last_record, device, clock: _Clock, final_checkpoint=None) -> Path:
    """The held-out evaluation (while ``final_checkpoint``, the last checkpoint's write, finishes), then the SAE
    (``cfg.json`` with its provenance, weights) and ``train.json`` (with the seconds spent in each phase)."""
    from helpers.data.inception import RANDOM_WARNING, is_random

    sae, seen = state.sae, state.seen
    held_fvu = held_nmse = measures = None
    with clock("evaluation"), torch.no_grad():
        fvu_on = f"{len(held)} held-out vectors"
        if len(held):
            x = torch.from_numpy(np.array(held, dtype=np.float32)).to(device)
            codes = [sae.encode_topk(x[i:i + 4096]) for i in range(0, len(x), 4096)]
            x_hat = torch.cat([sae.decode_topk(code) for code in codes])
            l0 = torch.cat([(code.values > 0).sum(-1) for code in codes])
            held_nmse = normalized_mse(x_hat, x).item()
            if varies(x):
                held_fvu = fvu(x_hat, x).item()
                measures = reconstruction_stats(x, x_hat, l0)
            else:  # a fraction of no variance is no number: say so rather than print 3e6
                fvu_on = f"undefined: the {len(held)} held-out vectors do not vary (their variance is below " \
                         "float32's resolution)"
    if final_checkpoint is not None:
        with clock("checkpoint"):
            final_checkpoint.result()  # its errors (a full disk, say) stop the run here, before the SAE is saved
    dead_fraction = (state.since_fired >= min(cfg.dead_after, max(seen, 1))).float().mean().item()
    weights_id = info["weights_id"]
    extra = {
        "layer": info["layer"], "branch_slices": info["branch_slices"], "weights_id": weights_id,
        "random_weights": bool(weights_id and is_random(weights_id)),
        "warning": RANDOM_WARNING if weights_id and is_random(weights_id) else None,
        "source": info["source"], "vectors_seen": seen, "final_fvu": held_fvu, "final_nmse": held_nmse,
        "final_fvu_on": fvu_on, "dead_fraction": dead_fraction,
        "held_out": None if measures is None else {**measures, "dead fraction": dead_fraction},
        "dead_after": cfg.dead_after, "lr": lr, "expansion": cfg.sae.expansion, "helpers_version": __version__,
        "input_scale": info["input_scale"],  # the images' convention (None for --vectors: unknown)
    }
    with clock("saving"):
        sae.save(out, **extra)
    write_json(out / TRAIN_RECORD, {"config": asdict(cfg), "last_metrics": last_record, "seconds": clock.record(),
                                    **extra})
    return out


def varies(x: torch.Tensor) -> bool:
    """Whether vectors ``x`` [n, d] vary enough for an FVU to mean anything: their variance, summed over
    coordinates in float64, above float32's smallest normal number per coordinate."""
    x = x.double()
    return float((x - x.mean(0)).pow(2).sum()) / len(x) > x.shape[1] * float(torch.finfo(torch.float32).tiny)


def read_metrics(sae_dirs: dict[str, Path]) -> dict[str, list[dict]]:
    """``metrics.jsonl`` of each SAE (empty for SAEs not trained here, e.g. the author's)."""
    return {layer: read_jsonl(Path(d) / METRICS) if (Path(d) / METRICS).exists() else []
            for layer, d in sae_dirs.items()}


def summary(sae_dirs: dict[str, Path]) -> list[dict]:
    """Per SAE: its size and how well it reconstructs held-out vectors."""
    rows = []
    for layer, d in sae_dirs.items():
        cfg = json.loads((Path(d) / CFG_FILE).read_text())
        meta = cfg.get("metadata", {})
        held = meta.get("held_out") or {}
        rows.append({"layer": layer, "family": cfg.get("family", cfg["architecture"]), "d_in": cfg["d_in"],
                     "latents": cfg["d_sae"], "k": cfg["k"], "tied": cfg["tied"], "vectors seen": meta.get("vectors_seen"),
                     "held-out FVU": meta.get("final_fvu"), "held-out NMSE": meta.get("final_nmse"),
                     **{name: held.get(name) for name in ("L0", "cosine", "L2 ratio", "relative reconstruction bias")},
                     "dead fraction": meta.get("dead_fraction")})
    return rows
