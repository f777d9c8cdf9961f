"""Chapter 10's evidence from a run: every claim measured on each SAE it concerns (the profile's claim seeds, the
families sweep where it ran) and held against its control (the untrained network where the weights are real,
chance where they are random, permutations for the claims about labels, edges and neighbours).

Each ``*_row`` returns one row of the chapter's table: the claim, where it comes from, the layer, its
``Condition`` per SAE and the verdict by ``verdicts.verdict``. The statistics are the chapter's
(``helpers/analysis/verdicts.py``); this module only finds the artifacts they are computed on.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from helpers.analysis import circuits, verdicts
from helpers.analysis.branches import BRANCHES, specialised
from helpers.analysis.embed import cosine_knn
from helpers.analysis.verdicts import Condition
from helpers.run.sweep import EVALUATION, FAMILIES, swept

FIVE = BRANCHES.index("5x5")
NEIGHBOURS = 15  # chapter 06's UMAP neighbours: the graph its map is laid out from


def row(claim: str, source: str, layer: str, statistic: str, conditions: list[Condition], random_weights: bool,
        why_not: str = "") -> dict:
    """One row of the table: the first SAE's value and control, the effect, how many SAEs clear, the verdict."""
    first = conditions[0] if conditions else None
    fmt = lambda e: "–" if e is None or not np.isfinite(e.value) else f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"
    cleared = [c for c in conditions if np.isfinite(c.measured.value) and np.isfinite(c.control.high)]
    # the verdict right after what is claimed where, so that it shows without scrolling; the evidence after it
    return {"claim": claim, "layer": layer,
            "verdict": verdicts.verdict(conditions, random_weights) if conditions or random_weights else
            verdicts.NOT_MEASURED + (f" ({why_not})" if why_not else ""),
            "SAEs clearing the control": f"{sum(c.cleared for c in cleared)} of {len(cleared)}",
            "value [99% interval]": fmt(first and first.measured),
            "control value [99% interval]": fmt(first and first.control), "effect": fmt(first and first.effect),
            "statistic": statistic, "control": first.control_name if first else why_not, "source": source,
            "conditions": conditions}


# --- the layer's SAEs a claim is measured on ------------------------------------------------------------
def _saes(run, layer: str):
    """(name, SAE, branch analysis) of the layer's SAE at each of the profile's claim seeds."""
    k = run.profile.train.sae.k
    for seed in _seeds(run):
        sae = run.sae(layer) if seed == run.profile.train.seed else run.sae_with_seed(layer, seed)
        author = run.saes == "author" and seed == run.profile.train.seed
        name = f"the author's, {layer}" if author else f"TopK k={k}, seed {seed}"
        yield name, sae, run.branches_with_seed(layer, seed)


def _seeds(run) -> tuple[int, ...]:
    """The profile's claim seeds, its own first; only its own where the run shows the author's SAEs."""
    own = run.profile.train.seed
    return (own,) if run.saes == "author" else (own, *[s for s in run.profile.claim_seeds if s != own])


def _swept(run, layer: str) -> list[tuple[str, np.ndarray, int]]:
    """(name, [4] specialised counts, live count) of every SAE of the families sweep of ``layer``, where it ran."""
    p = run.profile
    if layer != p.sweep_layer or not swept(run, layer):
        return []
    out = []
    for f in FAMILIES:
        for k in p.sweep_l0:
            for s in p.sweep_seeds:
                e = json.loads((run.run_dir / "sweep" / layer / f"{f}-k{k}-s{s}" / EVALUATION).read_text())
                live = int(e["live features"])
                counts = [e.get(f"{b} specialised", round(e[f"{b} specialised / chance"] * live * 0.01))
                          for b in BRANCHES]  # evaluations from before the counts were kept: from the ratio
                out.append((f"{f} L0={k}, seed {s}", np.asarray(counts), live))
    return out


def _held_against_untrained(run, layer: str, measure, null_name: str) -> list[Condition]:
    """``measure(run, sae, analysis)`` -> (estimate, chance) or None for each SAE of the layer, held against chance
    (labels permuted) with random weights, and against the untrained network's estimate with real ones where the
    profile runs it (the architecture alone can group features by branch: the smoke book's random network does)."""
    control = None
    if not run.random_weights and run.profile.untrained_control:
        u = run.untrained_control()
        found = measure(u, u.sae(layer), u.branches(layer))
        control = found and found[0]
    conditions = []
    for name, sae, a in _saes(run, layer):
        found = measure(run, sae, a)
        if found:
            conditions.append(Condition(name, found[0], *((found[1], null_name) if control is None else
                                                          (control, "the untrained network, same pipeline"))))
    return conditions


def _hits(a, b: int) -> np.ndarray:
    """[live] bool: each live feature of the BranchAnalysis ``a`` specialised to branch index ``b``."""
    return specialised(a.fractions, a.shuffled, a.alive)[a.alive, b]


# --- the claims ------------------------------------------------------------------------------------
def specialisation_row(run, layer: str, branch: str, claim: str, source: str = "paper") -> dict:
    """The share of the layer's live features specialised to ``branch``, against the untrained network's share
    (real weights) or chance's 1% (random weights), for every SAE of the layer."""
    b = BRANCHES.index(branch)
    if run.random_weights or not run.profile.untrained_control:
        control = lambda live: (verdicts.chance_share(live, 0.01), "chance (1% by the threshold's definition)")
    else:
        u = run.untrained_control().branches(layer)
        measured = verdicts.share(_hits(u, b))
        control = lambda live: (measured, "the untrained network, same pipeline")
    conditions = []
    for name, _, a in _saes(run, layer):
        hits = _hits(a, b)
        conditions.append(Condition(name, verdicts.share(hits), *control(len(hits))))
    for name, counts, live in _swept(run, layer):
        hits = np.arange(live) < counts[b]
        conditions.append(Condition(name, verdicts.share(hits), *control(live)))
    return row(claim, source, layer, f"share of live features specialised to {branch}", conditions,
               run.random_weights)


def label_row(run, layer: str, label: str, claim: str) -> dict:
    """How much more often the layer's 5x5-specialised features carry ``label`` (chapter 07's automatic labels
    from their top examples) than all its live features, against the labels permuted over features."""
    labels = run.labels(layer)
    if not any("animal" in entry for entry in labels):
        return row(claim, "paper", layer, f"share '{label}'-labelled: 5x5-specialised minus all", [],
                   False, "the run's images carry no classes")
    a = run.branches(layer)
    group = _hits(a, FIVE)
    marked = np.array([label in entry.get("labels", {}) for entry in labels])[a.alive]
    measured, null = verdicts.concentration(group, marked)
    return row(claim, "paper", layer, f"share '{label}'-labelled: 5x5-specialised minus all",
               [Condition(next(_saes(run, layer))[0], measured, null, "labels permuted over features")],
               run.random_weights)


def edges_row(run, src: str, claim: str) -> dict:
    """Of the strongest attribution edges from ``src`` to the next layer between specialised features, the share
    whose ends share a branch, against the targets' branches permuted (chapter 05's measure, on its matrix)."""
    dst = circuits.NEXT[src]
    edges = circuits.strong_edges(*run.layer_attribution(src))
    s, t = run.branches(src).specialised_branch()[edges[:, 0]], run.branches(dst).specialised_branch()[edges[:, 1]]
    keep = (s >= 0) & (t >= 0)
    measured, null = verdicts.agreement(s[keep], t[keep])
    return row(claim, "paper", f"{src} → {dst}", f"same-branch share of {int(keep.sum())} strong edges",
               [Condition(next(_saes(run, src))[0], measured, null, "targets' branches permuted")], run.random_weights)


def grouping_row(run, layer: str, claim: str) -> dict:
    """Among the layer's specialised features, the share of each one's nearest decoder neighbours (cosine, the
    graph chapter 06's UMAP is laid out from) specialised to the same branch, against branches permuted."""
    def measure(of, sae, a):
        branch = a.specialised_branch()
        keep = np.flatnonzero(branch >= 0)
        if len(keep) <= NEIGHBOURS:
            return None
        d = sae.decoder_directions.detach().float().numpy()[keep]
        idx, _ = cosine_knn(d, d, NEIGHBOURS + 1)
        return verdicts.neighbour_agreement(idx[:, 1:], branch[keep])  # the first neighbour is the feature itself

    conditions = _held_against_untrained(run, layer, measure, "branches permuted over the features")
    return row(claim, "paper", layer, f"same-branch share of {NEIGHBOURS} nearest neighbours", conditions,
               run.random_weights, "too few specialised features")


def circuit_rows(run, acts: dict) -> list[dict]:
    """Figure 2's circuit (chapter 05): how much more often its mixed4c and mixed4d nodes are 5x5-specialised than
    the layers' live features; and whether the ablation method's targets are the unablated match (its control)."""
    layers, model = ["mixed4b", "mixed4c", "mixed4d"], run.model()
    saes = {layer: run.sae(layer) for layer in layers}
    ranked = run.branches("mixed4b").most_specialised("5x5", None)
    first = circuits.seed_feature(saes["mixed4b"], acts["mixed4b"], ranked)
    seeds = [first, circuits.seed_feature(saes["mixed4b"], acts["mixed4b"], [f for f in ranked if f != first])]
    nodes = set(circuits.circuit_graph(model, saes, acts, layers, seeds, top=3)["nodes"])
    group, five = [], []
    for layer in layers[1:]:
        a = run.branches(layer)
        live = np.flatnonzero(a.alive)
        group.append(np.isin(live, [f for l, f in nodes if l == layer]))
        five.append(_hits(a, FIVE))
    name = next(_saes(run, "mixed4b"))[0]
    measured, null = verdicts.concentration(np.concatenate(group), np.concatenate(five))
    circuit = row("Figure 2's circuit from mixed4b's 5x5 features stays in the 5x5 branch", "paper",
                  "mixed4b → 4c → 4d", "share 5x5-specialised: circuit nodes minus all live",
                  [Condition(name, measured, null, "5x5 marks permuted over live features")], run.random_weights)
    sources = circuits.active_features(saes["mixed4b"], acts["mixed4b"])[:16]
    control = circuits.ablation_control(model, saes["mixed4b"], saes["mixed4c"], "mixed4b", acts["mixed4b"], sources)
    measured, null = verdicts.agreement(control["targets"], control["control_targets"])
    ablation = row("Confound: the ablation's target is the unablated cell's best match (holds = the method is "
                   "confounded)", "paper", "mixed4b → 4c", "agreement, ablation target = no-ablation match",
                   [Condition(name, measured, null, "matches permuted over cases")], run.random_weights)
    return [circuit, ablation]


def distill_rows(run) -> list[dict]:
    """The Distill article's two branch claims, on SAE features: mixed3a's 5x5 features respond to colour against
    its absence (|selectivity| between an image and its grey copy) more than all live features; mixed3b's 5x5
    features prefer curves to straight strokes (selectivity on synthetic strokes) more than all live features."""
    claims = {"mixed3a": "mixed3a's 5x5 branch holds the black-and-white / colour detectors",
              "mixed3b": "mixed3b's 5x5 branch holds the curve-related features"}
    rows = []
    for layer, claim in claims.items():
        statistic = ("|colour selectivity|: 5x5-specialised minus all" if layer == "mixed3a"
                     else "curve selectivity: 5x5-specialised minus all")
        if layer not in run.profile.distill_layers:
            rows.append(row(claim, "Distill", layer, statistic, [], False,
                            f"{layer} is not harvested in the {run.profile.name} profile"))
            continue
        if layer == "mixed3a":
            images = run.first_images(run.profile.spliced_images)
            pixels = torch.stack([torch.from_numpy(i).permute(2, 0, 1) for i in images])
            pair = (pixels, verdicts.grey(pixels))
        else:
            strokes = verdicts.stroke_images()
            pair = (strokes["curve"], strokes["line"])
        maxima = {}  # id(SAE) -> its maxima on the pair: one pass of a network serves all its SAEs of the layer

        def measure(of, sae, a, layer=layer, pair=pair, maxima=maxima):
            if id(sae) not in maxima:
                saes = [s for _, s, _ in _saes(of, layer)] if of is run else [sae]  # the control: its one SAE
                found = [verdicts.feature_maxima(of.model(), layer, saes, p, of.input_scale) for p in pair]
                maxima.update({id(s): m for s, m in zip(saes, zip(*found))})
            a_, b_ = maxima[id(sae)]
            score = verdicts.selectivity(a_, b_)[a.alive]
            score = np.abs(score) if layer == "mixed3a" else score
            return verdicts.concentration(_hits(a, FIVE), score)

        conditions = _held_against_untrained(run, layer, measure, "scores permuted over live features")
        rows.append(row(claim, "Distill", layer, statistic, conditions, run.random_weights))
    return rows
