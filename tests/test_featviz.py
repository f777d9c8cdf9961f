
import numpy as np
import torch
import torch.nn.functional as F

from helpers.analysis import featviz
from helpers.analysis.featviz import FeatvizConfig, render_directions, render_features
from helpers.data.inception import LayerCapture, branch_slices, load_model
from helpers.sae.model import TopKSAE


def redness(images: np.ndarray) -> np.ndarray:
    return (images[..., 0] - images[..., 1:].mean(-1)).mean(axis=(1, 2))


def test_visualising_a_planted_red_direction_makes_red_images():
    """mixed4b's 5x5 branch is made to respond to red (differentiably); optimising its
    direction must turn the image red."""
    model = load_model("random", redirected_relu=True)[0]
    u = torch.rand(64)
    u /= u.norm()
    state = {}
    model.register_forward_pre_hook(lambda m, args: state.__setitem__("x", args[0]))

    def plant(m, inputs, output):
        rgb = (state["x"] + 117) / 255
        red = F.relu(rgb[:, 0] - rgb[:, 1:].mean(1))[:, None]
        return output + 50 * F.adaptive_avg_pool2d(red, output.shape[2:]) * u[None, :, None, None]

    model.mixed4b_5x5.register_forward_hook(plant)
    s, e = branch_slices(load_model("random")[0], ["mixed4b"])["mixed4b"]["5x5"]
    direction = torch.zeros(2, 512)
    direction[:, s:e] = u
    start = render_directions(model, "mixed4b", direction, FeatvizConfig(steps=1, size=48, lr=0.05))
    end = render_directions(model, "mixed4b", direction, FeatvizConfig(steps=30, size=48, lr=0.3))
    assert (redness(end) > redness(start) + 0.05).all(), (redness(start), redness(end))
    # Lucent's own hooks are removed afterwards; the planted one stays
    assert not model.mixed4b._forward_hooks and len(model.mixed4b_5x5._forward_hooks) == 1


def test_renders_are_cached_and_only_missing_ones_are_made(tmp_path, monkeypatch):
    sae = TopKSAE(512, 16, 4, "full", seed=0)
    sae.save(tmp_path / "sae")
    calls = []

    def fake(model, layer, directions, cfg):
        calls.append(len(directions))
        return np.random.rand(len(directions), cfg.size, cfg.size, 3)

    monkeypatch.setattr(featviz, "render_directions", fake)
    cfg = FeatvizConfig(steps=2, size=32, batch=3)
    paths = render_features(None, "mixed4c", sae, tmp_path / "sae", [0, 1, 2, 3, 4], tmp_path / "cache", cfg)
    assert calls == [3, 2] and all(p.exists() for p in paths.values())
    render_features(None, "mixed4c", sae, tmp_path / "sae", [0, 1, 2, 3, 4, 5], tmp_path / "cache", cfg)
    assert calls == [3, 2, 1]  # only feature 5 was missing
    render_features(None, "mixed4c", sae, tmp_path / "sae", [0], tmp_path / "cache", FeatvizConfig(steps=3, size=32))
    assert calls == [3, 2, 1, 1]  # other settings, other cache entry


def test_the_fast_layers_give_lucents_gradients_and_images_bit_for_bit(monkeypatch):
    """load_model's redirected ReLU (one ``where``), max pools and local response norms (Numba kernels, forward and
    backward) against Lucent's own network with torch's functions: the same gradient through the whole network, and
    the same rendered images."""
    import importlib

    from lucent.modelzoo.inceptionv1 import helper_layers

    ours = load_model("random", redirected_relu=True)[0]
    assert not [m for m in ours.modules() if isinstance(m, (helper_layers.RedirectedReluLayer, helper_layers.MaxPool2dLayer))]
    lucent_module = importlib.import_module("lucent.modelzoo.inceptionv1.InceptionV1")
    ours_f = lucent_module.F
    monkeypatch.setattr(lucent_module, "F", torch.nn.functional)  # Lucent's network as Lucent has it
    lucents = lucent_module.InceptionV1(pretrained=False, redirected_ReLU=True).eval().requires_grad_(False)
    lucents.load_state_dict(ours.state_dict())
    assert sum(isinstance(m, helper_layers.RedirectedReluLayer) for m in lucents.modules()) == 57
    x = torch.randn(2, 3, 64, 64) * 60
    grads = []
    for model in (ours, lucents):
        monkeypatch.setattr(lucent_module, "F", ours_f if model is ours else torch.nn.functional)
        xi = x.clone().requires_grad_(True)
        out = LayerCapture(model, ["mixed4a"])(xi)["mixed4a"]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append(xi.grad)
    assert torch.equal(*grads) and (grads[0] != 0).any()
    monkeypatch.setattr(lucent_module, "F", ours_f)
    plain = load_model("random")[0]
    xi = x.clone().requires_grad_(True)
    out = LayerCapture(plain, ["mixed4a"])(xi)["mixed4a"]
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    assert not torch.equal(xi.grad, grads[0])  # the redirection is there: a plain ReLU's gradient differs
    direction = torch.randn(2, 508)
    cfg = FeatvizConfig(steps=3, size=32)
    first = render_directions(ours, "mixed4a", direction, cfg)
    np.random.seed(12345)  # Lucent's jitter, scale and angle come from numpy's global generator: seeded by the render
    with monkeypatch.context() as m:
        m.setattr(lucent_module, "F", torch.nn.functional)
        assert np.array_equal(first, render_directions(lucents, "mixed4a", direction, cfg))
    assert not np.array_equal(first, render_directions(ours, "mixed4a", direction, FeatvizConfig(steps=3, size=32, seed=1)))
    assert np.random.randint(1 << 30) == np.random.RandomState(12345).randint(1 << 30)  # and its state restored


def test_a_runs_feature_visualisation_network_is_on_the_device_lucent_optimises_on(tmp_path, monkeypatch):
    """Lucent puts the images it optimises (and its transforms' tensors) on its first GPU wherever there is one; the
    run's network for feature visualisation goes there too (it was built on the CPU, so chapter 07 would have failed
    on a GPU runtime with tensors on two devices)."""
    from lucent.optvis.param import spatial

    from helpers.analysis import featviz
    from helpers.run import artifacts

    asked = []
    monkeypatch.setattr(artifacts, "load_model", lambda weights, device="cpu", **kw: (asked.append(str(device)), None))
    run = artifacts.open_run("smoke", run_dir=str(tmp_path / "run"))
    monkeypatch.setattr(spatial, "device", torch.device("cuda:0"))  # what Lucent picks on a machine with a GPU
    run.featviz_model()
    assert asked == ["cuda:0"] == [str(featviz.lucent_device())]
