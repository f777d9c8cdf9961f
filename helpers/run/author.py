"""The paper author's published SAEs (Hugging Face hub: ``matboz/SAEs_for_inceptionV1``).

Their files are PyTorch state dicts of a fully tied TopK SAE (``Top_K_SAE`` in the
author's notebooks): ``W_enc.weight`` [latents, width] (an ``nn.Linear`` without bias, its
transpose the decoder), ``b_pre`` [width] (our ``b_dec``) and ``b_latent`` [latents] (our
``b_enc``), with k = 32. ``from_author_state_dict`` converts one to our ``TopKSAE``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from helpers.sae.model import TopKSAE

REPO_ID = "matboz/SAEs_for_inceptionV1"
AUTHOR_K = 32


class AuthorSAEUnavailable(RuntimeError):
    pass


def from_author_state_dict(state: dict, k: int = AUTHOR_K) -> TopKSAE:
    """``{W_enc.weight, b_pre, b_latent}`` -> a fully tied ``TopKSAE``."""
    missing = {"W_enc.weight", "b_pre", "b_latent"} - set(state)
    if missing:
        raise ValueError(f"not an author SAE state dict: missing {sorted(missing)} (has {sorted(state)[:5]})")
    weight = state["W_enc.weight"]
    d_sae, d_in = weight.shape
    if state["b_pre"].shape != (d_in,) or state["b_latent"].shape != (d_sae,):
        raise ValueError(f"inconsistent shapes: W_enc.weight {tuple(weight.shape)}, b_pre {tuple(state['b_pre'].shape)}, "
                         f"b_latent {tuple(state['b_latent'].shape)}")
    sae = TopKSAE(d_in, d_sae, k, tied="full")
    with torch.no_grad():
        sae.encoder_weight.copy_(weight)
        sae.b_dec.copy_(state["b_pre"])
        sae.b_enc.copy_(state["b_latent"])
    return sae


def author_file_for(layer: str, files: list[str]) -> str:
    """The repository file holding ``layer``'s SAE (file names vary; matched on the layer name)."""
    matches = [f for f in files if f.lower().endswith((".pth", ".pt")) and layer.lower() in f.lower()]
    if len(matches) != 1:
        raise AuthorSAEUnavailable(f"expected one SAE file for {layer} in {REPO_ID}, found {matches or 'none'} "
                                   f"among {files}")
    return matches[0]


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


def _cached(layer: str, cache_dir) -> Path | None:
    """The layer's file in the hub's local cache (a snapshot of the repository downloaded before), else None."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(REPO_ID, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # nothing cached (LocalEntryNotFoundError and kin)
        return None
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    try:
        return folder / author_file_for(layer, files)
    except AuthorSAEUnavailable:  # this layer's file was not downloaded yet
        return None


def available(layer: str = "mixed4c") -> bool:
    """Whether the author's SAEs can be had here: in the hub's cache, or the hub answers."""
    return _cached(layer, None) is not None or _reachable() is None


def fetch_author_sae(layer: str, cache_dir: str | Path | None = None) -> TopKSAE:
    """The author's SAE for ``layer``, converted: from the hub's cache when downloaded before (offline
    then works), else downloaded once."""
    import logging

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        path = _cached(layer, cache_dir)
        if path is None:
            why = _reachable()
            if why is not None:
                raise ConnectionError(why)
            hub_log.setLevel(logging.ERROR)  # no retry chatter in the pages
            filename = author_file_for(layer, list_repo_files(REPO_ID))
            path = hf_hub_download(REPO_ID, filename, cache_dir=cache_dir)
    except AuthorSAEUnavailable:
        raise
    except Exception as e:  # offline: connection errors of several kinds
        raise AuthorSAEUnavailable(
            f"could not fetch the paper's SAE for {layer} from the Hugging Face hub ({REPO_ID}): {e}. "
            "This needs internet once; or train SAEs here (SAE_SAES=train, the default)") from e
    finally:
        hub_log.setLevel(level)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return from_author_state_dict(state)
