"""Training checkpoints: the SAE's weights, Adam's state and the dead-latent counters in one
safetensors file (no pickle), with the settings that made them; a run resumes only under the
same settings."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from helpers.config import SaeConfig
from helpers.files import atomic_write

# settings a resumed run must share with the checkpoint (the budget may grow; the kernels compute the same)
RESUME_KEYS = ("run", "layer", "vectors", "sae", "lr", "batch_size", "seed", "holdout", "dead_after", "store")
_SAE_KEYS = ("expansion", "k", "tied", "aux_k", "aux_coef")  # a checkpoint from before SaeConfig kept them flat


def data_record(info: dict) -> dict:
    """What a checkpoint records of the vectors it was trained on: the harvest's identity (or the .npy's
    dtype, shape and size) and the images' input convention."""
    return {"identity": info.get("identity"), "input_scale": info.get("input_scale")}


def save_checkpoint(path: Path, state, cfg, data: dict | None = None) -> None:
    from safetensors.torch import save as save_bytes

    sae, opt = state.sae, state.opt
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in sae.named_parameters()}
    names = {id(p): n for n, p in sae.named_parameters()}
    for p, st in opt.state.items():
        for key, value in st.items():
            tensors[f"adam/{names[id(p)]}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["since_fired"] = state.since_fired.cpu()
    meta = {"vectors_seen": str(state.seen), "step": str(state.step), "config": json.dumps(asdict(cfg)),
            "data": json.dumps(data or {})}
    data = save_bytes(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))


class CheckpointError(ValueError):
    """A training checkpoint that cannot be resumed from."""


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
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
        if "sae" not in old:
            old["sae"] = {k: old.pop(k) for k in _SAE_KEYS if k in old}
        int(meta["vectors_seen"]), int(meta["step"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} lacks this trainer's metadata (config, vectors_seen, step); {fix}") from e
    return meta, tensors, old


def load_checkpoint(path: Path, state, cfg, device, data: dict | None = None) -> None:
    """Resume ``state`` from ``path``; refused when it was made with other settings or on other vectors
    (another harvest at the same path, another input convention: ``data_record``)."""
    sae, opt = state.sae, state.opt
    meta, tensors, old = read_checkpoint(path)
    made_on = json.loads(meta.get("data") or "{}")
    if data and made_on and made_on != data:
        raise CheckpointError(f"cannot resume: the checkpoint in {path.parent} was made on other vectors "
                              f"({made_on['identity']}, {made_on['input_scale']!r} inputs) than these "
                              f"({data['identity']}, {data['input_scale']!r} inputs); train into a new --out, or "
                              "point --run/--vectors back at the vectors it was made on")
    new = asdict(cfg)
    differ = [f"{k}={old.get(k)!r}" for k in RESUME_KEYS if k != "sae" and old.get(k) != new.get(k)]
    defaults = asdict(SaeConfig())  # a setting added since the checkpoint was made: it had the default
    differ += [f"{k}={old['sae'].get(k, defaults[k])!r}" for k in new["sae"] if old["sae"].get(k, defaults[k]) != new["sae"][k]]
    if differ:
        raise ValueError(f"cannot resume: the checkpoint in {path.parent} was made with other settings "
                         f"({', '.join(differ)}); use those or a new --out")
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
