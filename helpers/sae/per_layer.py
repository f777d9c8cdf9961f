"""One SAE per layer, all at once: a process per layer (``train --layer mixed4a,mixed4b,...``).

Each child runs ``train.train`` on the parent's own ``TrainConfig`` with its layer, output folder
and device filled in (the config object itself, not a command line rebuilt from it), and dies
with the parent: on Linux it asks the kernel for SIGTERM when the parent goes, so killing the
parent never leaves children training into the same folders.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import signal
import sys
from pathlib import Path

from helpers.config import TrainConfig


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent exits (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except OSError:  # no glibc: the parent still waits for and reports every child
            pass


def _train_one(cfg: TrainConfig) -> None:
    _die_with_parent()
    import logging

    from helpers.sae.train import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train(cfg)


def layer_configs(cfg: TrainConfig, layers, devices) -> dict[str, TrainConfig]:
    """Each layer's config: ``cfg`` with that layer, ``cfg.out/<layer>`` and ``devices`` taken in turn."""
    return {layer: dataclasses.replace(cfg, layer=layer, out=str(Path(cfg.out) / layer), device=devices[i % len(devices)])
            for i, layer in enumerate(layers)}


def train_layers(cfg: TrainConfig, layers, devices) -> dict[str, Path]:
    """One SAE per layer, all at once, on ``devices`` in turn (e.g. five layers on cuda:0..cuda:4).
    Each writes ``cfg.out/<layer>``; returns those folders."""
    if not layers:
        raise ValueError("--layer names no layer; give one or more, e.g. --layer mixed4a,mixed4c")
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter per child: no forked CUDA or thread state
    procs = {layer: spawn.Process(target=_train_one, args=(one,), name=f"train {layer}")
             for layer, one in layer_configs(cfg, layers, devices).items()}
    for p in procs.values():
        p.start()
    for p in procs.values():
        p.join()
    failed = [layer for layer, p in procs.items() if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"training failed for {', '.join(failed)}; see the output above, fix, and rerun with --resume")
    return {layer: Path(cfg.out) / layer for layer in layers}
