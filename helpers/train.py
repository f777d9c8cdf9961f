"""Train a TopK SAE on harvested activation vectors (or any [N, d] array).

The budget is counted in vectors seen (the paper: about 1e9 per SAE). Batches stream
shuffled from the memory-mapped store (``store.ShuffledBatches``), so a store larger than
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

from . import __version__
from .config import TrainConfig
from .files import CFG_FILE, CHECKPOINT, METRICS, TRAIN_RECORD, append_jsonl, atomic_write, read_jsonl, write_json
from .loss import fvu, geometric_median, normalized_mse, training_loss
from .progress import progress
from .sae import TopKSAE
from .store import ActivationStore, ShuffledBatches, StoreError, prefetch, random_rows

log = logging.getLogger(__name__)


# settings a resumed run must share with the checkpoint (the budget may grow)
_RESUME_KEYS = ("run", "layer", "vectors", "expansion", "k", "tied", "aux_k", "aux_coef", "lr", "batch_size",
                "seed", "holdout", "dead_after", "store")


class NonFiniteLoss(RuntimeError):
    pass


def default_lr(d_sae: int) -> float:
    """Gao et al.'s scaling of the learning rate with the number of latents."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


class Adam:
    """Adam (Kingma and Ba) exactly as ``torch.optim.Adam(fused=True)`` computes it: torch's fused kernel (one
    pass over parameters, gradients and both moments; CPU and CUDA) and the same per-parameter state (``step``,
    ``exp_avg``, ``exp_avg_sq``), so checkpoints of either resume in the other. Without ``torch.optim``:
    making a torch optimizer first imports ``torch._dynamo``, 1.4 s on this project's 2-core CPU and 3 s on a
    GPU machine, which every training process would pay before its first step."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.state = {p: {"step": torch.zeros((), device=p.device), "exp_avg": torch.zeros_like(p),
                          "exp_avg_sq": torch.zeros_like(p)} for p in self.params}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        (b1, b2), grads = self.betas, [p.grad for p in params]
        moments = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        try:
            torch._fused_adam_(params, grads, *moments, [], steps, lr=self.lr, beta1=b1, beta2=b2, weight_decay=0.0,
                               eps=self.eps, amsgrad=False, maximize=False)
            torch.autograd.graph.increment_version(params)  # the kernel does not: autograd must see the change
        except (RuntimeError, NotImplementedError):  # a device without the fused kernel: the same equations
            for p, g, m, v, step in zip(params, grads, *moments, steps):
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                n = float(step)
                p.addcdiv_(m, (v / (1 - b2**n)).sqrt_().add_(self.eps), value=-self.lr / (1 - b1**n))


def open_source(cfg: TrainConfig) -> tuple[list[np.ndarray], dict]:
    """The arrays to train on and what is known about them (layer, branch slices, weights)."""
    if (cfg.run is None) == (cfg.vectors is None):
        raise ValueError("give either --run DIR --layer NAME (a harvest) or --vectors FILE.npy, not both or neither")
    if cfg.run is not None:
        if cfg.layer is None:
            raise ValueError("--run needs --layer (e.g. --layer mixed4c)")
        store = ActivationStore(cfg.run, cfg.layer)
        return store.vector_arrays(), {"layer": cfg.layer, "branch_slices": store.branch_slices,
                                       "weights_id": store.weights_id, "source": str(Path(cfg.run).resolve()),
                                       "input_scale": store.manifest.input_scale}
    path = Path(cfg.vectors)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {path} as an .npy array ({e}); --vectors takes one array saved with "
                         "numpy.save, of shape [N, d]") from e
    if not isinstance(array, np.ndarray):  # an .npz archive, whatever its name
        array.close()
        raise StoreError(f"{path} is an .npz archive of several arrays, not one .npy array; save the vectors "
                         "with numpy.save(path, vectors) (shape [N, d])")
    if array.ndim != 2 or array.dtype.kind != "f" or 0 in array.shape:
        raise StoreError(f"{path} holds a {array.dtype} array of shape {array.shape}; --vectors needs float "
                         "vectors of shape [N, d], N and d at least 1")
    info = {"layer": cfg.layer, "branch_slices": None, "weights_id": None, "source": str(path.resolve()),
            "input_scale": None}  # a bare .npy says nothing of how its vectors were made
    if cfg.layer is not None:
        from .inception import architecture_slices, layer_width

        slices = architecture_slices(cfg.layer)
        if layer_width(slices) != array.shape[1]:
            raise StoreError(f"{path} has vectors of width {array.shape[1]} but {cfg.layer} is "
                             f"{layer_width(slices)} wide; pass the matching --layer or none")
        info["branch_slices"] = slices
    return [array], info


MIN_HOLDOUT = 32  # fewer held-out vectors give an FVU that means nothing (one vector has no variance)


def split_holdout(arrays: list[np.ndarray], holdout: int):
    """(training arrays, held-out vectors): the last ``holdout`` vectors, at most a tenth of them all."""
    total = sum(len(a) for a in arrays)
    last = arrays[-1]
    n = min(holdout, total // 10, max(len(last) - 1, 0))
    if holdout and n < MIN_HOLDOUT:
        raise ValueError(f"only {n} of the {total} vectors can be held out for the final FVU (at most a tenth, "
                         f"from the last shard), fewer than {MIN_HOLDOUT}: harvest more vectors, or pass "
                         "--holdout 0 to skip the held-out evaluation")
    return arrays[:-1] + [last[: len(last) - n]], last[len(last) - n:]


def _save_checkpoint(path: Path, state, cfg) -> None:
    from safetensors.torch import save as save_bytes

    sae, opt = state.sae, state.opt
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in sae.named_parameters()}
    names = {id(p): n for n, p in sae.named_parameters()}
    for p, st in opt.state.items():
        for key, value in st.items():
            tensors[f"adam/{names[id(p)]}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["since_fired"] = state.since_fired.cpu()
    meta = {"vectors_seen": str(state.seen), "step": str(state.step), "config": json.dumps(asdict(cfg))}
    data = save_bytes(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))


class CheckpointError(ValueError):
    """A training checkpoint that cannot be resumed from."""


def _read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(metadata, tensors, the config it was made with), or a CheckpointError naming the file and the fix."""
    from safetensors import safe_open

    fix = f"delete {path} to train from the start, or restore it from a copy, and run again"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated, not a safetensors file, ...
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); {fix}") from e
    try:
        old = json.loads(meta["config"])
        int(meta["vectors_seen"]), int(meta["step"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} lacks this trainer's metadata (config, vectors_seen, step); {fix}") from e
    return meta, tensors, old


def _load_checkpoint(path: Path, state, cfg, device) -> None:
    sae, opt = state.sae, state.opt
    meta, tensors, old = _read_checkpoint(path)
    differ = [k for k in _RESUME_KEYS if old.get(k) != asdict(cfg).get(k)]
    if differ:
        raise ValueError(f"cannot resume: the checkpoint in {path.parent} was made with other settings "
                         f"({', '.join(f'{k}={old.get(k)!r}' for k in differ)}); use those or a new --out")
    missing = [n for n in [f"param/{n}" for n, _ in sae.named_parameters()] + ["since_fired"] if n not in tensors]
    wrong = [n for n, p in sae.named_parameters() if f"param/{n}" in tensors and tensors[f"param/{n}"].shape != p.shape]
    if missing or wrong:
        raise CheckpointError(f"{path} does not hold this SAE (missing {missing[:3]}, other shapes {wrong[:3]}); "
                              f"delete it to train from the start, or use the --out it belongs to")
    with torch.no_grad():
        for n, p in sae.named_parameters():
            p.copy_(tensors[f"param/{n}"])
    names = dict(sae.named_parameters())
    adam = {}
    for key, value in tensors.items():
        if key.startswith("adam/"):
            _, n, field_name = key.split("/")
            adam.setdefault(n, {})[field_name] = value.to(device)
    for n, st in adam.items():
        opt.state[names[n]] = st
    state.since_fired = tensors["since_fired"].to(device)
    state.seen, state.step = int(meta["vectors_seen"]), int(meta["step"])


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


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) one SAE; returns the output directory. The steps: open the vectors, start
    (or resume) the SAE, then step, log and checkpoint until the budget is spent, then save."""
    from . import distributed

    clock = _Clock()
    with clock("open"):
        arrays, info = open_source(cfg)
    rank, ranks, device = distributed.setup(cfg.device)
    if cfg.batch_size % ranks:
        raise ValueError(f"--batch-size {cfg.batch_size} must divide evenly over the {ranks} processes")
    mine = slice(rank * cfg.batch_size // ranks, (rank + 1) * cfg.batch_size // ranks)  # this rank's rows
    train_arrays, held = split_holdout(arrays, cfg.holdout)
    out = Path(cfg.out)
    d_sae = cfg.expansion * arrays[0].shape[1]
    if cfg.k > d_sae:
        raise ValueError(f"--k {cfg.k} exceeds the {d_sae} latents (--expansion {cfg.expansion} x width "
                         f"{arrays[0].shape[1]}); lower --k or raise --expansion")
    with clock("init"):
        state = _start(cfg, out, train_arrays, d_sae, device, rank)
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
        if state.step % cfg.log_every == 0 or last or state.seen >= next_ckpt:
            with clock("log"):
                record = _log(out, state, result, lr, (state.seen - seen0) / (time.perf_counter() - t0), rank)
            bar.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}", dead=f"{record['dead_fraction']:.2f}")
        if state.seen >= next_ckpt or last:
            with clock("checkpoint"):
                if rank == 0 and last:  # nothing changes the state any more: written while the evaluation runs
                    writer = ThreadPoolExecutor(1)
                    final_checkpoint = writer.submit(_save_checkpoint, out / CHECKPOINT, state, cfg)
                    writer.shutdown(wait=False)
                elif rank == 0:
                    _save_checkpoint(out / CHECKPOINT, state, cfg)
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


def _start(cfg: TrainConfig, out: Path, arrays, d_sae: int, device: torch.device, rank: int) -> _State:
    """A new SAE (b_dec at the geometric median of a sample), or the one in ``out``'s checkpoint."""
    ckpt = out / CHECKPOINT
    if ckpt.exists() and not cfg.resume:
        raise FileExistsError(f"{out} already holds a training checkpoint; pass --resume to continue it "
                              "or choose another --out")
    sae = TopKSAE(arrays[0].shape[1], d_sae, cfg.k, cfg.tied, seed=cfg.seed).to(device)
    state = _State(sae, Adam(sae.parameters(), cfg.lr or default_lr(d_sae)),
                   torch.zeros(d_sae, dtype=torch.long, device=device))
    if cfg.resume and ckpt.exists():
        _load_checkpoint(ckpt, state, cfg, device)
        log.info("resuming %s at %d vectors", out, state.seen)
    else:
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(random_rows(arrays, 16384, cfg.seed).to(device)))
    if rank == 0 and (out / METRICS).exists():  # records past the checkpoint are made again
        kept = [r for r in read_jsonl(out / METRICS) if r["step"] <= state.step]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write(out / METRICS, lambda f: f.write(text), mode="w")
    return state


def _step(cfg: TrainConfig, state: _State, x: torch.Tensor) -> _Step:
    """One optimisation step on the batch x: forward, loss, backward (gradients averaged over
    ranks), Adam, the decoder constraint, and the dead-latent counters."""
    from . import distributed

    sae = state.sae
    dead = state.since_fired >= min(cfg.dead_after, max(state.seen, 1))
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
        out = sae.forward_train(x, dead, cfg.aux_k)
    x_hat = out.x_hat.float()
    aux = None if out.aux_recon is None else out.aux_recon.float()
    total, loss, aux_loss = training_loss(x, x_hat, aux, cfg.aux_coef)
    state.opt.zero_grad(set_to_none=True)
    total.backward()
    distributed.average_gradients(sae.parameters())  # under torchrun: the global batch's gradient
    sae.remove_radial_grad()
    state.opt.step()
    sae.normalize_decoder()
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


def memory_estimate(d_in: int, d_sae: int, k: int = 32, batch: int = 4096, tied: str = "full", *, aux_k: int = 0,
                    cuda: bool = False, encode_chunk: int | None = None, store_rows: int = 0) -> dict[str, int]:
    """Bytes one training process needs, by part (the largest transient buffers included).

    weights ``P = d_sae*d_in*m + d_sae + d_in`` floats, m = 1 (tied full) or 2 (tied init):
    parameters, gradients and Adam's two moments are 4P floats, plus one transient
    [d_sae, d_in] gradient term in the backward pass (on CUDA also a bf16 weight copy and the
    dense [batch, d_sae] float32 coefficients of the weight gradient, ``kernels.scatter_rows``).
    Pre-activations: one dense [rows, d_sae] buffer, rows = batch on CUDA (bf16) or
    ``encode_chunk`` on CPU (float32). Per-batch tensors: about 8 [batch, d_in] float32s and
    the kept latents' values and indices. The device store: rows*d_in float16.
    """
    m = 1 if tied == "full" else 2
    params = d_sae * d_in * m + d_sae + d_in
    rows = batch if (cuda or not encode_chunk) else min(encode_chunk, batch)
    return {
        "weights, gradients, Adam": 4 * params * 4,
        "backward transient": d_sae * d_in * 4 + (d_sae * d_in * m * 2 + batch * d_sae * 4 if cuda else 0),
        "pre-activations": rows * d_sae * (2 if cuda else 4),
        "batch tensors": 8 * batch * d_in * 4 + batch * (k + aux_k) * (4 + 8) * 3,
        "device store": store_rows * d_in * 2,
    }


def _batches(cfg: TrainConfig, arrays, device: torch.device, d_sae: int, start: int = 0):
    """The training stream from vector ``start`` on: from the memmaps on disk, or from a copy of all
    vectors on the device. On CUDA the disk stream is read ahead by a background thread while each
    step runs on the GPU; on a CPU that thread would take cores from the step itself (measured: 7%
    slower on 2 cores), so the next batch is read when it is needed (one copy per block)."""
    from .store import DeviceBatches

    rows, d = sum(len(a) for a in arrays), arrays[0].shape[1]
    mode = cfg.store
    if mode != "disk" and device.type == "cuda":
        need = sum(memory_estimate(d, d_sae, cfg.k, cfg.batch_size, cfg.tied, aux_k=cfg.aux_k, cuda=True,
                                   store_rows=rows).values())
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
    from . import distributed

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
    from .inception import RANDOM_WARNING, is_random

    sae, seen = state.sae, state.seen
    held_fvu = held_nmse = None
    with clock("evaluation"), torch.no_grad():
        if len(held):
            x = torch.from_numpy(np.array(held, dtype=np.float32)).to(device)
            x_hat = sae(x)
            held_fvu, held_nmse = fvu(x_hat, x).item(), normalized_mse(x_hat, x).item()
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
        "final_fvu_on": f"{len(held)} held-out vectors", "dead_fraction": dead_fraction,
        "dead_after": cfg.dead_after, "lr": lr, "expansion": cfg.expansion, "helpers_version": __version__,
        "input_scale": info["input_scale"],  # the images' convention (None for --vectors: unknown)
    }
    with clock("saving"):
        sae.save(out, **extra)
    write_json(out / TRAIN_RECORD, {"config": asdict(cfg), "last_metrics": last_record, "seconds": clock.record(),
                                    **extra})
    return out


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
        rows.append({"layer": layer, "d_in": cfg["d_in"], "latents": cfg["d_sae"], "k": cfg["k"],
                     "tied": cfg["tied"], "vectors seen": meta.get("vectors_seen"),
                     "held-out FVU": meta.get("final_fvu"), "held-out NMSE": meta.get("final_nmse"),
                     "dead fraction": meta.get("dead_fraction")})
    return rows


def train_layers(cfg: TrainConfig, layers, devices) -> dict[str, Path]:
    """One SAE per layer, all at once: a process per layer, on ``devices`` in turn
    (e.g. five layers on cuda:0..cuda:4). Each writes ``cfg.out/<layer>``."""
    import subprocess
    import sys

    procs = {}
    for i, layer in enumerate(layers):
        one = {**asdict(cfg), "layer": layer, "out": str(Path(cfg.out) / layer), "device": devices[i % len(devices)]}
        args = [sys.executable, "-m", "helpers", "train"]
        for key, value in one.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + key.replace("_", "-"))
            elif value is not None:
                args += [flag, str(value)]
        procs[layer] = subprocess.Popen(args)
    failed = [layer for layer, p in procs.items() if p.wait() != 0]
    if failed:
        raise RuntimeError(f"training failed for {', '.join(failed)}; see the output above, fix, and rerun with --resume")
    return {layer: Path(cfg.out) / layer for layer in layers}
