"""Core benchmarks, measured side by side in one run (no assertions on time).

1. Harvest throughput (images/s) for all five mixed4 layers: one forward pass per batch
   for every layer (ours) vs one pass per layer (the paper's released code), and ours with
   JPEGs decoded on the device (``--decode device``) instead of in the workers.
2. SAE training throughput (vectors/s) at d=512, n=8192, k=32, batch 4096: our sparse
   decoder and sparse backward (tied full and tied init) vs a dense-decoder TopK SAE, with
   the encoder matmul alone as the floor.

Each case runs in its own subprocess so that its peak resident memory (ru_maxrss) is its
own. Results print as tables and are written to bench/results/core-<device>.json.

    python bench/bench_core.py [--images ../shared/imagenet-sample] [--n-images 96]
                               [--device cpu] [--steps 5] [--sweep] [--memory]

3. ``--memory``: the memory statements, ``memory.memory_estimate`` (by batch, width and
   latents) and ``harvest.memory_estimate`` (by batch), against what a run takes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TQDM_DISABLE", "1")

from common import median_run, peak_mib, write_results  # noqa: E402


# ----------------------------------------------------------------------------- cases ---
def case_harvest(mode: str, images: str, n_images: int, device: str, batch: int) -> dict:
    from helpers.data.harvest import HarvestConfig, harvest
    from helpers.data.inception import PAPER_LAYERS

    groups = [PAPER_LAYERS] if mode.startswith("one-pass") else [(layer,) for layer in PAPER_LAYERS]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for i, layers in enumerate(groups):
            harvest(HarvestConfig(images=images, out=f"{tmp}/{i}", layers=",".join(layers), weights="random",
                                  max_images=n_images, batch_size=batch, device=device,
                                  workers=min(4, os.cpu_count() or 1),
                                  decode="device" if mode.endswith("decode-device") else "workers"))
        seconds = time.perf_counter() - t
    return {"images_per_s": n_images / seconds, "seconds": seconds, "peak_mib": peak_mib()}


def case_train(mode: str, device: str, steps: int, d: int = 512, n: int = 8192, k: int = 32,
               batch: int = 4096) -> dict:
    """``mode``: encoder-matmul, sparse-tied-full, ...; ``n`` latents (the sweep varies it)."""
    import torch

    from helpers.sae.model import TopKSAE
    from helpers.sae.train import Adam

    dev = torch.device(device)
    torch.manual_seed(0)
    data = torch.relu(torch.randn(batch, d, device=dev))
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if mode == "encoder-matmul":
        w = torch.randn(n, d, device=dev)
        b = torch.zeros(n, device=dev)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                torch.addmm(b, data, w.T)
    else:
        tied = "init" if mode.endswith("tied-init") else "full"
        sae = TopKSAE(d, n, k, tied, seed=0).to(dev)
        opt = Adam(sae.parameters(), 4e-4)

        def step():
            train_step(sae, opt, data, dense=mode.startswith("dense"))

    step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - t
    out = {"vectors_per_s": steps * batch / seconds, "seconds": seconds, "peak_mib": peak_mib()}
    if cuda:
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def train_step(sae, opt, x, dense: bool = False) -> None:
    """One training step as ``train.train`` takes it (bf16 autocast on CUDA); ``dense``: the
    decoder as a dense [batch, d_sae] product instead of our sparse one."""
    import torch

    from helpers.sae.loss import normalized_mse

    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
        if dense:
            pre = sae.preacts(x)
            top = pre.topk(sae.k, dim=-1, sorted=False)
            z = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
            x_hat = z @ sae.W_dec + sae.b_dec
        else:
            x_hat = sae.forward_train(x).x_hat
    loss = normalized_mse(x_hat.float(), x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_radial_grad()
    opt.step()
    sae.normalize_decoder()


def memory_mark(cuda: bool) -> float:
    """Bytes in use now (CUDA, with the peak counter reset) or the peak RSS so far (CPU)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return peak_mib() * 2**20


def memory_used(cuda: bool, mark: float) -> float:
    """Peak bytes since ``memory_mark``."""
    import torch

    return (torch.cuda.max_memory_allocated() if cuda else peak_mib() * 2**20) - mark


def case_memory_train(tied: str, device: str, batch: int, n: int, d: int = 512, k: int = 32) -> dict:
    """Memory two training steps take beyond the data, against ``memory.memory_estimate``."""
    import torch

    from helpers.sae.model import ENCODE_CHUNK, TopKSAE
    from helpers.sae.adam import Adam
    from helpers.sae.memory import memory_estimate

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    data = torch.relu(torch.randn(batch, d, device=dev))

    def steps(sae, x, times):
        opt = Adam(sae.parameters(), 4e-4)
        for _ in range(times):
            train_step(sae, opt, x)

    steps(TopKSAE(d, 2 * k, k, tied).to(dev), data[:8], 1)  # libraries' one-time buffers and code, not ours
    base = memory_mark(cuda)
    steps(TopKSAE(d, n, k, tied, seed=0).to(dev), data, 2)
    used = memory_used(cuda, base)
    estimate = memory_estimate(d, n, k, batch, tied, cuda=cuda, encode_chunk=ENCODE_CHUNK)
    return {"measured_mib": used / 2**20, "estimate_mib": sum(estimate.values()) / 2**20,
            "parts_mib": {key: v / 2**20 for key, v in estimate.items()}}


def case_memory_harvest(images: str, device: str, batch: int) -> dict:
    """Memory of a one-pass harvest (main process, no workers) against ``harvest.memory_estimate``."""
    import torch

    from helpers.data.harvest import HarvestConfig, harvest, memory_estimate
    from helpers.data.inception import PAPER_LAYERS, load_model

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    model = load_model("random", dev)[0]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224, device=dev))  # libraries' one-time buffers and code, not ours
    base = memory_mark(cuda)
    with tempfile.TemporaryDirectory() as tmp:
        harvest(HarvestConfig(images=images, out=tmp + "/h", layers=",".join(PAPER_LAYERS), max_images=2 * batch,
                              batch_size=batch, device=device, workers=0), model=model)
    used = memory_used(cuda, base)
    estimate = memory_estimate(model, PAPER_LAYERS, batch, amp=cuda)
    estimate.pop("weights")  # already resident at the baseline
    return {"measured_mib": used / 2**20, "estimate_mib": sum(estimate.values()) / 2**20,
            "parts_mib": {key: v / 2**20 for key, v in estimate.items()}}


def memory(a, common, results) -> None:
    """The memory statements (memory.memory_estimate, harvest.memory_estimate) against measurement."""
    rows = results["memory"] = {}
    for tied, batch, n in [("full", 1024, 8192), ("full", 4096, 8192), ("full", 4096, 32768), ("init", 4096, 32768)]:
        rows[f"train tied-{tied} batch {batch} n {n}"] = run_case(
            ["memory-train", tied] + common + ["--mem-batch", str(batch), "--latents", str(n)])
    if Path(a.images).exists():
        for batch in (8, 32):
            rows[f"harvest batch {batch}"] = run_case(["memory-harvest", "one-pass"] + common + ["--mem-batch", str(batch)])
    where = "GPU max_memory_allocated" if a.device.startswith("cuda") else "peak RSS growth"
    print(f"\nmemory: estimate vs measured ({where}); 'check' flags a ratio outside 0.67-1.5")
    print("  case                                 estimate MiB   measured MiB   measured/estimate")
    for name, r in rows.items():
        ratio = r["measured_mib"] / r["estimate_mib"]
        r["ratio"], r["check"] = ratio, "ok" if 0.67 <= ratio <= 1.5 else "CHECK"
        print(f"  {name:<36} {r['estimate_mib']:12.0f}   {r['measured_mib']:12.0f}   {ratio:8.2f}  {r['check']}")


# ----------------------------------------------------------------------------- driver ---
def run_case(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--case", *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"case {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "imagenet-sample"))
    p.add_argument("--n-images", type=int, default=96)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--latents", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=3, help="training cases take turns this many times; medians shown")
    p.add_argument("--sweep", action="store_true", help="also: training at n = 2k/8k/32k, harvest at 250/500/1000 images")
    p.add_argument("--memory", action="store_true", help="also: the memory estimates against measurement")
    p.add_argument("--mem-batch", type=int, default=4096)
    p.add_argument("--case", nargs="*")
    a = p.parse_args()
    if a.case is not None:
        kind, mode = a.case[0], a.case[1]
        if kind == "memory-train":
            result = case_memory_train(mode, a.device, a.mem_batch, a.latents)
        elif kind == "memory-harvest":
            result = case_memory_harvest(a.images, a.device, a.mem_batch)
        elif kind == "harvest":
            result = case_harvest(mode, a.images, a.n_images, a.device, a.batch)
        else:
            result = case_train(mode, a.device, a.steps, n=a.latents)
        print(json.dumps(result))
        return

    common = ["--device", a.device, "--images", a.images, "--n-images", str(a.n_images), "--batch", str(a.batch),
              "--steps", str(a.steps)]
    results = {"device": a.device, "torch_threads": os.cpu_count(), "harvest": {}, "train": {}}
    if Path(a.images).exists():
        for mode in ("one-pass", "pass-per-layer", "one-pass-decode-device"):
            results["harvest"][mode] = run_case(["harvest", mode] + common)
    else:
        print(f"(no images at {a.images}: harvest benchmark skipped)")
    modes = ("encoder-matmul", "sparse-tied-full", "sparse-tied-init", "dense-tied-full", "dense-tied-init")
    runs = {mode: [] for mode in modes}
    for _ in range(a.rounds):  # the cases take turns, so a slow moment of the machine is shared
        for mode in modes:
            runs[mode].append(run_case(["train", mode] + common))
    results["train"] = {mode: median_run(rs) for mode, rs in runs.items()}

    print(f"\ndevice: {a.device}; random weights (speed only); {a.n_images} images, batch {a.batch}")
    if results["harvest"]:
        base = results["harvest"]["pass-per-layer"]["images_per_s"]
        print("\nharvest, mixed4a-4e          images/s   vs per-layer   peak RSS MiB")
        for mode, r in results["harvest"].items():
            print(f"  {mode:<26} {r['images_per_s']:9.1f}   {r['images_per_s'] / base:8.2f}x   {r['peak_mib']:10.0f}")
    floor = results["train"]["encoder-matmul"]["vectors_per_s"]
    print(f"\nSAE training d=512 n=8192 k=32 batch=4096 (medians of {a.rounds} rounds)")
    print("  case                        vectors/s  vs dense   of floor   peak RSS MiB")
    for mode, r in results["train"].items():
        dense = results["train"].get("dense-" + mode.split("-", 1)[1], r) if mode.startswith("sparse") else r
        gpu = f"   GPU {r['gpu_peak_mib']:.0f}" if "gpu_peak_mib" in r else ""
        print(f"  {mode:<26} {r['vectors_per_s']:10.0f}   {r['vectors_per_s'] / dense['vectors_per_s']:6.2f}x"
              f"   {r['vectors_per_s'] / floor:7.2f}   {r['peak_mib']:10.0f}{gpu}")
    if a.sweep:
        sweep(a, common, results)
    if a.memory:
        memory(a, common, results)
    write_results("core", a.device, results)


def sweep(a, common, results) -> None:
    """How cost grows: training throughput with the number of latents, harvest with the images."""
    results["sweep_latents"] = {n: run_case(["train", "sparse-tied-full"] + common + ["--latents", str(n)])
                                for n in (2048, 8192, 32768)}
    print("\nsparse tied-full training, vectors/s by number of latents (d=512, k=32, batch 4096)")
    for n, r in results["sweep_latents"].items():
        print(f"  n = {n:>6}   {r['vectors_per_s']:10.0f}   peak RSS {r['peak_mib']:.0f} MiB")
    if Path(a.images).exists():
        base = [x for x in common if x]
        i = base.index("--n-images")
        results["sweep_images"] = {}
        for n in (250, 500, 1000):
            base[i + 1] = str(n)
            results["sweep_images"][n] = run_case(["harvest", "one-pass"] + base)
        print("\nharvest, all five layers in one pass, by number of images")
        for n, r in results["sweep_images"].items():
            print(f"  {n:>5} images   {r['images_per_s']:7.1f} images/s   {r['seconds']:7.1f} s")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
