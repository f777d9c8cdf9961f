"""Our CUDA paths against independent references, on a GPU (no assertions on time).

Each check computes the same function a second way (float64 on the CPU, the dense equation,
PIL, the float32 CPU harvest) and prints the relative error ||got - ref|| / ||ref|| with a
pass/fail bound set by the precision involved (METHOD.md in the tool library: float32 far
under 1e-3, bf16 operands 1e-3 to 1e-2):

1. The Triton sparse decoder, forward and both gradients, on the SAE's real shape
   (4096 x 32 of 8192 x 512), against float64 ``embedding_bag`` (the weight gradient is a
   TF32 product on CUDA, ``kernels.scatter_rows``: bound 2e-3); non-finite output fails.
2. ``TopKSAE.forward_train`` under the trainer's bf16 autocast against the dense equation
   (``loss.topk_sae``) in float64: the kept latents (bf16 may swap near-ties at the k-th
   place) and the reconstruction from them; in float32 the whole output, and the gradients
   against autograd through the equation.
3. Training on the GPU (device store) against training on the CPU: same planted data and
   settings; both must reach the same held-out FVU (within 0.02) and far below 1.
4. nvJPEG (``--decode device``) against PIL decoding of the same JPEGs: mean absolute
   difference in 0..255 levels.
5. The harvest on CUDA (bf16 autocast, channels-last, nvJPEG) against the harvest on the CPU
   (float32, PIL): the same images, the same random weights; positions in common and the
   relative error of their vectors.

    python bench/check_cuda.py --images DIR [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RESULTS: dict[str, dict] = {}


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("nan")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def report(name: str, value: float, bound: float, **extra) -> None:
    ok = value == value and value <= bound  # NaN fails
    RESULTS[name] = {"value": value, "bound": bound, "ok": ok, **extra}
    print(f"{'PASS' if ok else 'FAIL'}  {name:<52} {value:.3g} (bound {bound:g}) {extra or ''}", flush=True)


def check_triton(dev) -> None:
    from helpers.sae import kernels

    if not dev.startswith("cuda"):
        print("(Triton check skipped: no CUDA device)")
        return

    g = torch.Generator().manual_seed(1)
    w = torch.randn(8192, 512, generator=g)
    v = torch.rand(4096, 32, generator=g)
    i = torch.randint(0, 8192, (4096, 32), generator=g)
    grad = torch.randn(4096, 512, generator=g)
    wd, vd = w.double().requires_grad_(True), v.double().requires_grad_(True)
    ref = F.embedding_bag(i, wd, per_sample_weights=vd, mode="sum")
    ref_v, ref_w = torch.autograd.grad(ref, (vd, wd), grad.double())
    print(f"triton enabled on {dev}: {kernels.triton_enabled(w.to(dev))}; passes its first-use check: "
          f"{kernels._checked(torch.device(dev))}", flush=True)
    wg, vg = w.to(dev).requires_grad_(True), v.to(dev).requires_grad_(True)
    out = kernels._TritonDecode.apply(i.to(dev), vg, wg)
    got_v, got_w = torch.autograd.grad(out, (vg, wg), grad.to(dev))
    if out.is_cuda:
        torch.cuda.synchronize()
    report("triton decode forward (fp32)", rel(out, ref), 1e-5)
    report("triton decode grad values (fp32)", rel(got_v, ref_v), 1e-5)
    report("triton decode grad weight (TF32 product on CUDA)", rel(got_w, ref_w), 2e-3)
    # duplicate indices in a row, and k not a power of two
    i2 = torch.randint(0, 7, (64, 24), generator=g)
    v2, w2 = torch.rand(64, 24, generator=g), torch.randn(7, 300, generator=g)
    out2 = kernels._TritonDecode.apply(i2.to(dev), v2.to(dev), w2.to(dev))
    report("triton decode, repeated indices, k=24, d=300", rel(out2, F.embedding_bag(
        i2, w2.double(), per_sample_weights=v2.double(), mode="sum")), 1e-5)
    # the trainer first uses the decoder inside bf16 autocast: the first-use check must still pass there
    kernels._CHECKS.clear()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        kernels.sparse_decode(i.to(dev), v.to(dev), w.to(dev))
    report("triton off after first use in bf16 autocast (0: on)", float(not all(kernels._CHECKS.values())), 0)


def check_sae(dev) -> None:
    from helpers.sae.loss import normalized_mse, topk_sae
    from helpers.sae.model import TopKSAE

    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(2048, 512, generator=g)) * 2
    for tied in ("full", "init"):
        sae = TopKSAE(512, 8192, 32, tied, seed=3)
        with torch.no_grad():
            sae.b_dec.copy_(x.mean(0))
            sae.b_enc.normal_(0, 0.01, generator=g)
        ref_sae = copy.deepcopy(sae).double()
        ref, _ = topk_sae(x.double(), ref_sae.W_enc.detach(), ref_sae.b_enc.detach(), ref_sae.W_dec.detach(),
                          ref_sae.b_dec.detach(), 32)
        sae = sae.float().to(dev)
        xd = x.to(dev)
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
            out = sae.forward_train(xd)
        # bf16 pre-activations may swap near-tied latents at the k-th place (as every bf16 TopK
        # trainer does): the kept sets are compared, and the reconstruction against the float64
        # equation evaluated on the latents bf16 kept
        ref_idx = ref_sae.preacts(x.double()).topk(32, dim=1).indices
        kept = out.code.indices.cpu()
        overlap = (kept[:, :, None] == ref_idx[:, None, :]).any(-1).double().mean()
        report(f"bf16 autocast: share of kept latents equal to fp64's (tied {tied})", 1 - float(overlap), 0.05)
        pre64 = ref_sae.preacts(x.double()).gather(1, kept)
        ref_kept = F.embedding_bag(kept, ref_sae.W_dec.detach(), per_sample_weights=torch.relu(pre64),
                                   mode="sum") + ref_sae.b_dec.detach()
        report(f"forward_train bf16 autocast vs equation fp64 on its kept latents (tied {tied})",
               rel(out.x_hat.float(), ref_kept), 1e-2)
        got32 = sae.forward_train(xd).x_hat
        report(f"forward_train fp32 vs equation fp64 (tied {tied})", rel(got32, ref), 1e-3)
        # gradients: ours (sparse backward) against autograd through the dense equation, both fp32 on the GPU
        params = list(sae.parameters())
        loss = normalized_mse(sae.forward_train(xd).x_hat, xd)
        ours = torch.autograd.grad(loss, params)
        sae_ref = TopKSAE(512, 8192, 32, tied, seed=3).to(dev)
        sae_ref.load_state_dict(sae.state_dict())
        dense, _ = topk_sae(xd, sae_ref.W_enc, sae_ref.b_enc, sae_ref.W_dec, sae_ref.b_dec, 32)
        theirs = torch.autograd.grad(normalized_mse(dense, xd), list(sae_ref.parameters()))
        for (name, _), a, b in zip(sae.named_parameters(), ours, theirs):
            report(f"gradient {name} vs dense autograd (tied {tied})", rel(a, b), 2e-3)  # TF32 on CUDA


def check_training(dev, tmp: Path) -> None:
    from helpers.config import SaeConfig, TrainConfig
    from helpers.sae.train import train

    g = torch.Generator().manual_seed(4)
    atoms = F.normalize(torch.randn(1024, 128, generator=g), dim=1)
    idx = torch.randint(0, 1024, (60_000, 8), generator=g)
    x = F.embedding_bag(idx, atoms, per_sample_weights=torch.rand(60_000, 8, generator=g) * 3, mode="sum")
    np.save(tmp / "planted.npy", x.numpy().astype(np.float32))
    fvus = {}
    for device, store in (("cpu", "disk"), (dev, "device")):
        out = train(TrainConfig(vectors=str(tmp / "planted.npy"), out=str(tmp / f"sae-{device}-{store}"),
                                sae=SaeConfig(expansion=8, k=8),
                                batch_size=1024, vectors_seen=400_000, holdout=4096, lr=1e-3, device=device,
                                store=store, seed=0))
        fvus[device] = json.loads((Path(out) / "train.json").read_text())["final_fvu"]
    print(f"planted training, held-out FVU: {fvus}", flush=True)
    report("training: |FVU cuda - FVU cpu|", abs(fvus[dev] - fvus["cpu"]), 0.02, fvu=fvus)
    report("training: FVU on cuda (from 1 at the start)", fvus[dev], 0.5)


def check_nvjpeg(dev, images: Path) -> None:
    from helpers.data.images import decode_on_device, list_images, load_image

    files = [p for p in list_images(images).paths if str(p).lower().endswith((".jpeg", ".jpg"))][:128]
    items = [torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8) for f in files]
    keep, pixels, errors = decode_on_device(items, torch.device(dev))
    ref = torch.stack([torch.from_numpy(load_image(files[j])).permute(2, 0, 1) for j in keep])
    diff = (pixels.cpu().float() - ref.float()).abs()
    report("nvJPEG vs PIL, mean |difference| in levels", float(diff.mean()), 3.0,
           images=len(files), decoded=len(keep), errors=len(errors), p99=float(np.percentile(diff.numpy(), 99)))


def check_harvest(dev, images: Path, tmp: Path) -> None:
    from helpers.config import HarvestConfig
    from helpers.data.harvest import harvest
    from helpers.data.store import ActivationStore

    runs = {}
    for device, decode in (("cpu", "workers"), (dev, "device")):
        runs[device] = harvest(HarvestConfig(images=str(images), out=str(tmp / f"h-{device}-{decode}"), weights="random",
                                             max_images=64, batch_size=32, device=device, workers=2, decode=decode))
    for layer in ("mixed4a", "mixed4c", "mixed4e"):
        a, b = ActivationStore(runs["cpu"], layer), ActivationStore(runs[dev], layer)
        pa, pb = a.load_provenance(), b.load_provenance()
        where = lambda p: [tuple(r) for r in np.stack([p["image"], p["y"], p["x"]], 1).tolist()]  # not the norm
        key_a = {r: n for n, r in enumerate(where(pa))}
        common = [(key_a[r], n) for n, r in enumerate(where(pb)) if r in key_a]
        va, vb = a.load(), b.load()
        ia, ib = (torch.tensor(c) for c in zip(*common))
        report(f"harvest {layer}: cuda bf16 vs cpu fp32 vectors", rel(torch.from_numpy(vb)[ib].float(),
                                                                      torch.from_numpy(va)[ia].float()), 3e-2,
               positions_in_common=f"{len(common)}/{len(pa)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", help="cpu only to try the script itself (with TRITON_INTERPRET=1)")
    a = p.parse_args()
    dev = a.device
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if dev.startswith('cuda') else dev}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for check in (lambda: check_triton(dev), lambda: check_sae(dev), lambda: check_training(dev, Path(tmp)),
                      lambda: check_nvjpeg(dev, Path(a.images)), lambda: check_harvest(dev, Path(a.images), Path(tmp))):
            try:
                check()
            except Exception as e:  # one broken path must not hide the others
                import traceback
                traceback.print_exc()
                RESULTS[f"error {len(RESULTS)}"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    failed = [k for k, r in RESULTS.items() if not r["ok"]]
    print(f"\n{len(RESULTS) - len(failed)} of {len(RESULTS)} checks pass" + (f"; failed: {failed}" if failed else ""))
    if a.out:
        Path(a.out).write_text(json.dumps(RESULTS, indent=1, default=str))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
