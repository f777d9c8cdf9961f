"""How long a profile's book takes on this machine: each stage's rate measured here, times the
work the profile gives it (no assertions on time).

The stages of ``make book PROFILE=NAME`` (cpu by default): the harvest (the profile's layers: mixed4a-4e,
and mixed3a and mixed3b for chapter 10's Distill rows), one SAE per layer, each layer's feature statistics
and dataset-example pass, the feature visualisations
of figure 1, the UMAP maps, the circuit analyses, and the book build. Each is run here on a small
share of its work (random weights and the ImageNet sample, its images resized as the profile's download has
them, or generated images: speed does not depend on what the weights are), and the profile's total is projected from the measured rates.
The table says which work each projection multiplies; the book build's time is taken from the
smoke book (pass ``--book-seconds``). Each stage belongs to the first chapter that makes it, so the record
also gives each chapter's cost after the chapters before it and opened alone (``NEEDS``: what it makes first);
``python -m helpers export`` writes those into each chapter's top from the ``colab`` and ``cpu`` records.

    python bench/bench_profile.py [--profile cpu] [--images 200] [--book-seconds 150] [--repeats 3]

The harvest, the dataset-example pass and the feature visualisations are each timed as the difference of a
small and a larger run (their own set-up cost taken out), ``--repeats`` times in turns, and their median kept:
on a shared 2-core machine one such difference moved by 15-40% between runs of the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import cpu_name, write_results  # noqa: E402
from helpers.run.profiles import PROFILES  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "imagenet-sample"
IMAGES = {"imagenette+imagewoof": 26_394, "imagenette": 3_925, "imagenet-sample": 1_000}  # images each source holds
# what a chapter opened alone also computes: the chapters whose stages it needs first (a run's artifacts are reused)
NEEDS = {"02": (), "03": ("02",), "04": ("02", "03"), "05": ("02", "03", "04"), "06": ("02", "03", "04"),
         "07": ("02", "03", "04"), "08": ("02", "03", "04"), "09": ("02", "03"), "10": ("02", "03", "04", "05", "09")}
# the share of dead latents (AuxK's) the training steps are timed with: training the untrained network's mixed4c on the
# ImageNet sample (d_sae 8192, aux_k 256) had 1.8% dead after 41k vectors, 0.5% at 450k, 0.04% at 1M
DEAD_SHARE = 0.01
AUTHOR_SAE_MB = 4 * sum((16 * d) * d for d in (508, 512, 512, 528, 832))  / 2**20  # tied [16 d, d] float32, mixed4a-4e


# the short side of a download's JPEGs (fastai's imagenette2-320 and imagewoof2-320): decoding a JPEG costs about
# its pixels, and the ImageNet sample's images are larger (full size, about 500 x 375: 2.8 against 1.9 ms an image)
SHORT_SIDE = {"imagenette+imagewoof": 320, "imagenette": 320}


def as_downloaded(images, side: int, folder: Path) -> Path:
    """The sample's images as the profile's download has them: resized to ``side`` px on the short side (PIL's
    bicubic), saved as JPEG at PIL's default quality; untimed."""
    from PIL import Image

    folder.mkdir(parents=True)
    for p in images.paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            scale = side / min(im.size)
            im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC).save(folder / f"{p.stem}.jpg")
    return folder


def timed(fn, *args, **kw) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def median_difference(small, large, repeats: int) -> float:
    """The median over ``repeats`` of ``large()``'s time minus ``small()``'s (each call gets its repeat's index)."""
    return statistics.median(timed(large, i) - timed(small, i) for i in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--images", type=int, default=200, help="images the harvest and example pass are timed on")
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--book-seconds", type=float, default=150.0, help="the jupyter-book build (from the smoke book)")
    p.add_argument("--repeats", type=int, default=3, help="differences timed per stage timed as one (the median kept)")
    a = p.parse_args()
    profile = PROFILES[a.profile]
    n_images = IMAGES.get(profile.harvest.images, profile.harvest.max_images or 0)
    from helpers.analysis.branches import analyse_branches  # noqa: F401  (imports counted out of the timings)
    from helpers.analysis.embed import umap_embedding
    from helpers.analysis.examples import example_passes
    from helpers.analysis.featviz import render_directions
    from helpers.data.harvest import harvest
    from helpers.data.kept import KeptInputs
    from helpers.data.store import read_manifest
    from helpers.data.images import generate_images, list_images
    from helpers.data.inception import LayerCapture, architecture_slices, layer_width, load_model
    from helpers.analysis.circuits import attribution
    from helpers.allocator import reuse_freed_memory
    from helpers.sae.model import TopKSAE, firing_stats
    from helpers.data.suffix import forward_from
    from helpers.sae.adam import Adam
    from helpers.sae.train import _State, _step

    rows, total = [], 0.0

    def add(stage, seconds_each, units, unit_name, note="", chapter=None, needed_by=None):
        nonlocal total
        projected = seconds_each * units
        total += projected
        rows.append({"stage": stage, "measured": f"{seconds_each:.4g} s per {unit_name}", "work": f"{units:,} {unit_name}s",
                     "projected min": round(projected / 60, 1), "note": note, "chapter": chapter,
                     "needed by": needed_by})  # None: every chapter that NEEDS its chapter; else only these

    author = profile.name == "colab"  # the colab profile shows the author's SAEs: none trained before chapter 09

    with tempfile.TemporaryDirectory() as tmp:
        if SAMPLE.is_dir() and profile.harvest.images in SHORT_SIDE:
            source = str(as_downloaded(list_images(str(SAMPLE)).head(a.images), SHORT_SIDE[profile.harvest.images],
                                       Path(tmp) / "images"))
        elif SAMPLE.is_dir():
            source = str(SAMPLE)
        else:
            generate_images(Path(tmp) / "images", a.images)
            source = str(Path(tmp) / "images")
        images = list_images(source).head(a.images)
        h = dataclasses.replace(profile.harvest, images=source, weights="random", max_images=a.images,
                                out=str(Path(tmp) / "harvest"), workers=min(4, os.cpu_count() or 1), device="cpu")
        # a harvest's own cost (the model, its workers, the manifest: about a second) is paid once per 26,394 images,
        # not once per 200: the rate is the difference of a quarter's harvest and the whole one's
        few = a.images // 4

        def harvest_rate(cfg):  # seconds per image
            return median_difference(lambda i: harvest(dataclasses.replace(cfg, max_images=few, out=f"{cfg.out}-few-{i}")),
                                     lambda i: harvest(dataclasses.replace(cfg, out=f"{cfg.out}-{i}")),
                                     a.repeats) / (a.images - few)

        per_image = harvest_rate(h)
        harvested = f"harvest, {', '.join(h.layers)}"
        add(harvested + (" (the author's convention)" if author else ""), per_image, n_images, "image",
            f"keeps {h.keep_input_of}'s input for the example pass" if h.keep_input_of else "", chapter="02")
        # the untrained control's harvest keeps none (it runs no example pass)
        plain_per_image = harvest_rate(dataclasses.replace(h, keep_input_of=None, out=f"{h.out}-plain")) \
            if h.keep_input_of and profile.untrained_control else per_image
        model = load_model("random")[0]
        widths = {layer: layer_width(architecture_slices(layer)) for layer in h.layers}
        cfg = profile.train
        saes, train_s, stats_s = {}, {}, {}
        n_vectors = min(500_000, n_images * h.per_image)
        for layer, d in widths.items():
            sae = saes[layer] = TopKSAE(d, cfg.sae.expansion * d, cfg.sae.k, cfg.sae.tied, seed=0, kernels=cfg.kernels)
            state = _State(sae, Adam(sae.parameters(), 1e-4), torch.zeros(sae.d_sae, dtype=torch.long))
            xs = [torch.relu(torch.randn(cfg.batch_size, d)) for _ in range(4)]
            step_cfg = dataclasses.replace(cfg, vectors=None)

            def steps(n):  # a training's usual state: DEAD_SHARE of the latents dead (AuxK), new batches
                for i in range(n):
                    state.seen = cfg.dead_after
                    state.since_fired.zero_()[: round(DEAD_SHARE * sae.d_sae)] = cfg.dead_after
                    _step(step_cfg, state, xs[i % len(xs)])

            with reuse_freed_memory():  # as a training runs (helpers.sae.train._train)
                steps(2)  # warm-up (the first steps' allocations grow the heap the later ones reuse)
                s = timed(steps, a.train_steps)
            train_s[layer] = s / a.train_steps / cfg.batch_size * cfg.vectors_seen
            with torch.no_grad():
                s = timed(firing_stats, sae, xs[:2])
            stats_s[layer] = s / (2 * len(xs[0])) * n_vectors
            distill = layer not in profile.layers  # mixed3a and mixed3b: chapter 10's rows only
            if not author:
                add(f"training {layer} (d_sae {sae.d_sae}, aux_k {cfg.sae.aux_k})", train_s[layer] / cfg.vectors_seen,
                    cfg.vectors_seen, "vector", chapter="10" if distill else "03")
            add(f"feature statistics {layer}", stats_s[layer] / n_vectors, n_vectors, "vector",
                chapter="10" if distill else "04")
        if author:
            add(f"download the author's SAEs (about {AUTHOR_SAE_MB:.0f} MB)", 0.0, 5, "file",
                "not timed here (no internet): seconds on Colab", chapter="03")
        n_ex, few = min(a.images, 64), min(a.images, 64) // 4  # the pass's own cost (hashing the SAEs...) taken out
        paper_saes = {layer: saes[layer] for layer in profile.layers}
        kept = {}  # as chapter 04 runs it: from the layer input its harvest kept, where the profile keeps one
        if h.keep_input_of:
            for n in (few, n_ex):
                out = harvest(dataclasses.replace(h, max_images=n, out=f"{h.out}-examples-{n}"))
                kept[n] = KeptInputs.find(out, read_manifest(out))
                assert kept[n] is not None, f"the harvest of {out} kept no input of {h.keep_input_of}"

        def examples(n):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                example_passes(model, paper_saes, images.head(n), kept=kept.get(n))
            assert not [w for w in caught if "kept input" in str(w.message)], [str(w.message) for w in caught]

        s = median_difference(lambda i: examples(few), lambda i: examples(n_ex), a.repeats) * n_ex / (n_ex - few)
        add("dataset examples, mixed4a-4e", s / n_ex, n_images, "image", "one forward pass for all layers" + (
            f", from {h.keep_input_of}'s input kept by the harvest" if kept else ""), chapter="04")
        fv = profile.featviz
        directions = torch.randn(fv.batch, 512)
        steps = 16
        render_directions(model, "mixed4c", directions[:2], dataclasses.replace(fv, steps=1))  # warm-up: imports, jit
        # a render's own cost (Lucent's setup, its first steps' allocations, the memory given back at its end) is paid
        # once per 512 steps, not once per 16: the rate is the difference of a render of 8 steps and one of 8 + 16
        s = median_difference(lambda i: render_directions(model, "mixed4c", directions, dataclasses.replace(fv, steps=8)),
                              lambda i: render_directions(model, "mixed4c", directions,
                                                          dataclasses.replace(fv, steps=8 + steps)), a.repeats)
        n_features = 5 * (profile.figure1_per_layer + 4 * profile.figure1_per_branch)
        add("feature visualisation (figure 1)", s / steps / fv.batch, n_features * fv.steps, "feature-step",
            f"{n_features} features x {fv.steps} steps", chapter="07", needed_by=[])
        decoder = np.random.default_rng(0).normal(size=(16 * 512, 512)).astype(np.float32)
        s = timed(umap_embedding, decoder)
        add("UMAP of 8,192 decoder vectors (chapter 06's two layers)", s, 2, "map", chapter="06")
        add("UMAP of 8,192 decoder vectors (the atlas's five layers)", s, 5, "map", chapter="08")
        x = torch.randn(8, 3, 224, 224)  # chapter 05 takes 32 images a call: a call's products grow with its images
        with torch.no_grad():
            acts = LayerCapture(model, ["mixed4b", "mixed4c"])(x)
        sb, sc = TopKSAE(512, 8192, 32), TopKSAE(512, 8192, 32)
        with torch.no_grad():
            sb.b_dec.copy_(acts["mixed4b"].mean(dim=(0, 2, 3)))
        attribution(model, sb, sc, "mixed4b", acts["mixed4b"], sources=[0])  # warm-up: Numba's kernel loaded (or compiled)
        # as a render's, a call's own cost is paid once per layer pair (chapter 05 passes all its sources at once)
        s = -timed(attribution, model, sb, sc, "mixed4b", acts["mixed4b"], sources=list(range(16)))
        s += timed(attribution, model, sb, sc, "mixed4b", acts["mixed4b"], sources=list(range(48)))
        add("circuit attribution", s / (32 * len(x)), profile.circuit_sources * profile.circuit_images * 4, "source-image",
            f"{profile.circuit_sources} sources x {profile.circuit_images} images x 4 layer pairs", chapter="05")
        with torch.no_grad():  # per layer: one whole clean pass, then 7 cases through the layers after it
            xs = torch.randn(8, 3, 224, 224)
            model(xs)
            s = timed(model, xs)
            outputs = LayerCapture(model, list(profile.layers))(xs)
            s += sum(timed(forward_from, model, layer, outputs[layer]) for layer in profile.layers) * 7 / len(profile.layers)
        add("spliced-in evaluation", s / 8, profile.spliced_images * len(profile.layers), "image-layer",
            f"{profile.spliced_images} images x {len(profile.layers)} layers (a clean pass, 7 cases after the layer)",
            chapter="03")
        harvest_min = per_image * n_images / 60
        paper_train = sum(train_s[layer] + stats_s[layer] for layer in profile.layers)
        all_train = sum(train_s.values()) + sum(stats_s.values())
        if profile.untrained_control:
            add("untrained control: its harvest, SAEs, statistics", plain_per_image * n_images + paper_train, 1, "run",
                "the sum of those stages above", chapter="04", needed_by=["10"])
            add("untrained control of mixed3a and mixed3b", all_train - paper_train, 1, "run", chapter="10")
        # chapter 09's SAEs of ours on mixed4c: seed 0 (the colab profile trains none before) and seed 1 (which is
        # chapter 10's claim seed of mixed4c where the profile has two)
        mixed4c = train_s["mixed4c"] + stats_s["mixed4c"]
        if author:
            add("chapter 09: our harvest (inputs x\\*255-117, the paper's positions)", per_image, n_images, "image",
                chapter="09", needed_by=[])
        add("chapter 09: our SAEs of mixed4c" + (", seeds 0 and 1" if author else ", seed 1"),
            mixed4c * (2 if author else 1), 1, "run", chapter="09",
            needed_by=["10"] if len(profile.claim_seeds) > 1 else [])  # seed 1 is chapter 10's claim seed of mixed4c
        extra = len(profile.claim_seeds) - 1
        if extra:
            add("chapter 10: the other claim seeds of every layer but mixed4c", all_train * extra - mixed4c, 1, "run",
                f"{extra} more SAE per layer, with statistics", chapter="10")  # mixed4c's first is chapter 09's
        add("book build (jupyter-book)", a.book_seconds, 1, "build", "measured on the smoke book")

    chapters = {}
    for chapter in NEEDS:
        own = [r for r in rows if r["chapter"] == chapter]
        before = [r for r in rows if r["chapter"] in NEEDS[chapter] and (r["needed by"] is None or chapter in r["needed by"])]
        chapters[chapter] = {"computes": [r["stage"] for r in own], "minutes": round(sum(r["projected min"] for r in own), 1),
                             "alone minutes": round(sum(r["projected min"] for r in own + before), 1)}
    print(f"\nprofile {a.profile}: {profile.description}\nthis machine: {cpu_name()}, no GPU; "
          f"rates measured on {a.images} images ({'ImageNet sample' if SAMPLE.is_dir() else 'generated'})\n")
    print(f"  {'stage':<60} {'chapter':>7} {'measured':>26} {'work':>24} {'projected min':>14}")
    for r in rows:
        print(f"  {r['stage']:<60} {r['chapter'] or '-':>7} {r['measured']:>26} {r['work']:>24} {r['projected min']:>14}")
    print(f"\n  {'chapter':<8} {'its own stages, min':>20} {'opened alone, min':>18}")
    for chapter, c in chapters.items():
        print(f"  {chapter:<8} {c['minutes']:>20} {c['alone minutes']:>18}")
    print(f"\n  projected total: {total / 3600:.1f} hours" + ("" if author else
          f" (with SAE_SAES=author, chapter 09 adds a harvest under the author's input convention: {harvest_min:.0f} min more)"))
    write_results("profile", a.profile, {"rows": rows, "chapters": chapters, "total_hours": total / 3600,
                                         "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
