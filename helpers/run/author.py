"""The paper author's published SAEs (Hugging Face hub: ``matboz/SAEs_for_inceptionV1``).

Their files are PyTorch state dicts of a fully tied TopK SAE (``Top_K_SAE`` in the author's
notebooks, saved with ``torch.save(state_dict)``): ``W_enc.weight`` [latents, width] (an
``nn.Linear`` without bias, its transpose the decoder; ``W_dec.linear.weight`` is the same
storage), ``b_pre`` [width] (our ``b_dec``) and ``b_latent`` [latents] (our ``b_enc``), with
k = 32 (and 16 latents per channel). ``from_author_state_dict`` converts one to our ``TopKSAE``.

Which file is a layer's SAE is decided by one rule (``author_file_for``), because the repository
holds more than the five whole-layer SAEs: branch SAEs (``TopK_SAE_for_Mixed4a_3x3.pth``, 204
wide), activation dumps (``..._tensor_dataset.pt``) and copies (``TOP_k_SAE_mixed4b (1).pth``).
A layer's file is named as the author's code names whole-layer SAEs (``TOP_k_SAE_<layer>.pth``,
``TopK_SAE_for_<Layer>.pth``, a copy with `` (n)``); where several match, identical bytes make
the choice free (the original is taken), otherwise the most recently committed one is taken when
the hub says which that is, and nothing is taken offline. The chosen file must then be as wide as
the layer. Every converted SAE records the repository, the revision it came from and why that
file was chosen.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers.data.inception import architecture_slices, layer_width
from helpers.sae.model import TopKSAE

REPO_ID = "matboz/SAEs_for_inceptionV1"
# The revision every download asks for. The hub's listing cannot be read from where this was written, so it
# is the branch; the commit a file was converted from is recorded with the SAE (metadata "source").
REVISION = "main"
AUTHOR_K = 32
WHOLE_LAYER = re.compile(r"top_?k_sae_(?:for_)?(mixed\d[a-e])(?: \((\d+)\))?\.pth?", re.IGNORECASE)


class AuthorSAEUnavailable(RuntimeError):
    """The author's SAE for a layer cannot be had here (offline, or the file is not usable)."""


class AuthorSAEMissing(AuthorSAEUnavailable):
    """The author published no usable SAE for a layer: no file of a whole-layer SAE's name, several that
    cannot be told apart, or one that fails the checks (width, keys, numbers)."""


@dataclass(frozen=True)
class Candidate:
    """A repository file named as a layer's whole-layer SAE."""

    path: str  # in the repository
    copy: int  # 0 for "X.pth", n for "X (n).pth"
    digest: str | None = None  # of its bytes (the hub's LFS sha256, or hashed from the cache)
    committed: str | None = None  # when it was last committed (ISO date), where the hub says


def candidates(layer: str, files: list[str]) -> list[Candidate]:
    """The files of ``files`` named as ``layer``'s whole-layer SAE: never a branch SAE (``_3x3``), a dump
    (``_tensor_dataset``) or another layer's file."""
    found = []
    for path in files:
        match = WHOLE_LAYER.fullmatch(Path(path).name)
        if match and match.group(1).lower() == layer.lower():
            found.append(Candidate(path, int(match.group(2) or 0)))
    return sorted(found, key=lambda c: (c.copy, c.path))


def choose(layer: str, found: list[Candidate]) -> tuple[Candidate, str]:
    """One file of ``found`` (``candidates`` with their digests and commit dates where known), and the rule
    that chose it; ``AuthorSAEMissing`` when none can be chosen."""
    names = ", ".join(c.path for c in found)
    if not found:
        raise AuthorSAEMissing(f"{REPO_ID} has no file named as a whole-layer SAE of {layer} "
                               f"(TOP_k_SAE_{layer}.pth or TopK_SAE_for_{layer.capitalize()}.pth)")
    if len(found) == 1:
        return found[0], f"the one file named as {layer}'s SAE"
    if all(c.digest is not None for c in found) and len({c.digest for c in found}) == 1:
        return found[0], f"{len(found)} files named as {layer}'s SAE hold the same bytes ({names}); the original taken"
    if all(c.committed for c in found):
        newest = max(found, key=lambda c: c.committed)
        if sum(c.committed == newest.committed for c in found) == 1:
            return newest, (f"{len(found)} different files named as {layer}'s SAE ({names}); the most recently "
                            f"committed taken ({newest.path}, {newest.committed})")
    raise AuthorSAEMissing(f"{REPO_ID} has {len(found)} different files named as {layer}'s SAE ({names}) and "
                           "which is the latest cannot be told here; none is taken")


def author_file_for(layer: str, files: list[str]) -> str:
    """The repository file holding ``layer``'s SAE, by name alone (one match, or refused)."""
    return choose(layer, candidates(layer, files))[0].path


def _finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} holds NaN or infinite numbers")


def from_author_state_dict(state: dict, k: int = AUTHOR_K) -> TopKSAE:
    """``{W_enc.weight, b_pre, b_latent}`` (and the tied ``W_dec.linear.weight``) -> a fully tied ``TopKSAE``."""
    if not isinstance(state, dict):
        raise ValueError(f"not an author SAE state dict: a {type(state).__name__}, not a dict of tensors")
    missing = {"W_enc.weight", "b_pre", "b_latent"} - set(state)
    if missing:
        raise ValueError(f"not an author SAE state dict: missing {sorted(missing)} (has {sorted(state)[:5]})")
    weight, b_pre, b_latent = state["W_enc.weight"], state["b_pre"], state["b_latent"]
    if not all(isinstance(t, torch.Tensor) for t in (weight, b_pre, b_latent)) or weight.ndim != 2:
        raise ValueError("not an author SAE state dict: W_enc.weight must be a 2-D tensor, b_pre and b_latent tensors")
    d_sae, d_in = weight.shape
    if b_pre.shape != (d_in,) or b_latent.shape != (d_sae,):
        raise ValueError(f"inconsistent shapes: W_enc.weight {tuple(weight.shape)}, b_pre {tuple(b_pre.shape)}, "
                         f"b_latent {tuple(b_latent.shape)}")
    tied = state.get("W_dec.linear.weight")
    if tied is not None and (not isinstance(tied, torch.Tensor) or not torch.equal(tied, weight)):
        raise ValueError("W_dec.linear.weight differs from W_enc.weight: not the author's tied SAE")
    for name, t in (("W_enc.weight", weight), ("b_pre", b_pre), ("b_latent", b_latent)):
        _finite(name, t)
    sae = TopKSAE(d_in, d_sae, k, tied="full")
    with torch.no_grad():
        sae.encoder_weight.copy_(weight)
        sae.b_dec.copy_(b_pre)
        sae.b_enc.copy_(b_latent)
    return sae


def load_author_file(path: Path, layer: str) -> TopKSAE:
    """The SAE in the author's file ``path``, converted and checked against ``layer``'s width; a file that is
    not one (truncated, an HTML page, a pickle with code, a branch SAE, NaNs) is refused, naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise AuthorSAEMissing(f"{path} is not a loadable PyTorch state dict of tensors ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]}); delete it from the hub cache to download it "
                               "again, or train SAEs here (SAE_SAES=train)") from e
    try:
        sae = from_author_state_dict(state)
    except ValueError as e:
        raise AuthorSAEMissing(f"{path} is not the author's SAE of {layer}: {e}") from e
    width = layer_width(architecture_slices(layer))
    if sae.d_in != width:
        raise AuthorSAEMissing(f"{path} encodes {sae.d_in}-wide vectors but {layer} is {width} wide: a branch SAE or "
                               "another layer's, not this layer's SAE")
    return sae


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reachable(timeout: float = 5.0) -> str | None:
    """None if the hub answers, else why not: one request, so that an offline machine fails at once
    instead of after the hub client's retries (which also log to stderr)."""
    import os
    import urllib.error
    import urllib.request

    url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/api/models/{REPO_ID}"
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered (an error page is still an answer: the client will say what is wrong)
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))
    return None


def _snapshot(cache_dir) -> Path | None:
    """The repository's snapshot in the hub's local cache (downloaded before), else None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(REPO_ID, revision=REVISION, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # nothing cached (LocalEntryNotFoundError and kin)
        return None


def _from_cache(layer: str, cache_dir) -> tuple[Path, str] | None:
    """(the layer's file, why it was chosen) from the local cache, or None when it is not there: with
    several candidates, all of them must be cached (their bytes decide)."""
    folder = _snapshot(cache_dir)
    if folder is None:
        return None
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    found = candidates(layer, files)
    if not found:
        return None  # perhaps not downloaded yet: the hub's listing decides
    found = [Candidate(c.path, c.copy, _sha256(folder / c.path)) for c in found]
    chosen, why = choose(layer, found)
    return folder / chosen.path, why


def _from_hub(layer: str, cache_dir) -> tuple[Path, str]:
    """(the layer's file, downloaded once, and why it was chosen) from the hub's listing, with each
    candidate's digest and last commit."""
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    found = candidates(layer, [f.path for f in api.list_repo_tree(REPO_ID, revision=REVISION, recursive=True)
                               if getattr(f, "size", None) is not None])
    if len(found) > 1:  # their digests and last commits decide
        info = {i.path: i for i in api.get_paths_info(REPO_ID, [c.path for c in found], expand=True,
                                                       revision=REVISION)}
        found = [Candidate(c.path, c.copy, _digest(info.get(c.path)), _committed(info.get(c.path))) for c in found]
    chosen, why = choose(layer, found)
    return Path(hf_hub_download(REPO_ID, chosen.path, revision=REVISION, cache_dir=cache_dir)), why


def _digest(info) -> str | None:
    lfs = getattr(info, "lfs", None)
    return getattr(lfs, "sha256", None) or getattr(info, "blob_id", None)


def _committed(info) -> str | None:
    commit = getattr(info, "last_commit", None)
    date = getattr(commit, "date", None)
    return date.isoformat() if hasattr(date, "isoformat") else date


def in_cache(path: Path) -> tuple[str, str]:
    """(the file's path in the repository, the commit it belongs to) of a file in the hub cache
    (``.../snapshots/<commit>/<path>``); elsewhere its name and the asked revision."""
    parts = Path(path).parts
    if "snapshots" not in parts[:-2]:
        return Path(path).name, REVISION
    at = len(parts) - 1 - parts[::-1].index("snapshots")
    return "/".join(parts[at + 2:]), parts[at + 1]


def available(layer: str = "mixed4c") -> bool:
    """Whether the author's SAEs can be had here: in the hub's cache, or the hub answers."""
    try:
        return _from_cache(layer, None) is not None or _reachable() is None
    except AuthorSAEUnavailable:
        return _reachable() is None


@dataclass(frozen=True)
class AuthorSAE:
    """The author's SAE of a layer, converted, with where it came from."""

    sae: TopKSAE
    file: str  # in the repository
    revision: str  # the commit it came from
    why: str  # the rule that chose the file

    @property
    def source(self) -> str:
        return f"hf:{REPO_ID}@{self.revision}/{self.file}"


def fetch_author_sae(layer: str, cache_dir: str | Path | None = None) -> AuthorSAE:
    """The author's SAE for ``layer``, converted and checked: from the hub's cache when downloaded before
    (offline then works), else downloaded once. ``AuthorSAEMissing``: the author published no usable SAE
    of this layer; ``AuthorSAEUnavailable``: it cannot be fetched here."""
    import logging

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    try:
        cached = _from_cache(layer, cache_dir)
        if cached is None:
            why = _reachable()
            if why is not None:
                raise ConnectionError(why)
            hub_log.setLevel(logging.ERROR)  # no retry chatter in the pages
            cached = _from_hub(layer, cache_dir)
    except AuthorSAEUnavailable:
        raise
    except Exception as e:  # offline: connection errors of several kinds
        raise AuthorSAEUnavailable(
            f"could not fetch the paper's SAE for {layer} from the Hugging Face hub ({REPO_ID}): {e}. "
            "This needs internet once; or train SAEs here (SAE_SAES=train, the default)") from e
    finally:
        hub_log.setLevel(level)
    path, why = cached
    return AuthorSAE(load_author_file(Path(path), layer), *in_cache(Path(path)), why)
