"""What an SAE keeps and how it behaves, as chapter 03 measures it: the spliced-in evaluation, the spatial
coherence of its features and their firing statistics, each kept in a file beside the SAE. A part of the run
(``artifacts.Run`` inherits it; ``self`` gives the run's model, SAEs, harvest and images)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save

from helpers.analysis import branches
from helpers.analysis.branches import Baseline, BranchAnalysis, analyse_branches
from helpers.analysis.circuits import NEXT, layer_attribution
from helpers.analysis.coherence import coherence_summary, spatial_coherence
from helpers.analysis.featviz import sae_id
from helpers.analysis.probing import absorption, max_pooled, probe_classes
from helpers.analysis.spliced import spliced_evaluation
from helpers.data.store import ActivationStore
from helpers.data.hierarchy import HierarchyUnavailable, class_ancestors
from helpers.data.images import imagenet_classes
from helpers.files import ABSORPTION, COHERENCE, FEATURE_STATS, PROBING, SPLICED, atomic_write, write_json
from helpers.run.memo import made_once
from helpers.sae.model import firing_stats

log = logging.getLogger(__name__)
FEATURE_STATS_VECTORS = 500_000  # harvested vectors a feature's firing frequency is counted on
PROBE_MIN_IMAGES = 10  # a class is probed when it has this many of the probe images (and as many others)
PROBE_CHUNK = 64  # images per pass of the probing's max-pooling


class Evaluations:
    @made_once
    def layer_attribution(self, src: str) -> tuple[np.ndarray, np.ndarray]:
        """Chapter 05's ``layer_attribution`` from ``src`` to the next layer: (sources, effects) from the profile's
        ``circuit_sources`` most active features on its first ``circuit_images`` images, kept beside ``src``'s SAE
        under both SAEs' ids (chapter 10's edges rows read it instead of computing it again)."""
        dst, p = NEXT[src], self.profile
        path = self.sae_dir(src) / (f"attribution-{sae_id(self.sae_dir(src))}-{dst}-{sae_id(self.sae_dir(dst))}-"
                                    f"{p.circuit_images}-images-{p.circuit_sources}-sources.safetensors")
        if not path.exists():
            acts = self.circuit_activations()[src]
            sources, effects = layer_attribution(self.model(), self.sae(src), self.sae(dst), src, acts, p.circuit_sources)
            atomic_write(path, lambda f: f.write(save({"sources": np.asarray(sources, np.int64),
                                                       "effects": np.ascontiguousarray(effects)})))
        kept = load_file(str(path))
        return kept["sources"], kept["effects"]

    @made_once
    def spliced(self, layer: str) -> list[dict]:
        """Chapter 03's spliced-in evaluation of the layer's SAE, kept as ``spliced.json`` beside it (the model
        card of ``python -m helpers publish`` reports it)."""
        path = self.sae_dir(layer) / SPLICED
        if not path.exists():
            rows = spliced_evaluation(self.model(), layer, self.sae(layer), self.model_inputs(self.profile.spliced_images),
                                      self.slices(layer))
            write_json(path, {"images": self.profile.spliced_images, "rows": rows})
        return json.loads(path.read_text())["rows"]

    @made_once
    def coherence(self, layer: str) -> dict:
        """Chapter 03's spatial coherence of the layer's SAE features on the spliced-in images, kept as
        ``coherence.json`` beside it: per feature (``moran``, ``shuffled``, ``maps``) and a ``summary``."""
        path = self.sae_dir(layer) / COHERENCE
        if not path.exists():
            c = spatial_coherence(self.model(), layer, self.sae(layer), self.model_inputs(self.profile.spliced_images))
            write_json(path, {"images": self.profile.spliced_images, "summary": coherence_summary(c),
                              **{k: [None if v != v else round(float(v), 5) for v in c[k].tolist()] for k in c}})
        return json.loads(path.read_text())

    @made_once
    def firing_frequency(self, layer: str, sae, n: int = 100_000) -> np.ndarray:
        """How often each feature of ``sae`` (any SAE of the layer) fires on the layer's first ``n`` harvested
        vectors (the sweep's and the claim seeds' SAEs: their dead features are left out of every count)."""
        vectors = ActivationStore(self.harvest(), layer).load(n)
        batches = (torch.from_numpy(vectors[i:i + 8192].astype(np.float32)) for i in range(0, len(vectors), 8192))
        with torch.no_grad():
            return firing_stats(sae, batches)["frequency"].numpy()

    @made_once
    def branches_with_seed(self, layer: str, seed: int):
        """The branch analysis of the layer's SAE trained from ``seed`` (chapter 10's claim seeds; the run's own
        analysis at the profile's seed)."""
        if seed == self.profile.train.seed:
            return self.branches(layer)
        sae = self.sae_with_seed(layer, seed)
        return kept_branches(layer, self.seed_dir(layer, seed), sae, self.slices(layer),
                             self.firing_frequency(layer, sae))

    def feature_stats(self, layer: str) -> dict[str, np.ndarray]:
        """Each feature's firing frequency and strength on the harvested vectors (kept beside the SAE)."""
        path = self.sae_dir(layer) / FEATURE_STATS
        if not path.exists():
            vectors = ActivationStore(self.harvest(), layer).load(FEATURE_STATS_VECTORS)
            batches = (torch.from_numpy(vectors[i:i + 8192].astype(np.float32)) for i in range(0, len(vectors), 8192))
            data = save({k: v.numpy() for k, v in firing_stats(self.sae(layer), batches).items()})
            atomic_write(path, lambda f: f.write(data))
        return load_file(path)

    @made_once
    def probing(self, layer: str) -> list[dict]:
        """Chapter 03's sparse probing of the layer's SAE on the profile's first ``probe_images`` harvested images,
        kept as ``probing.json`` beside it (rows of ``probe_classes``)."""
        path = self.sae_dir(layer) / PROBING
        if not path.exists():
            classes = self._probe_classes()
            counts = np.bincount([c for c in classes if c >= 0], minlength=1)
            if not ((counts >= PROBE_MIN_IMAGES) & (len(classes) - counts >= PROBE_MIN_IMAGES)).any():
                write_json(path, {"images": len(classes), "rows": []})  # no class to probe: no pass either
                return []
            pooled = self._pooled(layer)
            names = [label for _, label in imagenet_classes()]
            write_json(path, {"images": len(classes), "rows": probe_classes(pooled, classes[:len(pooled["neurons"])],
                                                                            names, min_images=PROBE_MIN_IMAGES)})
        return json.loads(path.read_text())["rows"]

    def _probe_classes(self) -> list[int]:
        """The ImageNet classes of the profile's probe images (the first harvested, skipped ones left out)."""
        skipped = {s[0] for s in self.manifest().skipped}
        return [c for i, c in enumerate(self.images().classes) if i not in skipped][:self.profile.probe_images]

    @made_once
    def _pooled(self, layer: str) -> dict[str, np.ndarray]:
        """``max_pooled`` over the probe images, a chunk at a time."""
        n = len(self._probe_classes())
        parts = [max_pooled(self.model(), layer, self.sae(layer), self.model_inputs(min(n, s + PROBE_CHUNK), s))
                 for s in range(0, n, PROBE_CHUNK)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    @made_once
    def absorption(self, layer: str) -> list[dict] | None:
        """Chapter 03's feature absorption along WordNet's is-a relation on the probe images, kept as
        ``absorption.json`` beside the SAE; None where WordNet is not on this machine."""
        path = self.sae_dir(layer) / ABSORPTION
        if not path.exists():
            classes = self._probe_classes()
            counts = np.bincount([c for c in classes if c >= 0], minlength=1)
            kept = np.flatnonzero(counts >= PROBE_MIN_IMAGES)
            if len(kept) < 2:
                write_json(path, {"images": len(classes), "rows": []})  # no two classes to relate: no pass either
                return []
            try:
                ancestors = class_ancestors(kept)
            except HierarchyUnavailable as e:
                log.warning("%s", e)
                return None
            names = [label for _, label in imagenet_classes()]
            rows = absorption(self._pooled(layer)["SAE features"], classes, ancestors, names, PROBE_MIN_IMAGES)
            write_json(path, {"images": len(classes), "rows": rows})
        return json.loads(path.read_text())["rows"]

    def probing_min_images(self) -> int:
        return PROBE_MIN_IMAGES


@functools.lru_cache(maxsize=1)
def _analysis_code() -> str:
    """A short id of chapter 04's exported definitions: an edit of them draws the kept analyses anew."""
    return hashlib.sha256(Path(branches.__file__).read_bytes()).hexdigest()[:8]


def kept_branches(layer: str, sae_dir, sae, slices, frequency) -> BranchAnalysis:
    """``analyse_branches`` of the SAE kept in ``sae_dir``, written beside it under its id and the analysis code's:
    every chapter's kernel reads it instead of drawing the chance baselines again (about 0.4 s a layer, the same at
    every profile: 20,000 shuffled and 20,000 Gaussian directions)."""
    path = Path(sae_dir) / f"branches-{sae_id(sae_dir)}-{_analysis_code()}.safetensors"
    if path.exists():
        k = load_file(str(path))
        q = k["quantiles"]
        return BranchAnalysis(layer, slices, k["fractions"], k["plain"],
                              Baseline("shuffled", k["shuffled"], float(q[0])),
                              Baseline("gaussian", k["gaussian"], float(q[1])), np.asarray(frequency))
    a = analyse_branches(layer, sae.decoder_directions.detach(), slices, frequency)
    data = save({"fractions": a.fractions, "plain": a.plain, "shuffled": a.shuffled.samples,
                 "gaussian": np.ascontiguousarray(a.gaussian.samples),
                 "quantiles": np.array([a.shuffled.quantile, a.gaussian.quantile])})
    atomic_write(path, lambda f: f.write(data))
    return a
