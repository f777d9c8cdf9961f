"""InceptionV1 (Lucid's ``inception5h``, via Lucent): weights, layers, branch slices, input.

The paper studies the outputs of the mixed4a-mixed4e blocks. Each block concatenates four
branches along channels, in this order: 1x1, 3x3, 5x5 and pool (the pool branch's 1x1
projection). ``branch_slices`` reads the channel slice of each branch off the model itself,
by watching which branch output lands where in the concatenation, so nothing here is a
hard-coded width.

Input conventions (``INPUT_SCALES``): RGB pixels in [0, 1] mapped by ``x * 255 - 117``
(``"lucent"``: what Lucent's ``render_vis`` does for this model; not torchvision's mean/std
normalisation), or left in [0, 1] (``"unit"``: what the paper author's harvest fed the model,
since Lucent's ``forward`` does no preprocessing; the author's published SAEs were trained on
those activations). A store and every SAE record which one made them.
"""

from __future__ import annotations

import functools
import logging
import urllib.error
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

from helpers.config import BRANCHES, MIXED_LAYERS, PAPER_LAYERS, check_layers  # noqa: F401 (names of the model)
from helpers.data.layers import exact_fast_layers_
from helpers.data.suffix import forward_from
from helpers.files import sha256_file

# the module whose output is each branch's contribution to the concatenation
_BRANCH_MODULE = {"1x1": "{}_1x1", "3x3": "{}_3x3", "5x5": "{}_5x5", "pool": "{}_pool_reduce"}

LUCENT_URL = "https://github.com/ProGamerGov/pytorch-old-tensorflow-models/raw/master/inception5h.pth"
RANDOM_WARNING = (
    "InceptionV1 has RANDOM weights: everything computed from it tests the pipeline only "
    "and is not a result about the trained network"
)


# a state dict holding this key is a stand-in: random weights with Lucent's names and shapes, put where
# the download would be so that the real loading path runs offline; it is labelled random everywhere
STAND_IN_KEY = "_stand_in_random_weights"


def stand_in_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random InceptionV1 weights under Lucent's key names and shapes, marked as a stand-in."""
    InceptionV1 = lucent_inceptionv1()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = he_normal_(InceptionV1(pretrained=False), seed).state_dict()
    return {**state, STAND_IN_KEY: torch.tensor(seed)}


def lucent_inceptionv1() -> type[nn.Module]:
    """Lucent's InceptionV1 class, imported without running ``lucent.modelzoo``'s ``__init__`` until something
    else of that package is asked for. That ``__init__`` does ``from torchvision.models import *``, which imports
    every torchvision model and ``torch._dynamo`` with them: 1.3-1.8 s of every process that builds the network (each
    chapter's kernel, each harvest). The package is registered unexecuted (PEP 562: its ``__getattr__`` runs the
    real ``__init__`` on the first name it lacks), with ``inceptionv1`` bound as its ``__init__`` binds it."""
    import importlib
    import importlib.util
    import sys

    if "lucent.modelzoo" not in sys.modules:
        import lucent

        spec = importlib.util.find_spec("lucent.modelzoo")
        package = importlib.util.module_from_spec(spec)

        def __getattr__(name):  # noqa: N807 (a module's __getattr__, PEP 562)
            del package.__dict__["__getattr__"]
            spec.loader.exec_module(package)  # the package's own __init__, once
            return getattr(package, name)

        package.__getattr__ = __getattr__
        sys.modules["lucent.modelzoo"] = lucent.modelzoo = package
        try:  # bound as the package's __init__ binds it
            package.inceptionv1 = importlib.import_module("lucent.modelzoo.inceptionv1").InceptionV1
        except BaseException:  # no half-made package left behind: the next import tries the usual way
            del sys.modules["lucent.modelzoo"], lucent.modelzoo
            raise
    return importlib.import_module("lucent.modelzoo.inceptionv1").InceptionV1


class WeightsUnavailable(RuntimeError):
    """The pretrained weights could not be fetched or read."""


def lucent_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(LUCENT_URL).name


def load_model(weights: str = "lucent", device: str | torch.device = "cpu", *,
               redirected_relu: bool = False, seed: int = 0) -> tuple[nn.Module, str]:
    """Build Lucent's InceptionV1 and return ``(model, weights_id)`` in eval mode.

    weights: ``"lucent"`` (Lucent's pretrained file, downloaded once into the torch hub
    cache), ``"random"`` (explicitly random, seeded; for pipeline tests only), or a path to
    a ``.pth`` state dict (loaded with ``weights_only=True``).
    redirected_relu: Lucent's gradient-redirecting ReLU, useful for feature visualisation
    from a random start; leave it off for attribution (it changes gradients, not values).
    The ``weights_id`` names the weights in every artifact made with them.
    """
    InceptionV1 = lucent_inceptionv1()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InceptionV1(pretrained=False, redirected_ReLU=redirected_relu)
    exact_fast_layers_(model)
    if weights == "random":
        he_normal_(model, seed)
        weights_id = f"random(seed={seed})"  # He-normal: he_normal_
        log.warning(RANDOM_WARNING)
    else:
        state, path = _read_state(weights)
        stand_in = state.pop(STAND_IN_KEY, None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsUnavailable(
                f"{path} is not an InceptionV1 (inception5h) state dict: "
                f"missing {list(missing)[:3]}..., unexpected {list(unexpected)[:3]}..."
            )
        kind = "lucent" if weights == "lucent" else "file"
        weights_id = f"{kind}:{path.name}:sha256={sha256_file(path)[:16]}"
        if stand_in is not None:  # random weights where real ones would be: named and warned about as random
            weights_id = f"random(stand-in {path.name}, seed={int(stand_in)})"
            log.warning(RANDOM_WARNING)
    model.weights_id = weights_id
    return model.eval().requires_grad_(False).to(device), weights_id


INPUT_STD = 64.0  # about the standard deviation of ``x*255-117`` inputs over natural images


def he_normal_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that keep the activations' scale through depth: He-normal (std sqrt(2 / fan_in), the ReLU
    gain) for every convolution and the classifier, zero biases, and the first convolution divided by the input's
    scale, so every mixed layer's activations are of order 1 (torch's default init shrinks them about 2.4x per
    layer: with it, mixed5b is 1e-2 and every image gets the same output)."""
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for i, m in enumerate(layers):
        w = torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5
        m.weight.data.copy_(w / INPUT_STD if i == 0 else w)
        if m.bias is not None:
            m.bias.data.zero_()
    return model


@torch.no_grad()
def classifier_stats(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(each logit's mean [outputs], the logits' mean spread over the images) of the network on images ``x``
    (model inputs): what ``standardise_classifier_`` centres and scales by."""
    fc = model.softmax2_pre_activation_matmul
    seen = {}
    hook = fc.register_forward_hook(lambda module, inputs, out: seen.__setitem__("z", out))
    try:
        model(x)
    finally:
        hook.remove()
    z = seen["z"]
    return z.mean(dim=0), float(z.std(dim=0).mean().clamp_min(1e-12))


def standardise_classifier_(model: nn.Module, x: torch.Tensor | None = None,
                            stats: tuple[torch.Tensor, float] | None = None) -> nn.Module:
    """Centre and scale a random network's classifier on images ``x`` (model inputs): each output's logit has mean
    0 and the logits' spread over the images is 1, so different images get different outputs (a check of the
    spliced-in and switch-off measures that moves when they are wrong) without any class winning them all.
    ``stats``: ``classifier_stats`` measured before (a run keeps them), instead of ``x``."""
    mean, scale = stats if stats is not None else classifier_stats(model, x)
    fc = model.softmax2_pre_activation_matmul
    fc.weight.div_(scale)
    fc.bias.copy_((fc.bias - mean) / scale)
    return model


def _read_state(weights: str) -> tuple[dict, Path]:
    """(state dict, the file it came from) for ``weights`` "lucent" (downloaded once) or a path."""
    if weights == "lucent":
        try:
            state = torch.hub.load_state_dict_from_url(LUCENT_URL, progress=True, map_location="cpu",
                                                       weights_only=True)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            raise WeightsUnavailable(
                f"could not download the pretrained InceptionV1 weights from {LUCENT_URL} ({e}). "
                f"Download that file on a machine with internet and put it at {lucent_cache_path()}, "
                "or pass weights=PATH.pth (--weights PATH.pth); weights='random' runs the pipeline "
                "without meaning"
            ) from e
        return state, lucent_cache_path()
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailable(f"weights {weights!r} is neither 'lucent', 'random' nor an existing .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or a pickle that weights_only refuses (it never runs it)
        raise WeightsUnavailable(
            f"cannot read {path} as a PyTorch state dict ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "give Lucent's inception5h.pth or a file saved with torch.save(model.state_dict())") from e
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"{path} holds a {type(state).__name__}, not a state dict; save one with "
                                 "torch.save(model.state_dict())")
    return state, path


def is_stand_in(weights: str) -> bool:
    """Whether ``weights`` (``"lucent"``: the downloaded file; or a path) is a stand-in file of random
    weights (``STAND_IN_KEY`` inside), whatever its name says."""
    path = lucent_cache_path() if weights == "lucent" else Path(weights)
    if weights == "random" or not path.is_file():
        return False
    return _holds_stand_in_key(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _holds_stand_in_key(path: str, mtime_ns: int) -> bool:
    try:
        return STAND_IN_KEY in torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a state dict: loading it will say so
        return False


def is_random(weights_id: str) -> bool:
    return weights_id.startswith("random")


# Lucid's class names for this network (its modelzoo's labels_path, gs://modelzoo/labels/...), one per line in
# the order of the network's outputs; inception5h has 1008 outputs, the file names the meaningful ones.
CLASS_NAMES_URL = "https://storage.googleapis.com/modelzoo/labels/ImageNet_alternate.txt"


def class_names(weights_id: str) -> list[str] | None:
    """The names of the network's outputs, downloaded once beside the weights; None for random weights (whose
    outputs mean no class) or where the file cannot be had (offline: outputs are then named by index, with a
    warning naming the file to fetch)."""
    if is_random(weights_id):
        return None
    path = lucent_cache_path().with_name(Path(CLASS_NAMES_URL).name)
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(CLASS_NAMES_URL, str(path), progress=False)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            log.warning("the network's class names could not be downloaded from %s (%s); outputs are shown by "
                        "index. Put that file at %s to see names", CLASS_NAMES_URL, e, path)
            return None
    return path.read_text().splitlines()


def class_label(index: int, names: list[str] | None) -> str:
    """An output's name (``names`` from ``class_names``), or ``output <index>`` where none is known."""
    return names[index] if names is not None and index < len(names) else f"output {index}"


INPUT_SCALES = {"lucent": (255.0, -117.0), "unit": (1.0, 0.0)}  # name -> (scale, shift) of [0, 1] pixels


def model_input(pixels01: torch.Tensor, input_scale: str = "lucent") -> torch.Tensor:
    """RGB in [0, 1], [B, 3, H, W] -> the model's input under ``input_scale`` (``INPUT_SCALES``)."""
    if input_scale not in INPUT_SCALES:
        raise ValueError(f"input_scale {input_scale!r} is unknown; choose from {', '.join(INPUT_SCALES)}")
    scale, shift = INPUT_SCALES[input_scale]
    return pixels01 * scale + shift


def model_input_from_uint8(pixels: torch.Tensor, input_scale: str = "lucent") -> torch.Tensor:
    """uint8 RGB [B, 3, H, W] -> model input; equals ``model_input(pixels / 255, input_scale)``."""
    return model_input(pixels.float() / 255.0, input_scale)


class StopForward(RuntimeError):
    """Raised by a hook to end a forward pass where what it needs is computed: nothing after the hook's module runs
    (``LayerCapture``, ``kept.InputWatch``, feature visualisation; Lucent's render loop takes a RuntimeError for a
    layer it could not compute and goes on)."""


class LayerCapture:
    """Run the model and return the outputs of the named mixed layers.

    The forward pass stops right after the last requested layer, so capturing mixed4a-4e
    never computes mixed5a/5b or the classifier. One pass serves every layer.

    >>> acts = LayerCapture(model, ["mixed4a", "mixed4c"])(x)   # {name: [B, C, H, W]}
    """

    def __init__(self, model: nn.Module, layers):
        self.model = model
        self.layers = check_layers(layers)

    def __call__(self, x: torch.Tensor | None, start: tuple[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The layers' outputs on input ``x``; or, with ``start`` = (a tensor's name in the model's ``forward``,
        its value), from that tensor on (``suffix.forward_from``: the same numbers; ``x`` is not read)."""
        out: dict[str, torch.Tensor] = {}
        last = self.layers[-1]

        def hook_for(name):
            def hook(module, inputs, output):
                out[name] = output
                if name == last:
                    raise StopForward
            return hook

        handles = [getattr(self.model, name).register_forward_hook(hook_for(name)) for name in self.layers]
        try:
            self.model(x) if start is None else forward_from(self.model, *start)
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return out


@torch.no_grad()
def spliced_log_probs(model, layer: str, x: torch.Tensor | None, replace=None, acts=None) -> torch.Tensor:
    """The network's log class probabilities [B, classes] on input ``x``, with ``layer``'s output [B, C, H, W]
    replaced by ``replace(output)`` (None: the clean network). Taken from the logits in float64, so that the
    KL of two nearly equal distributions is not lost to rounding. ``acts``: ``layer``'s clean output on ``x``,
    where a caller has it (``clean_pass``): then only the layers after ``layer`` run, on ``replace(acts)``, with
    the same numbers (``x`` is not read)."""
    logits = {}
    hooks = [model.softmax2_pre_activation_matmul.register_forward_hook(
        lambda module, inputs, out: logits.__setitem__("z", out))]
    if replace is not None and acts is None:
        hooks.append(getattr(model, layer).register_forward_hook(lambda module, inputs, out: replace(out)))
    try:
        if acts is None:
            model(x)
        else:
            forward_from(model, layer, acts if replace is None else replace(acts))
    finally:
        for h in hooks:
            h.remove()
    return torch.log_softmax(logits["z"].double(), dim=-1)


def clean_pass(model, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean network's log class probabilities on ``x`` and ``layer``'s output [B, C, H, W], from one pass."""
    seen = {}
    log_probs = spliced_log_probs(model, layer, x, lambda a: seen.__setitem__("acts", a))  # the hook only looks
    return log_probs, seen["acts"]


def branch_slices(model: nn.Module, layers=MIXED_LAYERS) -> dict[str, dict[str, tuple[int, int]]]:
    """Channel range ``(start, stop)`` of each branch in each layer, read off the model.

    A forward pass on a small input records every branch module's output tensor and the
    tensors handed to each layer's concatenation; the position of each branch's tensor in
    that list, and the widths before it, give its slice.
    """
    layers = check_layers(layers)
    produced: dict[int, tuple[str, str]] = {}
    concatenated: dict[str, list[torch.Tensor]] = {}
    handles = []
    for layer in layers:
        for branch, pattern in _BRANCH_MODULE.items():
            module = getattr(model, pattern.format(layer))
            handles.append(module.register_forward_hook(
                lambda m, i, o, key=(layer, branch): produced.__setitem__(id(o), key)))
        handles.append(getattr(model, layer).register_forward_pre_hook(
            lambda m, args, layer=layer: concatenated.__setitem__(layer, list(args[0]))))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            LayerCapture(model, layers)(torch.zeros(1, 3, 64, 64, device=device))
    finally:
        for h in handles:
            h.remove()
    slices: dict[str, dict[str, tuple[int, int]]] = {}
    for layer in layers:
        start, slices[layer] = 0, {}
        for t in concatenated[layer]:
            owner = produced.get(id(t))
            if owner is None or owner[0] != layer:
                raise RuntimeError(f"{layer}: a concatenated tensor does not come from a known branch")
            slices[layer][owner[1]] = (start, start + t.shape[1])
            start += t.shape[1]
        if set(slices[layer]) != set(BRANCHES):
            raise RuntimeError(f"{layer}: found branches {sorted(slices[layer])}, expected {BRANCHES}")
    return slices


def architecture_slices(layer: str) -> dict[str, tuple[int, int]]:
    """``branch_slices`` of one layer when no model is at hand: the branch layout is the
    architecture's, the same for any weights, so it is read off a random-weight model once (every layer's)."""
    return _all_architecture_slices()[check_layers([layer])[0]]


@functools.lru_cache(maxsize=None)
def _all_architecture_slices() -> dict[str, dict[str, tuple[int, int]]]:
    return branch_slices(load_model("random")[0], MIXED_LAYERS)


def layer_width(slices: dict[str, tuple[int, int]]) -> int:
    return max(stop for _, stop in slices.values())
