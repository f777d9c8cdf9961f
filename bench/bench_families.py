"""Each SAE family's training step beside TopK's, side by side in one process (no assertions on time).

The trainer's own step (``helpers.sae.train._step``: forward, loss, backward, Adam, the decoder constraint,
the family's state updates) for TopK (the sparse path) and BatchTopK, Matryoshka and JumpReLU (dense), on the
same batches of planted data (bench_peers.data: d=512, n=8192 latents, k=32, batch 4096), one step of each in
turn so that a slow moment of a shared machine falls on all. Reported: the median step time of each, vectors/s,
and the median of the per-round ratio to TopK's step.

    python bench/bench_families.py [--steps 12] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import cpu_name, write_results  # noqa: E402
from bench_peers import BATCH, D, K, LR, N, data  # noqa: E402

FAMILIES = ("topk", "batchtopk", "matryoshka", "jumprelu")


def main() -> None:
    import torch

    from helpers.config import SaeConfig, TrainConfig
    from helpers.sae import families
    from helpers.sae.adam import Adam
    from helpers.sae.loss import geometric_median
    from helpers.sae.model import TopKSAE
    from helpers.sae.train import _State, _step

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    dev = torch.device(a.device)
    train, _ = data(a.steps + 2)
    states, cfgs = {}, {}
    for family in FAMILIES:
        cfgs[family] = TrainConfig(vectors="-", batch_size=BATCH, lr=LR, sae=SaeConfig(expansion=N // D, k=K, tied="init",
                                                                                        architecture=family))
        sae = TopKSAE(D, N, K, "init", seed=0, architecture=family).to(dev)
        first = train[:BATCH].to(dev)
        sae.b_dec.data.copy_(geometric_median(first))
        sae.fit_scale(first)
        if family != "topk":
            families.start(sae, first)
        states[family] = _State(sae, Adam(sae.parameters(), LR), torch.zeros(N, dtype=torch.long, device=dev))
    times = {f: [] for f in FAMILIES}
    for s in range(a.steps + 1):  # the first step of each is a warm-up
        x = train[s * BATCH:(s + 1) * BATCH].to(dev)
        for family in FAMILIES:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            _step(cfgs[family], states[family], x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if s:
                times[family].append(time.perf_counter() - t)
    where = cpu_name() if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    print(f"family training steps, {where}; d={D}, n={N}, k={K}, batch {BATCH}, {a.steps} steps each, in turn")
    print(f"  {'family':<11} {'ms/step':>8} {'vectors/s':>10} {'x TopK step':>12}")
    results = {"device": where}
    for family in FAMILIES:
        ratio = statistics.median(f / t for f, t in zip(times[family], times["topk"]))
        med = statistics.median(times[family])
        results[family] = {"ms_per_step": 1000 * med, "vectors_per_s": BATCH / med, "ratio_to_topk": ratio}
        print(f"  {family:<11} {1000 * med:8.1f} {BATCH / med:10.0f} {ratio:12.2f}")
    write_results("families", dev.type, results)


if __name__ == "__main__":
    main()
