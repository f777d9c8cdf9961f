"""Circuits between SAE features of adjacent mixed layers (mixed4a -> 4b -> ... -> 4e).

Three views of the edge from feature i (layer L) to feature j (layer L+1):

* ``ablation_edges`` -- the paper's method: in each image, take the position whose
  activation is most aligned (cosine) with i's decoder vector, zero that position, find the
  position of layer L+1 that changes most (L2), and name the L+1 feature whose decoder
  vector is most aligned with the vector there.
* ``attribution`` -- the fast method for all pairs: the first-order change of j's encoder
  pre-activation, summed over positions and images, when i's whole contribution to layer L
  (activation x decoder vector at every position) is removed. One linearised pass of the
  block per source feature and image gives i's effect on every j at once. It uses the true
  ReLU derivative (``block_tangent`` is written out), not Lucent's redirected gradient.
* ``weight_edges`` -- where a linear path exists, the 1x1 branch: d_i W_1x1^T e_j[1x1].

``mixed_block`` computes one mixed4 block from the previous block's output, so L+1 can be
recomputed from an edited layer L without running the network from the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .inception import PAPER_LAYERS

NEXT = dict(zip(PAPER_LAYERS[:-1], PAPER_LAYERS[1:]))


def next_layer(layer: str) -> str:
    if layer not in NEXT:
        raise ValueError(f"no mixed4 layer follows {layer!r} directly; choose from {', '.join(NEXT)}")
    return NEXT[layer]


def mixed_block(model, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of mixed ``layer`` (4b-4e) from the previous mixed layer's output ``x``."""
    if layer not in NEXT.values():
        raise ValueError(f"mixed_block computes mixed4b-4e from the layer before; got {layer!r}")
    conv = lambda name, t: getattr(model, f"{layer}_{name}_pre_relu_conv")(t)
    b1 = F.relu(conv("1x1", x))
    b3 = F.relu(conv("3x3", F.pad(F.relu(conv("3x3_bottleneck", x)), (1, 1, 1, 1))))
    b5 = F.relu(conv("5x5", F.pad(F.relu(conv("5x5_bottleneck", x)), (2, 2, 2, 2))))
    pool = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=float("-inf")), kernel_size=3, stride=1)
    bp = F.relu(conv("pool_reduce", pool))
    return torch.cat([b1, b3, b5, bp], dim=1)


def _positions(acts: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C]."""
    return acts.flatten(2).transpose(1, 2)


@torch.no_grad()
def active_features(sae, acts: torch.Tensor) -> list[int]:
    """Features that fire somewhere in ``acts`` [B, C, H, W], most active (summed) first."""
    z = sae.encode(_positions(acts).reshape(-1, acts.shape[1]))
    total = z.sum(dim=0)
    order = torch.argsort(total, descending=True)
    return [int(i) for i in order[total[order] > 0]]


def seed_feature(sae, acts: torch.Tensor, ranked) -> int:
    """The first feature of ``ranked`` that fires in ``acts`` (a circuit needs an active seed)."""
    active = set(active_features(sae, acts))
    for i in ranked:
        if int(i) in active:
            return int(i)
    raise ValueError("none of the candidate features fires on these images; use more images")


# --- the paper's ablation method ------------------------------------------------------------
@dataclass
class AblationEdge:
    image: int
    src_position: tuple[int, int]
    dst_position: tuple[int, int]
    dst_feature: int
    cosine: float
    change: float


@torch.no_grad()
def ablation_edges(model, sae_src, sae_dst, src_layer: str, acts_src: torch.Tensor, feature: int,
                   target: str = "activation") -> list[AblationEdge]:
    """The paper's ablation, image by image (batched). ``acts_src``: layer L outputs [B, C, H, W].

    target="activation": match the L+1 vector at the most-changed position (the paper's text);
    target="change": match the change itself.
    """
    dst_layer = next_layer(src_layer)
    b, c, h, w = acts_src.shape
    d = sae_src.decoder_directions[feature].to(acts_src)
    cos = F.cosine_similarity(_positions(acts_src), d[None, None, :], dim=-1)  # [B, HW]
    best = cos.argmax(dim=1)
    ablated = acts_src.clone()
    flat = ablated.view(b, c, h * w)
    flat[torch.arange(b), :, best] = 0
    before, after = mixed_block(model, dst_layer, acts_src), mixed_block(model, dst_layer, ablated)
    change = _positions(before - after)  # [B, HW', C']
    where = change.norm(dim=-1).argmax(dim=1)
    rows = torch.arange(b)
    vectors = (_positions(before) if target == "activation" else change)[rows, where]
    sims = F.normalize(vectors, dim=-1) @ F.normalize(sae_dst.decoder_directions.to(vectors), dim=-1).T
    cos_best, feat = sims.max(dim=1)
    w2 = before.shape[3]
    return [AblationEdge(i, divmod(int(best[i]), w), divmod(int(where[i]), w2), int(feat[i]), float(cos_best[i]),
                         float(change[i, where[i]].norm())) for i in range(b)]


# --- attribution: every target at once, per source feature ------------------------------------
def _relu_tangent(pre: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One-sided derivative of relu at ``pre`` along ``t`` (pre broadcasts over t's leading dims)."""
    return torch.where(pre > 0, t, torch.where(pre == 0, t.clamp_min(0), torch.zeros_like(t)))


@torch.no_grad()
def block_tangent(model, layer: str, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The one-sided directional derivative of ``mixed_block(model, layer, .)`` at x along v.

    x: [B, C, H, W]; v: [B, S, C, H, W] (S directions per image). The block is piecewise
    linear, so this is exact: lim_{t->0+} (block(x + t v) - block(x)) / t. ReLU masks and the
    pooling's maxima are computed once per image, and ties in the max-pool (common: the input
    is post-ReLU, so windows of zeros) take the largest tangent among the tied inputs, which
    plain autodiff (one arbitrary winner) gets wrong.
    """
    b, s, c, h, w = v.shape
    vv = v.reshape(b * s, c, h, w)
    m = lambda name: getattr(model, f"{layer}_{name}_pre_relu_conv")
    lin = lambda name, t: F.conv2d(t, m(name).weight)  # the convolution without its bias
    per = lambda t: t.reshape(b, s, *t.shape[1:])
    flat = lambda t: t.reshape(b * s, *t.shape[2:])

    t1 = _relu_tangent(m("1x1")(x)[:, None], per(lin("1x1", vv)))
    branches = [t1]
    for name, pad in (("3x3", 1), ("5x5", 2)):
        pre_b = m(f"{name}_bottleneck")(x)
        tb = _relu_tangent(pre_b[:, None], per(lin(f"{name}_bottleneck", vv)))
        pre = m(name)(F.pad(F.relu(pre_b), (pad,) * 4))
        branches.append(_relu_tangent(pre[:, None], per(lin(name, F.pad(flat(tb), (pad,) * 4)))))
    # max-pool 3x3, stride 1, -inf padding: the tangent is the largest v among the tied maxima
    xu = F.unfold(F.pad(x, (1, 1, 1, 1), value=float("-inf")), 3).reshape(b, c, 9, h * w)
    tied = xu == xu.max(dim=2, keepdim=True).values
    vu = F.unfold(F.pad(vv, (1, 1, 1, 1)), 3).reshape(b, s, c, 9, h * w)
    tp = vu.masked_fill(~tied[:, None], float("-inf")).max(dim=3).values.reshape(b * s, c, h, w)
    pool = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=float("-inf")), kernel_size=3, stride=1)
    branches.append(_relu_tangent(m("pool_reduce")(pool)[:, None], per(lin("pool_reduce", tp))))
    return torch.cat(branches, dim=2)


def attribution(model, sae_src, sae_dst, src_layer: str, acts_src: torch.Tensor, sources=None,
                chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Effects [len(sources), d_sae_dst] of source features on the next layer's features.

    effect[i, j] = the first-order drop in j's encoder pre-activation, summed over images
    and positions, when feature i's contribution to layer L (a_i(p) * d_i at every p) is
    removed: the derivative counterpart of ``ablation_effects``. Sources default to every
    feature active somewhere in ``acts_src``. Returns (sources, effects).
    """
    dst_layer = next_layer(src_layer)
    b, c, h, w = acts_src.shape
    with torch.no_grad():
        z = sae_src.encode(_positions(acts_src).reshape(-1, c)).reshape(b, h, w, -1)  # [B, H, W, n]
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
    """The exact counterpart of ``attribution``: remove each source feature's whole contribution
    from layer L, recompute L+1, and take the drop of every target's summed pre-activation."""
    dst_layer = next_layer(src_layer)
    b, c, h, w = acts_src.shape
    z = sae_src.encode(_positions(acts_src).reshape(-1, c)).reshape(b, h, w, -1)
    directions = sae_src.decoder_directions
    pre = lambda y: _positions(y).sum(dim=1) @ sae_dst.encoder_weight.T  # bias cancels in differences
    base = pre(mixed_block(model, dst_layer, acts_src))
    out = []
    for i in sources:
        contribution = z[..., i][:, None] * directions[i][None, :, None, None]
        out.append((base - pre(mixed_block(model, dst_layer, acts_src - contribution))).sum(dim=0))
    return torch.stack(out).cpu().numpy()


def weight_edges(model, dst_layer: str, sae_src, sae_dst, dst_slices) -> np.ndarray:
    """[n_src, n_dst]: n1 W n2^T through the 1x1 branch of ``dst_layer`` (before its ReLU)."""
    w = getattr(model, f"{dst_layer}_1x1_pre_relu_conv").weight[:, :, 0, 0]  # [C_1x1, C_src]
    s, e = dst_slices["1x1"]
    with torch.no_grad():
        return (sae_src.decoder_directions @ w.T @ sae_dst.encoder_weight[:, s:e].T).cpu().numpy()


# --- a circuit from a seed feature -------------------------------------------------------------
def circuit_graph(model, saes: dict, acts: dict, layers, seed: int, top: int = 3) -> dict:
    """Follow the strongest positive attribution edges from ``seed`` in ``layers[0]`` onwards.

    saes, acts: per layer, the SAE and that layer's activations [B, C, H, W] on the images.
    Returns {"nodes": [(layer, feature)], "edges": [((layer, i), (layer', j), effect)]}.
    """
    frontier, nodes, edges = [seed], [(layers[0], seed)], []
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


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def strong_edges(sources: np.ndarray, effects: np.ndarray, top: float = 0.01) -> np.ndarray:
    """[m, 2] (source, target) pairs of the strongest positive effects (the top fraction)."""
    flat = effects.ravel()
    m = max(1, int(round(top * flat.size)))
    best = np.argpartition(-flat, m - 1)[:m]
    best = best[flat[best] > 0]
    rows, cols = np.unravel_index(best, effects.shape)
    return np.stack([np.asarray(sources)[rows], cols], axis=1)


def agreement(model, sae_src, sae_dst, src_layer: str, acts_src: torch.Tensor, sources, strongest: int = 200):
    """Attribution against true ablation on the same sources: (attributed, ablated, Spearman rho)
    over the ``strongest`` edges by true effect."""
    sources, att = attribution(model, sae_src, sae_dst, src_layer, acts_src, sources=sources)
    abl = ablation_effects(model, sae_src, sae_dst, src_layer, acts_src, sources)
    top = np.argsort(-np.abs(abl.ravel()))[:strongest]
    a, b = att.ravel()[top], abl.ravel()[top]
    return a, b, spearman(a, b)
