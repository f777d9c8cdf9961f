"""Training end to end, as a user runs it: whole processes, ours against sparsify, in turns.

Each round starts ``python -m helpers train --vectors FILE ...`` and then the same training
with EleutherAI's sparsify (a short script, as a sparsify user writes it: the .npy
memory-mapped, a shuffled permutation per epoch, b_dec at the geometric median of a
sample, Adam, unit-norm decoder, the held-out FVU, ``save_to_disk``), one after the other,
``--rounds`` times. Same data (sparse combinations of a planted dictionary, d=512, saved as
float16 .npy), same settings (n=8192 latents, k=32, batch 4096, lr 4e-4, decoder tied at
initialisation only, no AuxK), same held-out vectors (the last 16,384).

Reported: wall seconds per process (median over rounds), the median of the per-round ratio
sparsify / ours, the held-out FVU of each, and a breakdown: start-up (process start until
training code runs: imports), then the phases each process records (ours: ``train.json``'s
``seconds``), data (waiting for batches), steps, evaluation, saving.

    python bench/bench_e2e.py [--vectors 163840] [--rounds 3] [--data-rows 200000] [--device cuda]
                              [--cases ours,sparsify,ours-in-memory]

``--grid``: quality at every shape, not only the tuned one. For each d in {512, 832}, n in {4096,
8192, 16384, 32768} and k in {16, 32, 64, 128} (or ``--grid-shapes D:N:K,...``), one round of ours
and sparsify (whole processes, in turn) on planted data of that d (2n atoms, 32 active per vector),
reported as a table of held-out FVU (ours, sparsify) and the wall-time ratio sparsify / ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import cpu_name, write_results  # noqa: E402

D, N, K, BATCH, LR, HOLDOUT = 512, 8192, 32, 4096, 4e-4, 16384
GRID = [(d, n, k) for d in (512, 832) for n in (4096, 8192, 16384, 32768) for k in (16, 32, 64, 128)]


def make_data(path: Path, rows: int, d: int | None = None, n: int | None = None) -> None:
    """The tuned shape's data (bench_peers.data), or planted data of width d for n latents (2n atoms, 32 active
    per vector, coefficients uniform in [0, 3], 5% noise, ReLU: the same recipe at another shape)."""
    import numpy as np
    import torch

    if d is None:
        from bench_peers import data

        train, held = data(-(-rows // BATCH) + 2)
        x = torch.cat([train, held])
    else:
        g = torch.Generator().manual_seed(0)
        atoms = torch.nn.functional.normalize(torch.randn(2 * n, d, generator=g), dim=1)
        idx = torch.randint(0, len(atoms), (rows, 32), generator=g)
        coef = torch.rand(rows, 32, generator=g) * 3
        x = torch.relu(torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=coef, mode="sum")
                       + 0.05 * torch.randn(rows, d, generator=g))
    np.save(path, x.numpy().astype(np.float16)[:rows])


def run_sparsify(vectors: str, out: str, budget: int, device: str = "cpu", shape=(D, N, K)) -> dict:
    """The sparsify user's script; prints its phases as JSON. On CUDA, its Triton decoder."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "0" if device.startswith("cuda") else "1")
    import numpy as np
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    from helpers.sae.loss import geometric_median

    started = time.time()  # as ours: once the imports are done

    def clock():  # phases end when the device's work is done
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    seconds = {}
    t = clock()
    x_all = np.load(vectors, mmap_mode="r")
    train, held = x_all[:-HOLDOUT], x_all[-HOLDOUT:]
    seconds["open"] = clock() - t
    t = clock()
    torch.manual_seed(0)
    d, n, k = shape
    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device)
    rng = np.random.default_rng(0)
    sample = torch.from_numpy(np.asarray(train[np.sort(rng.choice(len(train), 16384, replace=False))])).float().to(device)
    sae.b_dec.data.copy_(geometric_median(sample))  # as sparsify's trainer initialises b_dec
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    seconds["init"] = clock() - t
    seconds["data"] = seconds["steps"] = 0.0
    order, pos = rng.permutation(len(train)), 0
    for _ in range(-(-budget // BATCH)):
        t = clock()
        if pos + BATCH > len(order):
            order, pos = rng.permutation(len(train)), 0
        x = torch.from_numpy(np.asarray(train[np.sort(order[pos:pos + BATCH])])).to(device).float()
        pos += BATCH
        seconds["data"] += clock() - t
        t = clock()
        loss = sae(x).fvu
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        seconds["steps"] += clock() - t
    t = clock()
    with torch.no_grad():
        xh = torch.from_numpy(np.asarray(held)).to(device).float()
        out_h = sae(xh).sae_out
        fvu = float((out_h - xh).pow(2).sum() / (xh - xh.mean(0)).pow(2).sum())
    seconds["evaluation"] = clock() - t
    t = clock()
    sae.save_to_disk(out)
    seconds["saving"] = clock() - t
    return {"started_at": started, "fvu": fvu, **seconds}


def run_ours(vectors: str, out: str, budget: int, device: str = "cpu", store: str = "auto", shape=(D, N, K)) -> list[str]:
    """Our train command; on CUDA with the vectors held on the device (``--store device``), and so with
    ``store="device"`` on a CPU (the vectors in memory: the disk store's reference)."""
    store = ["--store", "device"] if device.startswith("cuda") or store == "device" else []
    return [sys.executable, "-m", "helpers", "train", "--vectors", vectors, "--out", out, "--latents", str(shape[1]),
            "--k", str(shape[2]), "--tied", "init", "--batch-size", str(BATCH), "--lr", str(LR), "--vectors-seen",
            str(budget), "--holdout", str(HOLDOUT), "--device", device, *store]


def one(case: str, vectors: str, budget: int, tmp: str, device: str, shape=(D, N, K)) -> dict:
    out = tempfile.mkdtemp(dir=tmp)
    cmd = run_ours(vectors, out, budget, device, "device" if case == "ours-in-memory" else "auto", shape) \
        if case.startswith("ours") else [sys.executable, __file__, "--run-sparsify", vectors, "--out", out, "--vectors",
                                         str(budget), "--device", device, "--shape", ":".join(map(str, shape))]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"{case} failed:\n{proc.stderr[-2000:]}")
    if case.startswith("ours"):
        record = json.loads((Path(out) / "train.json").read_text())
        phases, fvu = record["seconds"], record["final_fvu"]
    else:
        phases = json.loads(proc.stdout.strip().splitlines()[-1])
        fvu = phases.pop("fvu")
    started = phases.pop("started_at")
    return {"wall": wall, "fvu": fvu, "start-up": started - t0, **phases}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vectors", type=int, default=163_840, help="training budget in vectors (each trainer)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data-rows", type=int, default=200_000)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (ours then with --store device)")
    p.add_argument("--cases", default="ours,sparsify",
                   help="of ours, sparsify, ours-in-memory (ours with --store device on a CPU: the disk store's "
                        "reference)")
    p.add_argument("--run-sparsify", metavar="NPY", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--shape", default=f"{D}:{N}:{K}", help=argparse.SUPPRESS)
    p.add_argument("--grid", action="store_true", help="FVU and speed of ours and sparsify at every shape of GRID")
    p.add_argument("--grid-shapes", help="instead of GRID: D:N:K,D:N:K,...")
    a = p.parse_args()
    if a.run_sparsify:
        print(json.dumps(run_sparsify(a.run_sparsify, a.out, a.vectors, a.device, tuple(map(int, a.shape.split(":"))))))
        return
    if a.grid or a.grid_shapes:
        shapes = [tuple(map(int, s.split(":"))) for s in a.grid_shapes.split(",")] if a.grid_shapes else GRID
        grid(shapes, a.vectors, a.device)
        return
    with tempfile.TemporaryDirectory() as tmp:
        vectors = str(Path(tmp) / "vectors.npy")
        make_data(Path(vectors), max(a.data_rows, HOLDOUT * 10))
        runs = {case: [] for case in a.cases.split(",")}
        for r in range(a.rounds):
            for case in runs:
                runs[case].append(one(case, vectors, a.vectors, tmp, a.device))
                print(f"round {r + 1} {case}: {runs[case][-1]['wall']:.1f} s, FVU {runs[case][-1]['fvu']:.4f}",
                      flush=True)
    phases = ["start-up", "open", "init", "data", "steps", "log", "checkpoint", "evaluation", "saving"]
    where = torch_device_name(a.device)
    print(f"\nend to end, {where}; {a.vectors} vectors of d={D}, n={N}, k={K}, batch {BATCH}, "
          f"{a.rounds} rounds in turn")
    ratios = {}
    for slow, fast in (("sparsify", "ours"), ("ours", "ours-in-memory")):
        if slow in runs and fast in runs:
            r = ratios[f"{slow} / {fast}"] = [s["wall"] / o["wall"] for o, s in zip(runs[fast], runs[slow])]
            print(f"  {slow} / {fast}, median per-round ratio: {statistics.median(r):.2f}x "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in r)})")
    print("  case            wall s   FVU     " + "  ".join(f"{ph:>10}" for ph in phases))
    results = {}
    for case, rs in runs.items():
        med = {k: statistics.median(r.get(k, 0.0) for r in rs) for k in ["wall", "fvu", *phases]}
        results[case] = {**med, "rounds": rs}
        print(f"  {case:<14} {med['wall']:7.1f}  {med['fvu']:.4f} " + "  ".join(f"{med[ph]:10.2f}" for ph in phases))
    results["ratio"] = {name: {"median": statistics.median(r), "rounds": r} for name, r in ratios.items()}
    results["device"] = where
    write_results("e2e", a.device.split(":")[0], results)


def grid(shapes, budget: int, device: str) -> None:
    """One round of ours and sparsify at each shape (data made once per (d, n)); a table of FVU and speed."""
    rows = []
    print(f"quality grid, {torch_device_name(device)}; {budget} vectors, batch {BATCH}, lr {LR}, one round each, in turn")
    print(f"  {'d':>4} {'n':>6} {'k':>4}   FVU ours  FVU sparsify   ours - sparsify   wall sparsify / ours")
    with tempfile.TemporaryDirectory() as tmp:
        made = None
        for d, n, k in shapes:
            vectors = str(Path(tmp) / "vectors.npy")
            if made != (d, n):
                make_data(Path(vectors), budget + HOLDOUT + BATCH, d, n)
                made = (d, n)
            ours, theirs = (one(case, vectors, budget, tmp, device, (d, n, k)) for case in ("ours", "sparsify"))
            rows.append({"d": d, "n": n, "k": k, "fvu_ours": ours["fvu"], "fvu_sparsify": theirs["fvu"],
                         "wall_ours": ours["wall"], "wall_sparsify": theirs["wall"],
                         "speed_ratio": theirs["wall"] / ours["wall"]})
            r = rows[-1]
            print(f"  {d:>4} {n:>6} {k:>4}   {r['fvu_ours']:8.4f}  {r['fvu_sparsify']:12.4f}   {r['fvu_ours'] - r['fvu_sparsify']:+15.4f}"
                  f"   {r['speed_ratio']:20.2f}", flush=True)
    worse = [r for r in rows if r["fvu_ours"] > r["fvu_sparsify"]]
    print(f"  ours at or below sparsify's FVU at {len(rows) - len(worse)} of {len(rows)} shapes; median speed ratio "
          f"{statistics.median(r['speed_ratio'] for r in rows):.2f}x")
    write_results("e2e-grid", device.split(":")[0], {"device": torch_device_name(device), "budget": budget, "rows": rows})


def torch_device_name(device: str) -> str:
    if not device.startswith("cuda"):
        return cpu_name()
    import torch

    return torch.cuda.get_device_name(torch.device(device))


if __name__ == "__main__":
    main()
