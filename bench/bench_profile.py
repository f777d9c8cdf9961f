"""How long a profile's book takes on this machine: each stage's rate measured here, times the
work the profile gives it (no assertions on time).

The stages of ``make book PROFILE=NAME`` (cpu by default): the harvest (the profile's layers: mixed4a-4e,
and mixed3a and mixed3b for chapter 10's Distill rows), one SAE per layer, each layer's feature statistics
and dataset-example pass, the feature visualisations
of figure 1, the UMAP maps, the circuit analyses, and the book build. Each is run here on a small
share of its work (random weights and the ImageNet sample or generated images: speed does not
depend on what the weights are), and the profile's total is projected from the measured rates.
The table says which work each projection multiplies; the book build's time is taken from the
smoke book (pass ``--book-seconds``).

    python bench/bench_profile.py [--profile cpu] [--images 200] [--book-seconds 150]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import write_results  # noqa: E402
from helpers.run.profiles import PROFILES  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "imagenet-sample"
IMAGES = {"imagenette+imagewoof": 26_394, "imagenette": 3_925}  # images each download holds


def timed(fn, *args, **kw) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--images", type=int, default=200, help="images the harvest and example pass are timed on")
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--book-seconds", type=float, default=150.0, help="the jupyter-book build (from the smoke book)")
    a = p.parse_args()
    profile = PROFILES[a.profile]
    n_images = IMAGES.get(profile.harvest.images, profile.harvest.max_images or 0)
    from helpers.analysis.branches import analyse_branches  # noqa: F401  (imports counted out of the timings)
    from helpers.analysis.embed import umap_embedding
    from helpers.analysis.examples import example_passes
    from helpers.analysis.featviz import render_directions
    from helpers.data.harvest import harvest
    from helpers.data.images import generate_images, list_images
    from helpers.data.inception import LayerCapture, architecture_slices, layer_width, load_model
    from helpers.analysis.circuits import attribution
    from helpers.sae.model import TopKSAE, firing_stats
    from helpers.sae.adam import Adam
    from helpers.sae.train import _State, _step

    rows, total = [], 0.0

    def add(stage, seconds_each, units, unit_name, note=""):
        nonlocal total
        projected = seconds_each * units
        total += projected
        rows.append({"stage": stage, "measured": f"{seconds_each:.4g} s per {unit_name}", "work": f"{units:,} {unit_name}s",
                     "projected min": round(projected / 60, 1), "note": note})

    with tempfile.TemporaryDirectory() as tmp:
        if SAMPLE.is_dir():
            source = str(SAMPLE)
        else:
            generate_images(Path(tmp) / "images", a.images)
            source = str(Path(tmp) / "images")
        images = list_images(source).head(a.images)
        h = dataclasses.replace(profile.harvest, images=source, weights="random", max_images=a.images,
                                out=str(Path(tmp) / "harvest"), workers=min(4, os.cpu_count() or 1), device="cpu")
        s = timed(harvest, h)
        harvested = f"harvest, {', '.join(h.layers)}"
        add(harvested, s / a.images, n_images, "image")
        model = load_model("random")[0]
        widths = {layer: layer_width(architecture_slices(layer)) for layer in h.layers}
        cfg = profile.train
        saes = {}
        for layer, d in widths.items():
            sae = saes[layer] = TopKSAE(d, cfg.sae.expansion * d, cfg.sae.k, cfg.sae.tied, seed=0, kernels=cfg.kernels)
            state = _State(sae, Adam(sae.parameters(), 1e-4), torch.zeros(sae.d_sae, dtype=torch.long))
            x = torch.relu(torch.randn(cfg.batch_size, d))
            step_cfg = dataclasses.replace(cfg, vectors=None)
            _step(step_cfg, state, x)  # warm-up
            s = timed(lambda: [_step(step_cfg, state, x) for _ in range(a.train_steps)])
            add(f"training {layer} (d_sae {sae.d_sae}, aux_k {cfg.sae.aux_k})", s / a.train_steps / cfg.batch_size,
                cfg.vectors_seen, "vector")
            with torch.no_grad():
                s = timed(firing_stats, sae, [x, x])
            add(f"feature statistics {layer}", s / (2 * len(x)), min(500_000, n_images * h.per_image), "vector")
        n_ex = min(a.images, 64)
        s = timed(example_passes, model, saes, images.head(n_ex))
        add("dataset examples, mixed4a-4e", s / n_ex, n_images, "image", "one forward pass for all layers")
        fv = profile.featviz
        directions = torch.randn(fv.batch, 512)
        steps = 8
        s = timed(render_directions, model, "mixed4c", directions, dataclasses.replace(fv, steps=steps))
        n_features = 5 * (profile.figure1_per_layer + 4 * profile.figure1_per_branch)
        add("feature visualisation (figure 1)", s / steps / fv.batch, n_features * fv.steps, "feature-step",
            f"{n_features} features x {fv.steps} steps")
        decoder = np.random.default_rng(0).normal(size=(16 * 512, 512)).astype(np.float32)
        s = timed(umap_embedding, decoder)
        add("UMAP of 8,192 decoder vectors", s, 2 + 5, "map", "chapter 06 (2) and the atlas (5)")
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            acts = LayerCapture(model, ["mixed4b", "mixed4c"])(x)
        sb, sc = TopKSAE(512, 8192, 32), TopKSAE(512, 8192, 32)
        with torch.no_grad():
            sb.b_dec.copy_(acts["mixed4b"].mean(dim=(0, 2, 3)))
        s = timed(attribution, model, sb, sc, "mixed4b", acts["mixed4b"], sources=list(range(16)))
        add("circuit attribution", s / (16 * 2), profile.circuit_sources * profile.circuit_images * 4, "source-image",
            f"{profile.circuit_sources} sources x {profile.circuit_images} images x 4 layer pairs")
        with torch.no_grad():
            xs = torch.randn(8, 3, 224, 224)
            model(xs)
            s = timed(model, xs)
        add("spliced-in evaluation (chapter 03)", s / 8, profile.spliced_images * 5 * 7, "image-forward",
            f"{profile.spliced_images} images x 5 layers x 7 cases")
        by_stage = {r["stage"]: r["projected min"] for r in rows}
        harvest_min = by_stage[harvested]
        train_min = sum(v for k, v in by_stage.items() if k.startswith(("training", "feature statistics")))
        if profile.untrained_control:
            add("untrained control (chapters 04, 10): its harvest, SAEs, statistics", (harvest_min + train_min) * 60,
                1, "run", "the sum of those stages above")
        extra = len(profile.claim_seeds) - 1
        if extra:
            add("chapter 10: the other claim seeds of every layer", train_min * 60 * extra, 1, "run",
                f"{extra} more SAE per layer, with statistics")
        add("chapter 10: the edges rows' attribution", by_stage["circuit attribution"] * 60, 1, "run",
            "chapter 05's pass again")
        if not extra:  # else chapter 09's second seed of mixed4c is one of chapter 10's
            mixed4c = [v for k, v in by_stage.items() if k.startswith("training mixed4c")][0]
            add("second seed of mixed4c (chapter 09)", mixed4c * 60, 1, "training")
        add("book build (jupyter-book)", a.book_seconds, 1, "build", "measured on the smoke book")

    print(f"\nprofile {a.profile}: {profile.description}\nthis machine: {os.cpu_count()} CPU cores, no GPU; "
          f"rates measured on {a.images} images ({'ImageNet sample' if SAMPLE.is_dir() else 'generated'})\n")
    print(f"  {'stage':<44} {'measured':>26} {'work':>24} {'projected min':>14}")
    for r in rows:
        print(f"  {r['stage']:<44} {r['measured']:>26} {r['work']:>24} {r['projected min']:>14}")
    print(f"\n  projected total: {total / 3600:.1f} hours (with SAE_SAES=author, chapter 09 adds a harvest under the "
          f"author's input convention: {harvest_min:.0f} min more)")
    write_results("profile", a.profile, {"rows": rows, "total_hours": total / 3600, "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
