"""Seeing features, measured side by side (no assertions on time):

1. Feature visualisation: seconds per feature, a batch of features in one optimisation
   against one feature at a time, same steps and size; and ours against a plain batched
   ``render_vis`` (Lucent's own model, run whole) on the same objectives and seeds, in turns,
   with whether the two make the same images.
2. The dataset-example pass: seconds per 1000 images for one layer (all its features, every
   grid position), with the forward pass alone as the floor.
3. The spliced-in evaluation (chapter 03): images per second for one layer's whole table (the
   SAE spliced in for all channels and for each branch alone, and the zero and mean floors),
   with one clean forward pass of the network as the floor.

Random weights (speed only); images from ../shared/imagenet-sample.

    python bench/bench_seeing.py [--device cpu] [--steps 16] [--features 8] [--images 200]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import warnings
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TQDM_DISABLE", "1")

from common import write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from helpers.analysis.examples import example_pass  # noqa: E402
from helpers.analysis.featviz import FeatvizConfig, render_directions  # noqa: E402
from helpers.data.images import ImageDataset, collate, list_images  # noqa: E402
from helpers.data.inception import LayerCapture, architecture_slices, load_model, model_input_from_uint8  # noqa: E402
from helpers.analysis.spliced import spliced_evaluation  # noqa: E402
from helpers.data.inception import spliced_log_probs  # noqa: E402
from helpers.sae.model import TopKSAE  # noqa: E402


def lucent_model(model, device):
    """Lucent's InceptionV1 as Lucent builds it (its own RedirectedReLU and max pools) with ``model``'s weights."""
    from lucent.modelzoo.inceptionv1.InceptionV1 import InceptionV1

    lucent = InceptionV1(pretrained=False, redirected_ReLU=True)
    lucent.load_state_dict(model.state_dict())
    return lucent.eval().requires_grad_(False).to(device)


@contextlib.contextmanager
def torch_functional():
    """Lucent's InceptionV1 module calling torch's functions (``load_model`` gives it the fast local response norm)."""
    import importlib

    module = importlib.import_module("lucent.modelzoo.inceptionv1.InceptionV1")
    ours, module.F = module.F, torch.nn.functional
    try:
        yield
    finally:
        module.F = ours


def plain_render_vis(model, layer, directions, cfg):
    """The plain loop a reader would write: one batched ``render_vis`` on the same objectives, seeds and settings."""
    from lucent.optvis import objectives, param, render

    objective = sum(objectives.direction(layer, directions[i], batch=i) for i in range(len(directions)))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return render.render_vis(model, objective, lambda: param.image(cfg.size, batch=len(directions)),
                                 optimizer=lambda p: torch.optim.Adam(p, lr=cfg.lr), thresholds=(cfg.steps,),
                                 show_image=False, progress=False)[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layer", default="mixed4c")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--sample", default=str(ROOT.parent / "shared" / "imagenet-sample"))
    a = p.parse_args()
    dev = torch.device(a.device)
    results = {"device": a.device, "layer": a.layer}

    model = load_model("random", dev, redirected_relu=True)[0]
    directions = torch.rand(a.features, 512, device=dev)
    cfg = FeatvizConfig(steps=a.steps, size=a.size, batch=a.features)
    render_directions(model, a.layer, directions[:1], FeatvizConfig(steps=1, size=a.size))  # warm-up
    t = time.perf_counter()
    render_directions(model, a.layer, directions, cfg)
    batched = (time.perf_counter() - t) / a.features
    t = time.perf_counter()
    for i in range(a.features):
        render_directions(model, a.layer, directions[i:i + 1], cfg)
    single = (time.perf_counter() - t) / a.features
    # against a plain batched render_vis: Lucent's own model (its RedirectedReLU's backward by boolean indexing, torch's
    # max pool and local response norm) run whole on the same objectives, seeds and transforms; ours stops after the
    # layer, redirects with one `where`, and pools and normalises by helpers/data/layers.py and pools.py (the same gradients)
    lucent = lucent_model(model, dev)
    ours_s, plain_s, same = [], [], True
    for _ in range(2):
        t = time.perf_counter()
        ours_images = render_directions(model, a.layer, directions, cfg)
        ours_s.append((time.perf_counter() - t) / a.features)
        t = time.perf_counter()
        with torch_functional():
            plain_images = plain_render_vis(lucent, a.layer, directions, cfg)
        plain_s.append((time.perf_counter() - t) / a.features)
        same &= bool(np.array_equal(ours_images, plain_images))
    results["featviz"] = {"steps": a.steps, "size": a.size, "features": a.features,
                          "s_per_feature_batched": batched, "s_per_feature_one_at_a_time": single,
                          "s_per_feature_batched_per_512_steps": batched * 512 / a.steps,
                          "s_per_feature_ours_turns": ours_s, "s_per_feature_plain_render_vis_turns": plain_s,
                          "plain_over_ours": statistics.median(plain_s) / statistics.median(ours_s),
                          "same_images_as_plain_render_vis": same}

    images = list_images(a.sample).head(a.images)
    plain = load_model("random", dev)[0]
    sae = TopKSAE(512, 16 * 512, 32, "full", seed=0).to(dev)
    t = time.perf_counter()
    example_pass(plain, sae, a.layer, images, batch_size=32, device=dev, workers=min(4, os.cpu_count() or 1))
    seconds = time.perf_counter() - t
    loader = torch.utils.data.DataLoader(ImageDataset(images), batch_size=32, collate_fn=collate,
                                         num_workers=min(4, os.cpu_count() or 1))
    t = time.perf_counter()
    with torch.no_grad():
        for _, pixels, _ in loader:
            LayerCapture(plain, [a.layer])(model_input_from_uint8(pixels.to(dev)))
    floor = time.perf_counter() - t
    results["examples"] = {"images": len(images), "latents": sae.d_sae, "s_per_1000_images": seconds * 1000 / len(images),
                           "forward_only_s_per_1000_images": floor * 1000 / len(images)}

    batches = [model_input_from_uint8(pixels.to(dev)) for _, pixels, _ in loader]
    slices = architecture_slices(a.layer)

    def timed(fn) -> float:
        spliced_evaluation(plain, a.layer, sae, batches[0][:2], slices)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for x in batches:
            fn(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    table = timed(lambda x: spliced_evaluation(plain, a.layer, sae, x, slices))
    clean = timed(lambda x: spliced_log_probs(plain, a.layer, x))
    results["spliced"] = {"images": len(images), "batch": 32, "cases": 3 + len(slices),
                          "images_per_s": len(images) / table, "clean_forward_images_per_s": len(images) / clean}

    f, e, s = results["featviz"], results["examples"], results["spliced"]
    print(f"device {a.device}; layer {a.layer}; random weights (speed only)\n")
    print(f"feature visualisation, {a.steps} steps at {a.size} px, {a.features} features")
    print(f"  batched (one optimisation)   {f['s_per_feature_batched']:8.2f} s per feature")
    print(f"  one feature at a time        {f['s_per_feature_one_at_a_time']:8.2f} s per feature"
          f"   ({f['s_per_feature_one_at_a_time'] / f['s_per_feature_batched']:.2f}x the batched time)")
    print(f"  batched, scaled to 512 steps {f['s_per_feature_batched_per_512_steps']:8.1f} s per feature")
    print(f"  plain batched render_vis     {statistics.median(f['s_per_feature_plain_render_vis_turns']):8.2f} s per "
          f"feature (Lucent's model run whole; ours {f['plain_over_ours']:.2f}x faster in turns; the same images: "
          f"{f['same_images_as_plain_render_vis']})\n")
    print(f"dataset-example pass, {e['latents']} latents, {e['images']} images")
    print(f"  example pass                 {e['s_per_1000_images']:8.1f} s per 1000 images")
    print(f"  forward pass alone (floor)   {e['forward_only_s_per_1000_images']:8.1f} s per 1000 images")
    print(f"\nspliced-in evaluation of {a.layer}, {s['images']} images in batches of {s['batch']} "
          f"({s['cases']} cases spliced in, each a forward pass)")
    print(f"  the whole table              {s['images_per_s']:8.1f} images/s")
    print(f"  one clean forward (floor)    {s['clean_forward_images_per_s']:8.1f} images/s"
          f"   ({s['clean_forward_images_per_s'] / s['images_per_s']:.1f}x the table's rate)")
    write_results("seeing", a.device, results)


if __name__ == "__main__":
    main()
