"""Where a training step's time goes on a GPU (no assertions on time).

Times ``bench_core.train_step`` (the trainer's step: bf16 autocast, our sparse decoder) for
each variant side by side, in turns, median over steps; then a ``torch.profiler`` table of one
variant's kernels, and the host time per step against the device time (a step whose host
time exceeds its device time is bound by kernel launches, not by the GPU).

    python bench/profile_cuda.py [--steps 30]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from bench_core import train_step  # noqa: E402
from helpers.config import Kernels  # noqa: E402
from helpers.sae.model import TopKSAE  # noqa: E402
from helpers.sae.adam import Adam  # noqa: E402

VARIANTS = {  # name: (the SAE's kernel switches, tf32, dense decoder)
    "sparse (default: dense TF32 weight grad)": (Kernels(), False, False),
    "sparse, embedding_bag weight grad": (Kernels(scatter="bag"), False, False),
    "sparse, torch decoder": (Kernels(triton=False), False, False),
    "dense decoder": (Kernels(), False, True),
    "dense decoder, tf32": (Kernels(), True, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--n", type=int, default=8192)
    a = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    xs = [torch.relu(torch.randn(4096, 512, device=dev)) for _ in range(4)]
    models = {}
    for name, (kernels, _, _) in VARIANTS.items():
        sae = TopKSAE(512, a.n, 32, "full", seed=0, kernels=kernels).to(dev)
        models[name] = (sae, Adam(sae.parameters(), 4e-4))

    def run(name, x):
        _, tf32, dense = VARIANTS[name]
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            train_step(*models[name], x, dense=dense)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False

    seconds = {name: [] for name in VARIANTS}
    for s in range(a.steps + 2):
        for name in VARIANTS:
            torch.cuda.synchronize()
            t = time.perf_counter()
            run(name, xs[s % 4])
            torch.cuda.synchronize()
            if s >= 2:
                seconds[name].append(time.perf_counter() - t)
    print(f"training step, d=512 n={a.n} k=32 batch 4096, bf16 autocast, median of {a.steps} steps in turns")
    for name, ts in seconds.items():
        med = statistics.median(ts)
        print(f"  {name:<34} {med * 1e3:7.3f} ms   {4096 / med:12.0f} vectors/s")

    from torch.profiler import ProfilerActivity, profile
    for name in ("sparse (default: dense TF32 weight grad)",):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for s in range(10):
                run(name, xs[s % 4])
            torch.cuda.synchronize()
        events = prof.key_averages()
        cuda_total = sum(e.self_device_time_total for e in events) / 10 / 1e3
        print(f"\n{name}: device time per step {cuda_total:.3f} ms (sum of kernels); kernels:")
        print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
