"""The families sweep (chapter 03): one layer's SAE trained for every family at several sparsities and seeds on
the run's harvest, each evaluated the same way, so a reader sees whether branch specialisation is a property
of the network or of one SAE.

    python -m helpers sweep [--profile smoke] [--layer mixed4c] [--families topk,batchtopk,matryoshka,jumprelu]
                            [--l0 16,32,64,128] [--seeds 0,1]

Each SAE goes to ``<run>/sweep/<layer>/<family>-k<L0>-s<seed>/`` with its ``evaluation.json``; an SAE or an
evaluation already there is reused (an interrupted sweep resumes; a training's checkpoint is deleted once its SAE
is evaluated). Per SAE: the held-out L0 and FVU (its
``cfg.json``), the spliced-in KL recovered against zero ablation and against the mean (chapter 03), and the
branch specialisation of its decoder vectors (chapter 04): for each branch, the features specialised to it
over the count expected by chance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from helpers.analysis.branches import BRANCHES, analyse_branches
from helpers.analysis.spliced import spliced_evaluation
from helpers.config import Architecture
from helpers.data.inception import clean_pass
from helpers.files import CFG_FILE, CHECKPOINT, write_json
from helpers.progress import progress
from helpers.run.artifacts import open_run
from helpers.sae.model import TopKSAE
from helpers.sae.train import train

FAMILIES = typing.get_args(Architecture)
EVALUATION = "evaluation.json"
_SHARED: dict = {}  # (run folder, SAEs, layer, images) -> the clean pass and the floors' rows, measured once
FREQUENCY_VECTORS = 100_000  # harvested vectors each SAE's firing frequencies are counted on (dead features out)


def sweep(run, layer: str | None = None, families=FAMILIES, l0s=None, seeds=None) -> list[dict]:
    """One row per (family, L0, seed): the SAE's measures, made or read back (see the module's text)."""
    profile = run.profile
    layer, l0s, seeds = layer or profile.sweep_layer, l0s or profile.sweep_l0, seeds or profile.sweep_seeds
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ValueError(f"unknown families {bad}; choose from {', '.join(FAMILIES)}")
    if layer not in profile.layers:
        raise ValueError(f"--layer {layer} is not harvested in the {profile.name} profile ({', '.join(profile.layers)})")
    cases = [(f, int(k), int(s)) for f in families for k in l0s for s in seeds]
    rows = []
    for family, k, seed in progress(cases, desc=f"sweep {layer}", unit="SAE"):
        directory = run.run_dir / "sweep" / layer / f"{family}-k{k}-s{seed}"
        if not (directory / EVALUATION).exists():
            write_json(directory / EVALUATION, evaluate(run, layer, _trained(run, layer, directory, family, k, seed)))
            (directory / CHECKPOINT).unlink(missing_ok=True)  # done: the optimizer's state is 3x the SAE on disk
        rows.append({"family": family, "k": k, "seed": seed, **json.loads((directory / EVALUATION).read_text())})
    return rows


def swept(run, layer: str | None = None, families=FAMILIES) -> bool:
    """Whether every SAE of the profile's sweep of ``layer`` is trained and evaluated (nothing left to compute)."""
    p = run.profile
    layer = layer or p.sweep_layer
    return all((run.run_dir / "sweep" / layer / f"{f}-k{k}-s{s}" / EVALUATION).exists()
               for f in families for k in p.sweep_l0 for s in p.sweep_seeds)


def _trained(run, layer, directory, family: str, k: int, seed: int) -> TopKSAE:
    if not (directory / CFG_FILE).exists():
        base = run.profile.train
        sae = dataclasses.replace(base.sae, architecture=family, k=k, aux_k=base.sae.aux_k if family == "topk" else 0)
        train(dataclasses.replace(base, run=str(run.harvest()), layer=layer, out=str(directory), seed=seed, sae=sae,
                                  resume=(directory / CHECKPOINT).exists()))
    return TopKSAE.load(directory)


def evaluate(run, layer: str, sae: TopKSAE) -> dict:
    """The sweep's measures of one SAE (each defined in chapters 03 and 04)."""
    held = sae.metadata.get("held_out") or {}
    x = run.model_inputs(run.profile.spliced_images)
    key = (str(run.run_dir.resolve()), run.saes, layer, run.profile.spliced_images)
    shared = _SHARED.setdefault(key, {})  # the same for every SAE of the layer
    if "clean" not in shared:
        shared["clean"] = clean_pass(run.model(), layer, x)
    rows = spliced_evaluation(run.model(), layer, sae, x, {}, shared.get("floors"), shared["clean"])  # no branches
    shared["floors"] = [r for r in rows if r["spliced in"].endswith("(floor)")]
    spliced = {r["spliced in"]: r for r in rows}
    frequency = run.firing_frequency(layer, sae, FREQUENCY_VECTORS)
    table = analyse_branches(layer, sae.decoder_directions.detach(), run.slices(layer), frequency).table()
    return {"L0": held.get("L0"), "FVU": held.get("FVU"), "dead fraction": held.get("dead fraction"),
            "KL recovered (zero)": spliced["SAE reconstruction"]["KL recovered (zero)"],
            "KL recovered": spliced["SAE reconstruction"]["KL recovered"],
            **{f"{row['branch']} specialised / chance": row["ratio to chance"] for row in table},
            **{f"{row['branch']} specialised": row["specialised"] for row in table},
            "live features": int((frequency > 0).sum())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m helpers sweep", description=__doc__.splitlines()[0])
    p.add_argument("--profile", help="smoke, colab, cpu, gpu or paper (default: $SAE_PROFILE, else cpu)")
    p.add_argument("--layer", help="the layer (default: the profile's sweep_layer)")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    p.add_argument("--l0", help="comma list of target L0 values (k; default: the profile's)")
    p.add_argument("--seeds", help="comma list of seeds (default: the profile's)")
    a = p.parse_args(argv)
    try:
        ints = [None if v is None else tuple(int(x) for x in v.split(",")) for v in (a.l0, a.seeds)]
        rows = sweep(open_run(a.profile), a.layer, tuple(a.families.split(",")), *ints)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    columns = ["family", "k", "seed", "L0", "FVU", "KL recovered (zero)", *[f"{b} specialised / chance" for b in BRANCHES]]
    print("  ".join(f"{c:>12.12}" for c in columns))
    for r in rows:
        print("  ".join(f"{r[c]:>12.4g}" if isinstance(r[c], float) else f"{r[c]!s:>12.12}" for c in columns))
    return 0
