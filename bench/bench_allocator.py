"""The cost of the kernel's page faults: each case with and without ``helpers.allocator.reuse_freed_memory``.

Each measurement is a fresh process (a process's malloc state is what is measured, so the two settings never share
one), the cases and settings in turns, ``--rounds`` times; the table gives the median seconds of each and their
ratio, with the peak resident memory. The numbers the cases compute are the same either way (only where memory
comes from changes); the child checks it by printing a checksum of its last output.

    python bench/bench_allocator.py                 # all cases, 3 rounds
    python bench/bench_allocator.py --cases forward --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TQDM_DISABLE", "1")

from common import cpu_name, peak_mib, write_results  # noqa: E402

CASES = {
    "forward": "a forward pass of 32 images to mixed4e (no gradient: the harvest's, the example pass's)",
    "featviz": "4 feature-visualisation steps of 16 features at mixed4c, 224 px",
    "train-4c": "4 training steps at mixed4c's shape (d 512, d_sae 8192, batch 4096)",
    "train-4e": "4 training steps at mixed4e's shape (d 832, d_sae 13312, batch 4096)",
}


def _case(name: str):
    """The case's callable (made once, called repeatedly) returning a tensor to check."""
    import torch

    from helpers.config import FeatvizConfig
    from helpers.data.inception import load_model
    from helpers.analysis.featviz import render_directions

    if name in ("forward", "featviz"):
        model = load_model("random")[0]
        if name == "forward":
            x = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))

            def forward():
                with torch.no_grad():
                    return model(x)
            return forward
        directions = torch.randn(16, 512, generator=torch.Generator().manual_seed(0))
        cfg = dataclasses.replace(FeatvizConfig(), steps=4)
        return lambda: torch.from_numpy(render_directions(model, "mixed4c", directions, cfg))

    from helpers.run.profiles import PROFILES
    from helpers.sae.adam import Adam
    from helpers.sae.model import TopKSAE
    from helpers.sae.train import _State, _step

    cfg = PROFILES["cpu"].train
    d, n = (512, 8192) if name == "train-4c" else (832, 13312)
    g = torch.Generator().manual_seed(0)
    xs = [torch.relu(torch.randn(cfg.batch_size, d, generator=g)) for _ in range(4)]
    sae = TopKSAE(d, n, cfg.sae.k, cfg.sae.tied, seed=0, kernels=cfg.kernels)
    state = _State(sae, Adam(sae.parameters(), 1e-4), torch.zeros(n, dtype=torch.long))
    step_cfg = dataclasses.replace(cfg, vectors=None)

    def steps():  # the same SAE on: the checksum is of the last call's weights, the same in every process
        for x in xs:  # 1% of latents dead (AuxK), as bench_profile times a training
            state.seen = cfg.dead_after
            state.since_fired.zero_()[: round(0.01 * n)] = cfg.dead_after
            _step(step_cfg, state, x)
        return sae.W_dec.detach()

    return steps


def child(name: str, reuse: bool, repeats: int) -> dict:
    from helpers.allocator import reuse_freed_memory

    run = _case(name)
    with reuse_freed_memory() if reuse else contextlib.nullcontext():
        run(), run()  # warm-up: imports, Numba's kernels, and the first calls' allocations, which grow the heap
        seconds = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = run()
            seconds.append(time.perf_counter() - t)
    return {"seconds": statistics.median(seconds), "peak MiB": round(peak_mib()),
            "checksum": float(out.double().abs().sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per process (their median)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--reuse", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.reuse, a.repeats)))
        return
    runs = {case: {False: [], True: []} for case in a.cases}
    for r in range(a.rounds):
        for case in a.cases:
            for reuse in (False, True):
                cmd = [sys.executable, __file__, "--child", case, "--repeats", str(a.repeats)] + (["--reuse"] * reuse)
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                runs[case][reuse].append(json.loads(out))
                print(f"round {r + 1} {case} {'reuse' if reuse else 'plain'}: {runs[case][reuse][-1]}", flush=True)
    rows = []
    for case, by in runs.items():
        plain, reuse = (statistics.median(x["seconds"] for x in by[k]) for k in (False, True))
        same = {x["checksum"] for x in by[False] + by[True]}
        rows.append({"case": case, "what": CASES[case], "plain s": round(plain, 3), "reuse s": round(reuse, 3),
                     "plain / reuse": round(plain / reuse, 2),
                     "peak MiB plain": max(x["peak MiB"] for x in by[False]),
                     "peak MiB reuse": max(x["peak MiB"] for x in by[True]),
                     "same numbers": len(same) == 1, "rounds": {k: [x["seconds"] for x in by[v]]
                                                                for k, v in (("plain", False), ("reuse", True))}})
    print(f"\n{cpu_name()}, {a.rounds} rounds, fresh process each, in turns")
    print(f"{'case':10} {'plain s':>8} {'reuse s':>8} {'ratio':>6} {'peak MiB':>15}  same numbers")
    for row in rows:
        print(f"{row['case']:10} {row['plain s']:8.3f} {row['reuse s']:8.3f} {row['plain / reuse']:6.2f} "
              f"{row['peak MiB plain']:>6} / {row['peak MiB reuse']:<6}  {row['same numbers']}")
    write_results("allocator", "cpu", {"rounds": a.rounds, "repeats": a.repeats, "rows": rows})


if __name__ == "__main__":
    main()
