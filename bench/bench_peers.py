"""Our SAE trainer against the peers, side by side in one run (no assertions on time).

Same data, same hyper-parameters: d=512, n=8192 latents, k=32, batch 4096, Adam lr 4e-4,
the same number of vectors for each, and b_dec starting at the geometric median of the
first batch (what both our trainer and sparsify's do at step 0). Reported: vectors/s,
peak resident memory, and the held-out FVU after training. The data are sparse
combinations of a planted dictionary (so the FVU means something); the encoder matmul
alone is the floor. Ours uses our trainer's optimizer (``train.make_optimizer``: fused
Adam); the peers use ``torch.optim.Adam``'s default.

Each case runs in its own process (so peak memory is its own), and the cases take turns
for ``--rounds`` rounds; the table gives each case's median over the rounds, so a slow
moment of a shared machine does not land on one case only.

Peers: EleutherAI's sparsify (``eai-sparsify``; on CPU its eager ``embedding_bag`` decoder,
since Triton needs a GPU) and SAELens' TopK training SAE. Install them with
``pip install -e '.[peers]'``; a peer that is not installed is skipped.

    python bench/bench_peers.py [--steps 12] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import median_run, peak_mib, write_results  # noqa: E402

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1" if "--device" not in sys.argv or "cpu" in sys.argv else "0")

D, N, K, BATCH, LR = 512, 8192, 32, 4096, 4e-4
CASES = ("encoder-matmul", "ours-tied-full", "ours-tied-init", "sparsify", "saelens")


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

    from helpers.sae import geometric_median

    median = geometric_median(first_batch)
    if case.startswith("ours"):
        from helpers.sae import TopKSAE, normalized_mse
        from helpers.train import make_optimizer

        sae = TopKSAE(D, N, K, "init" if case.endswith("init") else "full", seed=0).to(dev)
        sae.b_dec.data.copy_(median)
        return (make_optimizer(sae.parameters(), LR), lambda x: normalized_mse(sae.forward_train(x).x_hat, x),
                sae.remove_radial_grad, sae.normalize_decoder, sae)
    if case == "sparsify":
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


def run_case(case: str, steps: int, device: str) -> dict:
    import torch

    dev = torch.device(device)
    train, held = data(steps)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if case == "encoder-matmul":
        w, b = torch.randn(N, D, device=dev), torch.zeros(N, device=dev)
        x = train[:BATCH].to(dev)
        torch.addmm(b, x, w.T)
        t = time.perf_counter()
        for _ in range(steps):
            torch.addmm(b, x, w.T)
        sync()
        return {"vectors_per_s": steps * BATCH / (time.perf_counter() - t), "peak_mib": peak_mib()}
    opt, loss_fn, after_backward, after_step, model = make(case, dev, train[:BATCH].to(dev))

    def step(x):
        loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        after_backward()
        opt.step()
        after_step()

    step(train[:BATCH].to(dev))  # warm-up (counted in the budget below: same for every case)
    sync()
    t = time.perf_counter()
    for s in range(1, steps):
        step(train[s * BATCH:(s + 1) * BATCH].to(dev))
    sync()
    seconds = time.perf_counter() - t
    with torch.no_grad():
        x = held.to(dev)
        x_hat = model(x)
        fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return {"vectors_per_s": (steps - 1) * BATCH / seconds, "peak_mib": peak_mib(), "heldout_fvu": fvu,
            "vectors": steps * BATCH}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="the cases take turns this many times; medians are reported")
    p.add_argument("--case")
    a = p.parse_args()
    if a.case:
        print(json.dumps(run_case(a.case, a.steps, a.device)))
        return
    runs: dict[str, list[dict]] = {}
    skipped = set()
    for r in range(a.rounds):
        for case in CASES:
            if case in skipped:
                continue
            proc = subprocess.run([sys.executable, __file__, "--case", case, "--steps", str(a.steps),
                                   "--device", a.device], capture_output=True, text=True)
            if proc.returncode:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"({case} skipped: {last})")
                skipped.add(case)
                continue
            runs.setdefault(case, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {case} {runs[case][-1]['vectors_per_s']:.0f} vectors/s", flush=True)
    results = {case: median_run(rs) for case, rs in runs.items()}
    floor = results["encoder-matmul"]["vectors_per_s"]
    ref = results.get("sparsify", {}).get("vectors_per_s")
    print(f"\ndevice {a.device}; d={D} n={N} k={K} batch {BATCH}, Adam lr {LR}, {a.steps * BATCH} vectors each; "
          f"medians of {a.rounds} rounds")
    print("  case              vectors/s   of floor   vs sparsify (rounds)   held-out FVU   peak RSS MiB")
    ref_rounds = results.get("sparsify", {}).get("rounds")
    for case, r in results.items():
        vs = "       -" + " " * 14
        if ref:
            per_round = [a / b for a, b in zip(r["rounds"], ref_rounds)]
            r["vs_sparsify"], r["vs_sparsify_rounds"] = r["vectors_per_s"] / ref, per_round
            vs = f"{r['vs_sparsify']:8.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"
        fvu = f"{r['heldout_fvu']:10.4f}" if "heldout_fvu" in r else "         -"
        print(f"  {case:<16} {r['vectors_per_s']:10.0f}   {r['vectors_per_s'] / floor:7.2f}   {vs}   {fvu}"
              f"   {r['peak_mib']:10.0f}")
    write_results("peers", a.device, results)


if __name__ == "__main__":
    main()
