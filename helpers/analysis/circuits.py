# GENERATED from nbs/05_circuits.ipynb by `python -m helpers export`: edit the chapter, not this file
# (tests/test_export.py fails when the two differ).
"""Circuits between SAE features of adjacent mixed layers (chapter 05): the paper's ablation, an
exact linearised attribution for every pair, and the weight view through the 1x1 branch."""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from helpers.allocator import reuse_freed_memory
from helpers.data.inception import PAPER_LAYERS, branch_slices
from helpers.data.pools import max_pool_tangent

NEXT = dict(zip(PAPER_LAYERS[:-1], PAPER_LAYERS[1:]))
PREVIOUS = {after: before for before, after in NEXT.items()}


def next_layer(layer: str) -> str:
    """The mixed4 layer right after ``layer``.

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    if layer not in NEXT:
        raise ValueError(f"no mixed4 layer follows {layer!r} directly; choose from {', '.join(NEXT)}")
    return NEXT[layer]


def adjacent_layers(layer: str) -> list[str]:
    """The mixed4 layers right after and right before ``layer`` (where they exist).

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    return [other for other in (NEXT.get(layer), PREVIOUS.get(layer)) if other]


def mixed_block(model, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of mixed ``layer`` (4b-4e) from the previous mixed layer's output ``x`` [B, C, H, W].

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    if layer not in NEXT.values():
        raise ValueError(f"mixed_block computes mixed4b-4e from the layer before; got {layer!r}")
    conv = lambda name, t: getattr(model, f"{layer}_{name}_pre_relu_conv")(t)
    b1 = F.relu(conv("1x1", x))
    b3 = F.relu(conv("3x3", F.pad(F.relu(conv("3x3_bottleneck", x)), (1, 1, 1, 1))))
    b5 = F.relu(conv("5x5", F.pad(F.relu(conv("5x5_bottleneck", x)), (2, 2, 2, 2))))
    pool = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=float("-inf")), kernel_size=3, stride=1)
    bp = F.relu(conv("pool_reduce", pool))
    return torch.cat([b1, b3, b5, bp], dim=1)


def positions(acts: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C]: one activation vector per grid position.

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    return acts.flatten(2).transpose(1, 2)


@torch.no_grad()
def active_features(sae, acts: torch.Tensor) -> list[int]:
    """Features that fire somewhere in ``acts`` [B, C, H, W], most active (summed) first.

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    z = sae.encode(positions(acts).reshape(-1, acts.shape[1]))
    total = z.sum(dim=0)
    order = torch.argsort(total, descending=True)
    return [int(i) for i in order[total[order] > 0]]


def seed_feature(sae, acts: torch.Tensor, ranked) -> int:
    """The first feature of ``ranked`` that fires in ``acts`` (a circuit needs an active seed).

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    active = set(active_features(sae, acts))
    for i in ranked:
        if int(i) in active:
            return int(i)
    raise ValueError("none of the candidate features fires on these images; use more images")


@dataclass
class AblationEdge:
    """One image's result of the paper's ablation: where it ablated, where L+1 changed most, and the
    L+1 feature matched there (with its cosine) and the size of the change.

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """

    image: int
    src_position: tuple[int, int]
    dst_position: tuple[int, int]
    dst_feature: int
    cosine: float
    change: float


@torch.no_grad()
def ablation_edges(model, sae_src, sae_dst, src_layer: str, acts_src: torch.Tensor, feature: int,
                   target: str = "activation") -> list[AblationEdge]:
    """The paper's ablation of ``feature``, one edge per image of ``acts_src`` (layer L outputs [B, C, H, W]).

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    dst_layer = next_layer(src_layer)
    b, c, h, w = acts_src.shape
    d = sae_src.decoder_directions[feature].to(acts_src)
    cos = F.cosine_similarity(positions(acts_src), d[None, None, :], dim=-1)  # [B, HW]
    best = cos.argmax(dim=1)
    ablated = acts_src.clone()
    flat = ablated.view(b, c, h * w)
    flat[torch.arange(b), :, best] = 0
    before, after = mixed_block(model, dst_layer, acts_src), mixed_block(model, dst_layer, ablated)
    change = positions(before - after)  # [B, HW', C']
    where = change.norm(dim=-1).argmax(dim=1)
    rows = torch.arange(b)
    vectors = (positions(before) if target == "activation" else change)[rows, where]
    sims = F.normalize(vectors, dim=-1) @ F.normalize(sae_dst.decoder_directions.to(vectors), dim=-1).T
    cos_best, feat = sims.max(dim=1)
    w2 = before.shape[3]
    return [AblationEdge(i, divmod(int(best[i]), w), divmod(int(where[i]), w2), int(feat[i]), float(cos_best[i]),
                         float(change[i, where[i]].norm())) for i in range(b)]


@torch.no_grad()
def ablation_control(model, sae_src, sae_dst, src_layer: str, acts_src: torch.Tensor, features,
                     target: str = "activation") -> dict:
    """The paper's ablation beside its control, over every source in ``features`` and every image.

    The control does no ablation: it matches the *unablated* L+1 vector at the ablated position to
    the most aligned L+1 feature. If the ablation's edges carried information about their source,
    they would often differ from the control's; returned: how often the most-changed L+1 position
    is the ablated position itself, how many distinct targets the sources reach, and how often the
    ablation's target equals the control's (the agreement rate); ``targets`` and ``control_targets`` list the
    two matches of every (source, image) case.

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    dst_layer = next_layer(src_layer)
    before = positions(mixed_block(model, dst_layer, acts_src))  # [B, HW, C']
    directions = F.normalize(sae_dst.decoder_directions.to(before), dim=-1)
    w = acts_src.shape[3]
    cases = []
    for f in features:
        for e in ablation_edges(model, sae_src, sae_dst, src_layer, acts_src, f, target):
            at = e.src_position[0] * w + e.src_position[1]  # the mixed4 grids are the same size
            control = int((F.normalize(before[e.image, at], dim=0) @ directions.T).argmax())
            cases.append((f, e.dst_feature, control, e.dst_position == e.src_position))
    src, dst, control, same_place = (np.array(c) for c in zip(*cases))
    return {"cases": len(cases), "sources": int(len(set(src.tolist()))),
            "distinct_targets": int(len(set(dst.tolist()))),
            "distinct_control_targets": int(len(set(control.tolist()))),
            "at_the_ablated_position": float(same_place.mean()), "agreement": float((dst == control).mean()),
            "targets": dst.tolist(), "control_targets": control.tolist()}


def relu_tangent(pre: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The one-sided derivative of relu at ``pre`` along ``t`` (pre broadcasts over t's leading dims).

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    return torch.where(pre > 0, t, torch.where(pre == 0, t.clamp_min(0), torch.zeros_like(t)))


@torch.no_grad()
def block_tangent(model, layer: str, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The one-sided directional derivative of ``mixed_block(model, layer, .)`` at x [B, C, H, W] along
    v [B, S, C, H, W] (S directions per image): lim_{t->0+} (block(x + t v) - block(x)) / t, exactly.

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    b, s, c, h, w = v.shape
    vv = v.reshape(b * s, c, h, w)
    m = lambda name: getattr(model, f"{layer}_{name}_pre_relu_conv")
    lin = lambda name, t: F.conv2d(t, m(name).weight)  # the convolution without its bias
    per = lambda t: t.reshape(b, s, *t.shape[1:])
    flat = lambda t: t.reshape(b * s, *t.shape[2:])

    branches = [relu_tangent(m("1x1")(x)[:, None], per(lin("1x1", vv)))]
    for name, pad in (("3x3", 1), ("5x5", 2)):
        pre_b = m(f"{name}_bottleneck")(x)
        tb = relu_tangent(pre_b[:, None], per(lin(f"{name}_bottleneck", vv)))
        pre = m(name)(F.pad(F.relu(pre_b), (pad,) * 4))
        branches.append(relu_tangent(pre[:, None], per(lin(name, F.pad(flat(tb), (pad,) * 4)))))
    # max-pool 3x3, stride 1, -inf padding: the tangent is the largest v among the tied maxima (of each window's
    # entries where x attains the window's maximum; one pass over v, helpers/data/pools.py)
    tp = max_pool_tangent(x, v).reshape(b * s, c, h, w)
    pool = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=float("-inf")), kernel_size=3, stride=1)
    branches.append(relu_tangent(m("pool_reduce")(pool)[:, None], per(lin("pool_reduce", tp))))
    return torch.cat(branches, dim=2)


@reuse_freed_memory()
def attribution(model, sae_src, sae_dst, src_layer: str, acts_src: torch.Tensor, sources=None,
                chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(sources, effects [len(sources), d_sae_dst]): effect[i, j] is the first-order drop of j's encoder
    pre-activation, summed over images and positions, when source i's contribution (a_i(p) d_i at every p)
    is removed from layer L. Sources default to every feature active somewhere in ``acts_src``.

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    dst_layer = next_layer(src_layer)
    b, c, h, w = acts_src.shape
    with torch.no_grad():
        z = sae_src.encode(positions(acts_src).reshape(-1, c)).reshape(b, h, w, -1)  # [B, H, W, n]
    if sources is None:
        sources = torch.nonzero(z.amax(dim=(0, 1, 2)) > 0).flatten().tolist()
    sources = list(sources)
    read = sae_dst.encoder_weight.detach()  # [n_dst, C']
    directions = sae_src.decoder_directions.detach()
    effects = torch.zeros(len(sources), read.shape[0], dtype=read.dtype)
    for start in range(0, len(sources), chunk):
        ids = sources[start:start + chunk]
        a = z[..., ids].permute(0, 3, 1, 2)  # [B, S, H, W]
        removal = -(a[:, :, None] * directions[ids][None, :, :, None, None])  # [B, S, C, H, W]
        tangent = block_tangent(model, dst_layer, acts_src, removal)  # [B, S, C', H, W]
        effects[start:start + len(ids)] = -(tangent.sum(dim=(3, 4)).sum(dim=0) @ read.T).cpu()
    return np.array(sources), effects.numpy()


@torch.no_grad()
def ablation_effects(model, sae_src, sae_dst, src_layer: str, acts_src: torch.Tensor, sources) -> np.ndarray:
    """The exact counterpart of ``attribution``: remove each source's whole contribution from layer L,
    recompute L+1, and take the drop of every target's summed pre-activation, [len(sources), d_sae_dst].

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    dst_layer = next_layer(src_layer)
    b, c, h, w = acts_src.shape
    z = sae_src.encode(positions(acts_src).reshape(-1, c)).reshape(b, h, w, -1)
    directions = sae_src.decoder_directions
    pre = lambda y: positions(y).sum(dim=1) @ sae_dst.encoder_weight.T  # the bias cancels in differences
    base = pre(mixed_block(model, dst_layer, acts_src))
    out = []
    for i in sources:
        contribution = z[..., i][:, None] * directions[i][None, :, None, None]
        out.append((base - pre(mixed_block(model, dst_layer, acts_src - contribution))).sum(dim=0))
    return torch.stack(out).cpu().numpy()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equal-length arrays.

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement(model, sae_src, sae_dst, src_layer: str, acts_src: torch.Tensor, sources, strongest: int = 200):
    """Attribution against true ablation on the same sources: (attributed, ablated, Spearman rho) over
    the ``strongest`` edges by true effect.

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    sources, att = attribution(model, sae_src, sae_dst, src_layer, acts_src, sources=sources)
    abl = ablation_effects(model, sae_src, sae_dst, src_layer, acts_src, sources)
    top = np.argsort(-np.abs(abl.ravel()))[:strongest]
    a, b = att.ravel()[top], abl.ravel()[top]
    return a, b, spearman(a, b)


def weight_edges(model, dst_layer: str, sae_src, sae_dst, dst_slices) -> np.ndarray:
    """[n_src, n_dst]: d_i W_1x1^T e_j[1x1], through the 1x1 branch of ``dst_layer`` (before its ReLU).

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    w = getattr(model, f"{dst_layer}_1x1_pre_relu_conv").weight[:, :, 0, 0]  # [C_1x1, C_src]
    s, e = dst_slices["1x1"]
    with torch.no_grad():
        return (sae_src.decoder_directions @ w.T @ sae_dst.encoder_weight[:, s:e].T).cpu().numpy()


def weight_neighbours(model, layer: str, saes: dict, alive: dict, top: int = 5) -> dict[str, dict[int, list]]:
    """Each feature's ``top`` strongest neighbours by weight edge in the adjacent layers present in
    ``saes`` ({other layer: {feature: [(neighbour, weight)]}}), linking only to features ``alive`` there.

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    out = {}
    for other in adjacent_layers(layer):
        if other not in saes:
            continue
        src, dst = (layer, other) if other == NEXT.get(layer) else (other, layer)
        w = weight_edges(model, dst, saes[src], saes[dst], branch_slices(model, [dst])[dst])
        w = w if src == layer else w.T  # rows: this layer's features
        w = np.where(np.asarray(alive[other])[None, :], w, 0)
        best = np.argsort(-np.abs(w), axis=1)[:, :top]
        out[other] = {i: [(int(j), float(w[i, j])) for j in best[i]] for i in range(len(w))}
    return out


def circuit_graph(model, saes: dict, acts: dict, layers, seeds, top: int = 3) -> dict:
    """Follow the strongest positive attribution edges from ``seeds`` (one feature of ``layers[0]``, or
    several) onwards, layer by layer; ``saes`` and ``acts`` (activations [B, C, H, W]) per layer.
    {"nodes": [(layer, feature)], "edges": [(u, v, effect)]}; a layer no positive edge reaches has no node.

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    frontier = [int(s) for s in np.atleast_1d(seeds)]
    nodes, edges = [(layers[0], s) for s in frontier], []
    for src, dst in zip(layers[:-1], layers[1:]):
        nxt = []
        for i in frontier:
            _, eff = attribution(model, saes[src], saes[dst], src, acts[src], sources=[i])
            for j in np.argsort(-eff[0])[:top]:
                if eff[0, j] <= 0:
                    break
                edges.append(((src, i), (dst, int(j)), float(eff[0, j])))
                if (dst, int(j)) not in nodes:
                    nodes.append((dst, int(j)))
                    nxt.append(int(j))
        frontier = nxt
    return {"nodes": nodes, "edges": edges}


def strong_edges(sources: np.ndarray, effects: np.ndarray, top: float = 0.01) -> np.ndarray:
    """[m, 2] (source, target) pairs of the strongest positive effects (the ``top`` fraction of all).

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    flat = effects.ravel()
    m = max(1, int(round(top * flat.size)))
    best = np.argpartition(-flat, m - 1)[:m]
    best = best[flat[best] > 0]
    rows, cols = np.unravel_index(best, effects.shape)
    return np.stack([np.asarray(sources)[rows], cols], axis=1)


def same_branch_share(edges: np.ndarray, src_branch: np.ndarray, dst_branch: np.ndarray, n_perm: int = 2000,
                      seed: int = 0) -> dict:
    """Of the ``edges`` [m, 2] between specialised features (``*_branch``: each feature's branch index, -1 if
    none), the share whose two ends share a branch, against that share with the targets' branches permuted.

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    s, t = src_branch[edges[:, 0]], dst_branch[edges[:, 1]]
    keep = (s >= 0) & (t >= 0)
    s, t = s[keep], t[keep]
    if len(s) == 0:
        return {"edges": 0, "share_same": float("nan"), "chance": float("nan"), "p_value": float("nan")}
    observed = float((s == t).mean())
    rng = np.random.default_rng(seed)
    null = np.array([(s == rng.permutation(t)).mean() for _ in range(n_perm)])
    return {"edges": int(len(s)), "share_same": observed, "chance": float(null.mean()),
            "p_value": float(((null >= observed).sum() + 1) / (n_perm + 1))}


def layer_attribution(model, sae_src, sae_dst, src: str, acts_src: torch.Tensor, n_sources: int = 512):
    """``attribution`` from the ``n_sources`` most active source features to every feature of the next layer:
    (sources, effects [n_sources, d_sae_dst]).

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    sources = active_features(sae_src, acts_src)[:n_sources]
    return attribution(model, sae_src, sae_dst, src, acts_src, sources=sources)


def cross_layer_share(attributions: dict, analyses: dict, top: float = 0.01) -> list[dict]:
    """``same_branch_share`` of the strongest edges of each source layer's ``attributions`` ({layer: (sources,
    effects)}, ``layer_attribution``'s) to the next layer, both in ``analyses`` (BranchAnalysis per layer).

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    rows = []
    for src, (sources, effects) in attributions.items():
        dst = NEXT[src]
        share = same_branch_share(strong_edges(sources, effects, top), analyses[src].specialised_branch(),
                                  analyses[dst].specialised_branch())
        rows.append({"from": src, "to": dst, **{k: round(v, 3) if isinstance(v, float) else v for k, v in share.items()}})
    return rows


def switch_features(model, layer: str, sae, x: torch.Tensor, features, scale: float = 0.0, clean=None, acts=None):
    """(clean, edited) log class probabilities [B, classes] on input ``x``: in ``edited``, each feature of
    ``features`` has its contribution z_f(p) d_f scaled by ``scale`` at every position of ``layer`` (0: off).
    ``clean``: the clean ones, where a caller already has them (one forward pass fewer); ``acts``: ``layer``'s
    clean output on ``x``, where a caller has it (then only the layers after ``layer`` run: chapter 03).

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    from helpers.data.inception import spliced_log_probs

    ids = torch.as_tensor(list(features), dtype=torch.long)

    def edit(acts):
        b, c, h, w = acts.shape
        flat = acts.permute(0, 2, 3, 1).reshape(-1, c)
        z = sae.encode(flat)[:, ids]  # [positions, len(features)]
        change = (scale - 1.0) * (z @ sae.decoder_directions[ids].to(z))
        return (flat + change.to(flat)).reshape(b, h, w, c).permute(0, 3, 1, 2)

    clean = spliced_log_probs(model, layer, x) if clean is None else clean
    return clean, (spliced_log_probs(model, layer, x, edit, acts=acts) if len(ids) else clean)


def class_shifts(clean: torch.Tensor, edited: torch.Tensor, top: int = 5) -> list[dict]:
    """The ``top`` classes whose mean probability over the images drops most, with both means.

    Defined in chapter 05, *Circuits between layers* (nbs/05_circuits.ipynb).
    """
    p, q = clean.exp().mean(dim=0), edited.exp().mean(dim=0)
    drop = (p - q).numpy()
    order = np.argsort(-drop)[:top]
    return [{"class": int(c), "before": float(p[c]), "after": float(q[c]), "change": float(-drop[c])} for c in order]
