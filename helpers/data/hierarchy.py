"""ImageNet's classes in WordNet's is-a hierarchy. ImageNet's class ids (wnids, ``n02085620``) are WordNet 3.0
noun offsets, so the hierarchy is WordNet 3.0's, read through nltk's copy: downloaded once, with internet, by
``python -m nltk.downloader wordnet`` (into ``~/nltk_data``, beside the other downloads of a first run)."""

from __future__ import annotations

from helpers.data.images import imagenet_classes


class HierarchyUnavailable(RuntimeError):
    """WordNet is not on this machine (or nltk is not installed)."""


def class_ancestors(class_ids) -> dict[int, list[str]]:
    """For each ImageNet class index: its hypernyms, nearest first, named ``"lemma (wnid)"``."""
    try:
        from nltk.corpus import wordnet as wn

        wn.ensure_loaded()
    except ImportError as e:
        raise HierarchyUnavailable("nltk is not installed: pip install nltk, then python -m nltk.downloader wordnet") from e
    except LookupError as e:
        raise HierarchyUnavailable("WordNet is not downloaded: run `python -m nltk.downloader wordnet` once on a "
                                   "machine with internet (it goes to ~/nltk_data)") from e
    table = imagenet_classes()
    out = {}
    for c in class_ids:
        synset = wn.synset_from_pos_and_offset("n", int(table[c][0][1:]))
        order, frontier, seen = [], [synset], {synset}
        while frontier:  # breadth first: nearer hypernyms first
            nxt = []
            for s in frontier:
                for h in s.hypernyms() + s.instance_hypernyms():
                    if h not in seen:
                        seen.add(h)
                        order.append(h)
                        nxt.append(h)
            frontier = nxt
        out[int(c)] = [f"{h.lemma_names()[0].replace('_', ' ')} (n{h.offset():08d})" for h in order]
    return out
