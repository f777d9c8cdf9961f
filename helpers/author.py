"""The paper author's published SAEs (Hugging Face hub: ``matboz/SAEs_for_inceptionV1``).

Their files are PyTorch state dicts of a fully tied TopK SAE (``Top_K_SAE`` in the
author's notebooks): ``W_enc.weight`` [latents, width] (an ``nn.Linear`` without bias, its
transpose the decoder), ``b_pre`` [width] (our ``b_dec``) and ``b_latent`` [latents] (our
``b_enc``), with k = 32. ``from_author_state_dict`` converts one to our ``TopKSAE``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .sae import TopKSAE

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


def fetch_author_sae(layer: str, cache_dir: str | Path | None = None) -> TopKSAE:
    """Download (once) and convert the author's SAE for ``layer``."""
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        filename = author_file_for(layer, list_repo_files(REPO_ID))
        path = hf_hub_download(REPO_ID, filename, cache_dir=cache_dir)
    except AuthorSAEUnavailable:
        raise
    except Exception as e:  # offline: connection errors of several kinds
        raise AuthorSAEUnavailable(
            f"could not fetch the paper's SAE for {layer} from the Hugging Face hub ({REPO_ID}): {e}. "
            "This needs internet once; or train SAEs here (SAE_SAES=train, the default)") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return from_author_state_dict(state)
