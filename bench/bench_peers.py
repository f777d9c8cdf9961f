"""Our SAE trainer against the peers, side by side in one run (no assertions on time).

Same data, same hyper-parameters: d=512, n=8192 latents, k=32, batch 4096, Adam lr 4e-4,
the same number of vectors for each, and b_dec starting at the geometric median of the
first batch (what both our trainer and sparsify's do at step 0). Reported: vectors/s,
peak resident memory, and the held-out FVU after training. The data are sparse
combinations of a planted dictionary (so the FVU means something); the encoder matmul
alone (float32) is the floor; the bf16 product of the same shapes, which our CPU TopK screens with,
is shown beside it. Ours uses our trainer's optimizer (``adam.Adam``: torch's fused
Adam kernel); the peers use ``torch.optim.Adam``'s default.

Two runs. Alone: each case in its own process (so peak memory is its own) trains for
``--steps`` steps and gives the held-out FVU, peak memory and its own speed. Side by side:
all cases in one process take one step each in turn, so a slow moment of a shared machine
falls on all of them; speed is the batch over the median step time, and "vs sparsify" the
median over steps of the ratio of step times.

Peers: EleutherAI's sparsify (``eai-sparsify``; on CPU its eager ``embedding_bag`` decoder,
since Triton needs a GPU) and SAELens' TopK training SAE. Install them with
``pip install -e '.[peers]'``; a peer that is not installed is skipped.

    python bench/bench_peers.py [--steps 12] [--interleaved-steps 20] [--device cpu]
"""

from __future__ import annotations

import argparse
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
from common import cpu_name, peak_mib, write_results  # noqa: E402


D, N, K, BATCH, LR = 512, 8192, 32, 4096, 4e-4
SCREEN = "auto"  # ours' --screen (the command line's)
CASES = ("encoder-matmul", "encoder-matmul-bf16", "ours-tied-full", "ours-tied-init", "ours-tied-full-torch-topk",
         "sparsify", "saelens")
FLOORS = ("encoder-matmul", "encoder-matmul-bf16")


def floor_step(case: str, dev):
    """The floors: the float32 encoder matmul of a batch (the issue's floor), and the bf16 product that our
    CPU TopK screens with (``helpers/screened_topk.py``: 1024 rows at a time into one buffer, as it does)."""
    import torch

    w, b = torch.randn(N, D, device=dev), torch.zeros(N, device=dev)
    if case == "encoder-matmul":
        return lambda x: torch.addmm(b, x, w.T)
    buf = torch.empty(1024, N, dtype=torch.bfloat16, device=dev)

    def screen(x):
        x_b, w_b = x.to(torch.bfloat16), w.to(torch.bfloat16)
        for s in range(0, len(x), 1024):
            torch.mm(x_b[s:s + 1024], w_b.T, out=buf[: min(1024, len(x) - s)])
    return screen


def data(steps: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(4 * N // 2, D, generator=g), dim=1)
    total = steps * BATCH + 8192

    def draw(n):
        idx = torch.randint(0, len(atoms), (n, K), generator=g)
        coef = torch.rand(n, K, generator=g) * 3
        return torch.relu(torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=coef, mode="sum")
                          + 0.05 * torch.randn(n, D, generator=g))

    x = draw(total)
    return x[: steps * BATCH], x[steps * BATCH:]


def make(case: str, dev, first_batch):
    """(optimizer, step(x) -> loss tensor, after_backward(), after_step(), reconstruct(x))."""
    import torch

    from helpers.sae.loss import geometric_median

    median = geometric_median(first_batch)
    if case.startswith("ours"):
        from helpers.sae.loss import normalized_mse
        from helpers.sae.model import TopKSAE
        from helpers.sae.adam import Adam

        from helpers.config import Kernels

        sae = TopKSAE(D, N, K, "init" if case.endswith("init") else "full", seed=0,  # -torch-topk: without our CPU TopK
                      kernels=Kernels(screen=SCREEN, cpu_topk=not case.endswith("torch-topk"))).to(dev)
        sae.b_dec.data.copy_(median)
        sae.fit_scale(first_batch)  # the trainer's start (chapter 03)
        return (Adam(sae.parameters(), LR), lambda x: normalized_mse(sae.forward_train(x).x_hat, x),
                sae.remove_radial_grad, sae.normalize_decoder, sae)
    if case == "sparsify":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "0" if torch.device(dev).type == "cuda" else "1")
        from sparsify import SparseCoder, SparseCoderConfig

        sae = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K), device=dev)
        sae.b_dec.data.copy_(median)
        return (torch.optim.Adam(sae.parameters(), lr=LR), lambda x: sae(x).fvu,
                sae.remove_gradient_parallel_to_decoder_directions, sae.set_decoder_norm_to_unit_norm,
                lambda x: sae(x).sae_out)
    if case == "saelens":
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=N, k=K, device=str(dev)))
        sae.b_dec.data.copy_(median)

        def loss(x):
            acts, _ = sae.encode_with_hidden_pre(x)
            return (sae.decode(acts) - x).pow(2).sum(-1).mean()

        return (torch.optim.Adam(sae.parameters(), lr=LR), loss, lambda: None, lambda: None,
                lambda x: sae.decode(sae.encode(x)))
    raise ValueError(case)


def stepper(opt, loss_fn, after_backward, after_step):
    """One training step of a case: loss, backward, the case's gradient fix, Adam, its weight fix."""
    def step(x):
        loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        after_backward()
        opt.step()
        after_step()
    return step


def run_case(case: str, steps: int, device: str) -> dict:
    import torch

    dev = torch.device(device)
    train, held = data(steps)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(fn, *args) -> float:
        sync()
        t = time.perf_counter()
        fn(*args)
        sync()
        return time.perf_counter() - t

    if case in FLOORS:
        step, x = floor_step(case, dev), train[:BATCH].to(dev)
        step(x)
        seconds = [timed(step, x) for _ in range(steps)]
        return {"vectors_per_s": BATCH / statistics.median(seconds), "peak_mib": peak_mib()}
    *parts, model = make(case, dev, train[:BATCH].to(dev))
    step = stepper(*parts)
    step(train[:BATCH].to(dev))  # warm-up (counted in the budget below: same for every case)
    seconds = [timed(step, train[s * BATCH:(s + 1) * BATCH].to(dev)) for s in range(1, steps)]
    with torch.no_grad():
        x = held.to(dev)
        x_hat = model(x)
        fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return {"vectors_per_s": BATCH / statistics.median(seconds), "peak_mib": peak_mib(), "heldout_fvu": fvu,
            "vectors": steps * BATCH}


def interleaved(cases, steps: int, device: str) -> dict:
    """All cases in one process, taking one step each in turn, so that every moment of the
    machine (a shared one especially) is shared out evenly. Per case: the median step's
    vectors/s, and against sparsify the median over steps of the ratio of step times."""
    import torch

    dev = torch.device(device)
    train, _ = data(4)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    steppers = {}
    for case in cases:
        if case in FLOORS:
            steppers[case] = floor_step(case, dev)
            continue
        *parts, _ = make(case, dev, train[:BATCH].to(dev))
        steppers[case] = stepper(*parts)
    seconds = {case: [] for case in cases}
    for s in range(steps + 1):
        x = train[(s % 4) * BATCH:(s % 4 + 1) * BATCH].to(dev)
        for case, step in steppers.items():
            sync()
            t = time.perf_counter()
            step(x)
            sync()
            if s:  # step 0 warms up
                seconds[case].append(time.perf_counter() - t)
    out = {case: {"vectors_per_s": BATCH / statistics.median(ts)} for case, ts in seconds.items()}
    if "sparsify" in seconds:
        for case, ts in seconds.items():
            ratios = sorted(r / t for t, r in zip(ts, seconds["sparsify"]))
            out[case].update(vs_sparsify=statistics.median(ratios),
                             vs_sparsify_quartiles=[ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="training steps per case for the FVU and memory runs")
    p.add_argument("--interleaved-steps", type=int, default=20, help="steps per case in the side-by-side speed run")
    p.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    p.add_argument("--case")
    p.add_argument("--interleaved", nargs="*")
    p.add_argument("--screen", default="auto", choices=["auto", "on", "off"],
                   help="ours' bf16-screened TopK on a CPU (the training config's --screen)")
    a = p.parse_args()
    global SCREEN
    SCREEN = a.screen
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.case:
        print(json.dumps(run_case(a.case, a.steps, a.device)))
        return
    if a.interleaved is not None:
        print(json.dumps(interleaved(a.interleaved, a.interleaved_steps, a.device)))
        return
    results = {}
    for case in CASES:  # alone, each in its own process: held-out FVU and peak memory
        proc = subprocess.run([sys.executable, __file__, "--case", case, "--steps", str(a.steps),
                               "--device", a.device, "--screen", a.screen], capture_output=True, text=True)
        if proc.returncode:
            print(f"({case} skipped: {(proc.stderr.strip().splitlines() or ['?'])[-1]})")
            continue
        results[case] = {"alone": json.loads(proc.stdout.strip().splitlines()[-1])}
        print(f"{case}: alone {results[case]['alone']['vectors_per_s']:.0f} vectors/s", flush=True)
    proc = subprocess.run([sys.executable, __file__, "--interleaved", *results, "--interleaved-steps",
                           str(a.interleaved_steps), "--device", a.device, "--screen", a.screen],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the side-by-side run failed:\n{proc.stderr[-3000:]}")
    for case, r in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        results[case].update(r)
    floor = results["encoder-matmul"]["vectors_per_s"]
    print(f"\ndevice {a.device} ({cpu_name()}); d={D} n={N} k={K} batch {BATCH}, Adam lr {LR}, ours' --screen {a.screen}")
    print(f"vectors/s: side by side in one process, median of {a.interleaved_steps} steps each; 'vs sparsify': median "
          "per-step ratio (quartiles)")
    print(f"FVU and memory: each case alone in its own process after {a.steps * BATCH} vectors")
    print("  case                  vectors/s   of floor   vs sparsify         alone vec/s   held-out FVU   peak RSS MiB")
    for case, r in results.items():
        vs = f"{r['vs_sparsify']:6.2f}x ({r['vs_sparsify_quartiles'][0]:.2f}-{r['vs_sparsify_quartiles'][1]:.2f})" \
            if "vs_sparsify" in r else " " * 19
        alone = r["alone"]
        fvu = f"{alone['heldout_fvu']:10.4f}" if "heldout_fvu" in alone else "         -"
        print(f"  {case:<20} {r['vectors_per_s']:10.0f}   {r['vectors_per_s'] / floor:7.2f}   {vs}   "
              f"{alone['vectors_per_s']:10.0f}   {fvu}   {alone['peak_mib']:10.0f}")
    write_results("peers", a.device, results)


if __name__ == "__main__":
    main()
