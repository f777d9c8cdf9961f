"""A TopK sparse autoencoder (Gao et al. 2024), as trained in the paper, and the families that followed it.

    z  = TopK(W_enc (x - b_dec) + b_enc)      ReLU on the k kept values, 0 elsewhere
    x' = W_dec z + b_dec

x: [batch, d_in]; z: [batch, d_sae]. Weights are kept in SAELens' layout: ``W_enc`` [d_in, d_sae], ``W_dec``
[d_sae, d_in] (row i of ``W_dec`` is latent i's decoder direction, whose split over the branches the paper measures).

tied="full": one matrix, W_dec = W_enc^T throughout training (the paper's released code).
tied="init": W_dec starts as W_enc^T, then trains separately with unit-norm rows and the
gradient's radial part projected out (Gao et al.).

Only the encoder's pre-activations are dense ([batch, d_sae]: the one big matmul). Past the
TopK everything works on the k kept latents: the decoder is a sparse gather-sum over them
(``kernels.sparse_decode``: ``embedding_bag``, or a Triton kernel on CUDA), and the
backward pass touches only their rows of W_enc and W_dec.

The other families (chapter 03, *Other SAE families*: BatchTopK, Matryoshka, JumpReLU) are the same
class with ``architecture`` set: a per-latent ``threshold`` [d_sae] that encodes them once trained
(``z = ReLU(p) [p > threshold]``, SAELens' jumprelu), trained by ``helpers.sae.families`` on the same sparse
machinery.
"""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from helpers.sae import screened_topk
from helpers.config import Architecture, Kernels, Tied
from helpers.files import CFG_FILE, WEIGHTS_FILE, atomic_write, write_json
from helpers.sae.kernels import CenteredPreacts, KeptPreacts, sparse_decode

TIED = typing.get_args(Tied)
ARCHITECTURES = typing.get_args(Architecture)
ENCODE_CHUNK = 1024
DENSE_AUX = 4  # AuxK by dense products while at most this many times aux_k latents are dead (forward_train)


class SparseCode(NamedTuple):
    values: torch.Tensor  # [batch, k] after ReLU
    indices: torch.Tensor  # [batch, k] latent ids


class TrainOutput(NamedTuple):
    x_hat: torch.Tensor  # [batch, d_in]
    code: SparseCode
    aux_recon: torch.Tensor | None  # [batch, d_in], AuxK reconstruction of the residual


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int = 32, tied: str = "full", *, seed: int | None = None,
                 kernels: Kernels | None = None, architecture: str = "topk", prefixes: int = 4):
        super().__init__()
        if tied not in TIED:
            raise ValueError(f"tied={tied!r}; choose 'full' (the paper's code) or 'init' (Gao et al.)")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={architecture!r}; choose from {', '.join(ARCHITECTURES)}")
        if not 0 < k <= d_sae:
            raise ValueError(f"k={k} must be between 1 and d_sae={d_sae}")
        self.d_in, self.d_sae, self.k, self.tied = d_in, d_sae, k, tied
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        directions = torch.randn(d_sae, d_in, generator=gen)
        directions /= directions.norm(dim=1, keepdim=True)
        self.encoder_weight = nn.Parameter(directions)  # [d_sae, d_in], row i = latent i's encoder
        self.decoder_weight = nn.Parameter(directions.clone()) if tied == "init" else None
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.architecture, self.prefixes = architecture, prefixes
        if architecture != "topk":  # BatchTopK, Matryoshka: one moving threshold; JumpReLU: learned, one per latent
            self.threshold = nn.Parameter(torch.zeros(d_sae), requires_grad=architecture == "jumprelu")
        if architecture == "jumprelu":  # the L0 penalty's weight, steered to the target L0 k (training state)
            self.l0_coef = nn.Parameter(torch.ones(()), requires_grad=False)
            self.bandwidth = nn.Parameter(torch.ones(()), requires_grad=False)  # the STE's kernel width
        self.encode_chunk: int | None = ENCODE_CHUNK  # rows per pre-activation chunk on CPU (None: all)
        self.kernels = kernels or Kernels()  # which fast paths compute it (all exact; the training config's)

    # --- weights in SAELens' layout ---------------------------------------------------
    @property
    def W_enc(self) -> torch.Tensor:
        """[d_in, d_sae]."""
        return self.encoder_weight.T

    @property
    def W_dec(self) -> torch.Tensor:
        """[d_sae, d_in]; for tied='full' the same tensor as the encoder's rows."""
        return self.encoder_weight if self.decoder_weight is None else self.decoder_weight

    @property
    def decoder_directions(self) -> torch.Tensor:
        """[d_sae, d_in]: latent i writes ``z_i * W_dec[i]`` into the layer."""
        return self.W_dec

    # --- the model ----------------------------------------------------------------------
    def preacts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense encoder pre-activations ``W_enc (x - b_dec) + b_enc``, [batch, d_sae]."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.encoder_weight.T)

    def encode_topk(self, x: torch.Tensor) -> SparseCode:
        """The k kept latents per vector: values [batch, k] (after ReLU) and their indices. A threshold family's
        vectors keep different numbers: [batch, the most any vector keeps], padded with zeros."""
        if self.architecture != "topk":
            z = self.encode(x)
            values, indices = z.topk(max(1, int((z > 0).sum(-1).max())) if len(z) else 1, dim=-1)
            return SparseCode(values, indices)
        return self._topk(x, self.k)[0]

    def _topk(self, x, k, dead: torch.Tensor | None = None, aux_k: int = 0):
        x_c = (x - self.b_dec).detach()  # made once: the TopK's matmul and the backward pass's weight gradient
        kept, idx, aux_kept, aux_idx = self._select(x_c, k, dead, aux_k)
        code = SparseCode(F.relu(self._kept(x, x_c, idx, kept)), idx)
        aux = SparseCode(F.relu(self._kept(x, x_c, aux_idx, aux_kept)), aux_idx) if aux_k else None
        return code, aux

    def _kept(self, x, x_c, idx, values):
        """The kept pre-activations, differentiable in x, b_dec, the encoder and b_enc (``KeptPreacts``)."""
        return KeptPreacts.apply(x, self.b_dec, self.encoder_weight, self.b_enc, idx, values.float(), x_c, self.kernels)

    @torch.no_grad()
    def _select(self, x_c, k, dead, aux_k):
        """The top k pre-activations per row (and the top aux_k among dead latents).

        On a CPU that multiplies bf16 in hardware (AMX, AVX512-BF16) the float32 product is not made at all: ``screened_topk`` finds the
        same TopK from a bf16 product and a proven bound on its error, and rescores only the
        latents the bound leaves in doubt (AuxK's top among the dead latents, if asked for,
        from the dead latents' own float32 product). Elsewhere on a CPU the dense
        pre-activations are made ``encode_chunk`` rows at a time into one reused buffer, each
        chunk reduced to its TopK before the next (``screened_topk.topk_rows``, which ranks only
        the entries above the k-th largest of 128 block maxima; torch's ``topk`` with
        ``Kernels(cpu_topk=False)``): the dense buffer is [encode_chunk, d_sae] instead of
        [batch, d_sae], at the same speed or slightly better (1024 rows, measured against one
        matmul). On CUDA one matmul is best.
        """
        n = x_c.shape[0]
        if screened_topk.enabled(x_c, self.encoder_weight, k, self.kernels.screen) and (not aux_k or 2 * int(dead.sum()) <= self.d_sae):
            found = screened_topk.screened_topk(x_c, self.encoder_weight, self.b_enc, k, self.encode_chunk or n)
            if found is not None:
                if not aux_k:
                    return (*found, None, None)
                dead_ids = dead.nonzero().flatten()
                pre = torch.addmm(self.b_enc[dead_ids], x_c, self.encoder_weight[dead_ids].T)
                aux_kept, at = pre.topk(aux_k, dim=-1, sorted=False)
                return (*found, aux_kept, dead_ids[at])
        chunk = n if (self.encode_chunk is None or x_c.is_cuda) else min(self.encode_chunk, n)
        w = self.encoder_weight.T
        if x_c.is_cuda:
            pre = torch.addmm(self.b_enc, x_c, w)
            kept, idx = pre.topk(k, dim=-1, sorted=False)
            if not aux_k:
                return kept, idx, None, None
            return (kept, idx, *pre.masked_fill_(~dead, float("-inf")).topk(aux_k, dim=-1, sorted=False))
        kept = x_c.new_empty(n, k)
        idx = torch.empty(n, k, dtype=torch.long, device=x_c.device)
        aux_kept = x_c.new_empty(n, aux_k) if aux_k else None
        aux_idx = torch.empty(n, aux_k, dtype=torch.long, device=x_c.device) if aux_k else None
        buf = x_c.new_empty(chunk, self.d_sae)
        fast = self.kernels.cpu_topk  # screened_topk.topk_rows: the same TopK, ranking only the entries it must
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            pre = torch.addmm(self.b_enc, x_c[s:e], w, out=buf[: e - s])
            if not (fast and screened_topk.topk_rows(pre, k, kept[s:e], idx[s:e])):
                torch.topk(pre, k, dim=-1, sorted=False, out=(kept[s:e], idx[s:e]))
            if aux_k:
                torch.topk(pre.masked_fill_(~dead, float("-inf")), aux_k, dim=-1, sorted=False,
                           out=(aux_kept[s:e], aux_idx[s:e]))
        return kept, idx, aux_kept, aux_idx

    def decode_topk(self, code: SparseCode, bias: bool = True) -> torch.Tensor:
        """Sum of the kept latents' decoder rows, [batch, d_in]; no dense [batch, d_sae]."""
        out = sparse_decode(code.indices, code.values, self.W_dec, use_triton=self.kernels.triton,
                            dense_scatter=self.kernels.scatter == "dense")
        return out + self.b_dec if bias else out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents z [batch, d_sae] (zeros except the k kept), as SAELens' ``encode``."""
        if self.architecture != "topk":
            pre = self.preacts(x)
            return torch.relu(pre) * (pre > self.threshold)
        code = self.encode_topk(x)
        return torch.zeros(x.shape[0], self.d_sae, dtype=code.values.dtype, device=x.device).scatter_(
            1, code.indices, code.values)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Dense latents z [batch, d_sae] -> x' [batch, d_in]."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.architecture != "topk":
            return self.decode(self.encode(x))
        return self.decode_topk(self.encode_topk(x))

    def forward_train(self, x: torch.Tensor, dead: torch.Tensor | None = None, aux_k: int = 0) -> TrainOutput:
        """Reconstruction plus, when ``dead`` [d_sae] marks dead latents, the AuxK code."""
        n_dead = int(dead.sum()) if (aux_k and dead is not None) else 0
        aux_k = min(aux_k, n_dead)
        if aux_k and n_dead <= DENSE_AUX * aux_k and not x.is_cuda:  # (CUDA keeps the sparse path its checks cover)
            code = self._topk(x, self.k)[0]
            return TrainOutput(self.decode_topk(code), code, self._dense_aux(x, dead, aux_k))
        code, aux = self._topk(x, self.k, dead, aux_k)
        aux_recon = self.decode_topk(aux, bias=False) if aux is not None else None
        return TrainOutput(self.decode_topk(code), code, aux_recon)

    def _dense_aux(self, x, dead, aux_k):
        """AuxK's reconstruction as dense products over the dead latents only: their pre-activations [batch, n_dead],
        each row's top aux_k kept (all, where n_dead <= aux_k), ReLU, times their decoder rows; autograd's gradients.
        Where few latents are dead (training's usual state) this is a few small products instead of the sparse
        path's gathers of aux_k rows per vector (measured in bench/README). Tied, the rows are gathered once (a gather's
        gradient is a whole [d_sae, d_in] matrix, mostly zeros)."""
        ids = dead.nonzero().flatten()
        pre = CenteredPreacts.apply(x, self.b_dec, rows := self.encoder_weight[ids], self.b_enc[ids])
        code = F.relu(pre)
        if aux_k < len(ids):
            code = code * torch.zeros_like(pre).scatter_(1, pre.detach().topk(aux_k, dim=-1, sorted=False).indices, 1.0)
        return code @ (rows if self.decoder_weight is None else self.W_dec[ids])

    # --- Gao et al.'s decoder constraint (tied="init") ------------------------------------
    @torch.no_grad()
    def remove_radial_grad(self) -> None:
        """Project out the gradient component parallel to each decoder row."""
        w = self.decoder_weight
        if w is not None and w.grad is not None:
            w.grad.addcmul_(torch.linalg.vecdot(w.grad, w)[:, None], w, value=-1)  # g -= (g . w) w, row by row

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.decoder_weight is not None:
            self.decoder_weight /= self.decoder_weight.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def fit_scale(self, x: torch.Tensor) -> float:
        """Scale the encoder so the first reconstruction of the sample x is the least-squares best
        (chapter 03, *The start*; b_enc must still be 0). Returns the factor applied to the encoder."""
        from helpers.sae.loss import least_squares_scale

        if self.architecture == "topk":
            r = self.forward(x) - self.b_dec
        else:  # the threshold families start from the BatchTopK code (homogeneous in the scale too)
            from helpers.sae.loss import batchtopk_code

            r = batchtopk_code(self.preacts(x), self.k) @ self.W_dec
        s = least_squares_scale(x - self.b_dec, r)
        if s <= 0 or not math.isfinite(s):
            return 1.0  # no positive scale improves on it (the code anti-aligned with the sample): keep
        factor = s if self.decoder_weight is not None else math.sqrt(s)  # tied throughout: s^2 r
        self.encoder_weight.mul_(factor)
        return factor

    # --- saving, in a layout SAELens' SAE.load_from_disk reads ---------------------------
    def config(self) -> dict:
        """SAELens' fields: a TopK SAE is its ``topk``; the others encode as its ``jumprelu`` (``family`` says how
        the SAE was trained; ``k`` is a BatchTopK's mean L0 or a JumpReLU's target)."""
        family = {} if self.architecture == "topk" else {"family": self.architecture, "prefixes": self.prefixes}
        return {
            "architecture": "topk" if self.architecture == "topk" else "jumprelu", **family,
            "d_in": self.d_in, "d_sae": self.d_sae, "k": self.k,
            "activation_fn_kwargs": {"k": self.k} if self.architecture == "topk" else {}, "apply_b_dec_to_input": True,
            "normalize_activations": "none", "dtype": "float32", "device": "cpu", "tied": self.tied,
        }

    @property
    def metadata(self) -> dict:
        """Where the SAE came from (layer, branch slices, weights, training), as saved in ``cfg.json``."""
        return getattr(self, "cfg", {}).get("metadata", {})

    def save(self, directory: str | Path, **metadata) -> Path:
        """Write ``cfg.json`` (architecture and sizes; provenance ``metadata`` under its own key, as
        SAELens keeps it) and the weights."""
        from safetensors.torch import save as save_bytes

        directory = Path(directory)
        tensors = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}
        if self.architecture != "topk":
            tensors["threshold"] = self.threshold
        # copies: W_enc and W_dec of a tied SAE are one tensor, which safetensors will not write twice
        data = save_bytes({k: v.detach().float().cpu().clone(memory_format=torch.contiguous_format)
                           for k, v in tensors.items()})
        atomic_write(directory / WEIGHTS_FILE, lambda f: f.write(data))
        self.cfg = {**self.config(), "metadata": metadata}
        write_json(directory / CFG_FILE, self.cfg)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "TopKSAE":
        """Read a saved SAE; a malformed directory raises ``ValueError`` naming the file, the key and the fix."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
        if not cfg_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"{directory} is not a saved SAE: it needs {CFG_FILE} and {WEIGHTS_FILE}")
        fix = "save the SAE again (TopKSAE.save, or train it)"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not readable JSON ({e}); {fix}") from e
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not an SAE config object; {fix}")
        if cfg.get("architecture") not in ("topk", "jumprelu"):
            raise ValueError(f"{cfg_path}: architecture {cfg.get('architecture')!r}; this loader reads 'topk' and "
                             f"'jumprelu' SAEs (every family chapter 03 trains)")
        family = cfg.get("family", "jumprelu") if cfg["architecture"] == "jumprelu" else "topk"
        if family not in ARCHITECTURES or (family == "topk") != (cfg["architecture"] == "topk"):
            raise ValueError(f"{cfg_path}: family {family!r} with architecture {cfg['architecture']!r}; a topk SAE has "
                             f"no family, the others one of {', '.join(ARCHITECTURES[1:])}; {fix}")
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or (1 if family != "topk" else None)
        sizes = {"d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"), "k": k}
        bad = [f"{key}={value!r}" for key, value in sizes.items()
               if isinstance(value, bool) or not isinstance(value, int) or value < 1]
        if bad:
            raise ValueError(f"{cfg_path}: {', '.join(bad)} (each must be a whole number >= 1); {fix}")
        tied = cfg.get("tied", "init")
        if tied not in TIED or k > sizes["d_sae"]:
            raise ValueError(f"{cfg_path}: tied={tied!r} (choose from {', '.join(TIED)}) with k={k}, "
                             f"d_sae={sizes['d_sae']} (k at most d_sae); {fix}")
        try:
            tensors = load_file(weights_path)
        except Exception as e:  # truncated or not a safetensors file
            raise ValueError(f"{weights_path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                             f"{fix}") from e
        d_in, d_sae = sizes["d_in"], sizes["d_sae"]
        shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
        if family != "topk":
            shapes["threshold"] = (d_sae,)
        wrong = [f"{key} {tuple(tensors[key].shape) if key in tensors else 'missing'} (want {shape})"
                 for key, shape in shapes.items() if key not in tensors or tuple(tensors[key].shape) != shape]
        if wrong:
            raise ValueError(f"{weights_path} does not match {CFG_FILE}: {'; '.join(wrong)}; {fix}")
        broken = [key for key in shapes if not torch.isfinite(tensors[key]).all()]
        if broken:
            raise ValueError(f"{weights_path}: {', '.join(broken)} hold NaN or infinite numbers (a diverged training or "
                             f"a damaged file); {fix}")
        if tied == "full" and not torch.equal(tensors["W_enc"].T, tensors["W_dec"]):
            raise ValueError(f"{directory} says tied='full' but its W_enc is not W_dec^T; {fix}")
        sae = cls(d_in, d_sae, k, tied, architecture=family, prefixes=int(cfg.get("prefixes", 4)))
        with torch.no_grad():
            if family != "topk":
                sae.threshold.copy_(tensors["threshold"])
            sae.encoder_weight.copy_(tensors["W_enc"].T)
            if sae.decoder_weight is not None:
                sae.decoder_weight.copy_(tensors["W_dec"])
            sae.b_enc.copy_(tensors["b_enc"])
            sae.b_dec.copy_(tensors["b_dec"])
        sae.cfg = cfg
        return sae.to(device)


# --- firing statistics ----------------------------------------------------------------------
class InputScaleMismatch(ValueError):
    """An SAE trained on activations of one input convention, asked to encode another's."""


def check_input_scale(sae: TopKSAE, input_scale: str, where) -> None:
    """Refuse to encode activations of images fed in another convention (``input_scale``: "lucent" or "unit")
    than the SAE's vectors were: the activations of [0, 1] inputs and of ``x*255-117`` inputs are two
    different distributions. An SAE that records no convention (a bring-your-own ``.npy``) is not checked."""
    theirs = sae.metadata.get("input_scale")
    if theirs is not None and theirs != input_scale:
        raise InputScaleMismatch(
            f"the SAE in {where} was trained on activations of {theirs!r} inputs, but the images it would encode "
            f"come as {input_scale!r} inputs (inception.INPUT_SCALES). Harvest again with --input-scale {theirs} "
            "(a new --out), or use an SAE trained on this harvest")


def input_scale_for(sae: TopKSAE, asked: str | None, where: str = "the SAE") -> str:
    """The input convention to feed the network for ``sae``: ``asked``, refused where the SAE records another
    (``check_input_scale``); None: the SAE's own (an SAE that records none: "lucent", the model's)."""
    if asked is None:
        return sae.metadata.get("input_scale") or "lucent"
    check_input_scale(sae, asked, where)
    return asked


@torch.no_grad()
def firing_stats(sae: TopKSAE, batches) -> dict[str, torch.Tensor]:
    """Per latent over an iterable of [batch, d_in] tensors: how often it fires and how strongly.

    Returns frequency [d_sae] (fraction of vectors where it is active), mean_when_active
    [d_sae] and max [d_sae], plus n (vectors seen).
    """
    count = torch.zeros(sae.d_sae, dtype=torch.long)
    total = torch.zeros(sae.d_sae, dtype=torch.float64)
    peak = torch.zeros(sae.d_sae)
    n = 0
    for x in batches:
        code = sae.encode_topk(x)
        on = code.values > 0
        idx, val = code.indices[on].cpu(), code.values[on].float().cpu()
        count += torch.bincount(idx, minlength=sae.d_sae)
        total.index_add_(0, idx, val.double())
        peak.scatter_reduce_(0, idx, val, "amax")
        n += x.shape[0]
    return {"frequency": count.double() / max(n, 1), "mean_when_active": total / count.clamp_min(1),
            "max": peak, "n": torch.tensor(n)}
