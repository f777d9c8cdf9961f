import urllib.error

import pytest
import torch

from helpers.config import MIXED_LAYERS
from helpers.data.inception import (PAPER_LAYERS, LayerCapture, WeightsUnavailable, architecture_slices, branch_slices,
                               check_layers, clean_pass, layer_width, load_model, lucent_cache_path, model_input,
                               model_input_from_uint8, spliced_log_probs)

# widths per branch (1x1, 3x3, 5x5, pool) as listed in PAPER.md, read from the paper's sources
PAPER_WIDTHS = {
    "mixed4a": (192, 204, 48, 64),
    "mixed4b": (160, 224, 64, 64),
    "mixed4c": (128, 256, 64, 64),
    "mixed4d": (112, 288, 64, 64),
    "mixed4e": (256, 320, 128, 128),
}


def test_branch_slices_match_the_paper(random_model):
    slices = branch_slices(random_model, PAPER_LAYERS)
    for layer, widths in PAPER_WIDTHS.items():
        got = [slices[layer][b] for b in ("1x1", "3x3", "5x5", "pool")]
        assert [stop - start for start, stop in got] == list(widths)
        assert got[0][0] == 0 and all(a[1] == b[0] for a, b in zip(got, got[1:]))  # contiguous, in order
        assert layer_width(slices[layer]) == sum(widths)
    assert slices["mixed4c"]["5x5"] == (384, 448)
    assert layer_width(slices["mixed4a"]) == 508
    for layer, widths in PAPER_WIDTHS.items():  # without a model at hand: the same layout
        got = [architecture_slices(layer)[b] for b in ("1x1", "3x3", "5x5", "pool")]
        assert [stop - start for start, stop in got] == list(widths)


def test_branch_slices_locate_each_branch_output(random_model):
    """The slice really holds that branch's output: compare with the branch module's own output."""
    seen = {}
    handle = random_model.mixed4d_5x5.register_forward_hook(lambda m, i, o: seen.__setitem__("5x5", o))
    try:
        with torch.no_grad():
            acts = LayerCapture(random_model, ["mixed4d"])(model_input(torch.rand(1, 3, 224, 224)))
    finally:
        handle.remove()
    start, stop = branch_slices(random_model, ["mixed4d"])["mixed4d"]["5x5"]
    assert torch.equal(acts["mixed4d"][:, start:stop], seen["5x5"])


def test_capture_equals_full_forward_and_stops_early(random_model):
    x = model_input(torch.rand(2, 3, 224, 224))
    reference, mixed5b_calls = {}, []
    hooks = [getattr(random_model, n).register_forward_hook(lambda m, i, o, n=n: reference.__setitem__(n, o))
             for n in ("mixed4b", "mixed4e")]
    with torch.no_grad():
        random_model(x)  # the whole network, classifier included
    for h in hooks:
        h.remove()
    spy = random_model.mixed5b.register_forward_hook(lambda *a: mixed5b_calls.append(1))
    try:
        with torch.no_grad():
            captured = LayerCapture(random_model, ["mixed4e", "mixed4b"])(x)
    finally:
        spy.remove()
    assert set(captured) == {"mixed4b", "mixed4e"}
    for name in captured:
        assert torch.equal(captured[name], reference[name])
    assert mixed5b_calls == []  # the forward pass stopped after mixed4e
    assert captured["mixed4e"].shape[1:] == (832, 14, 14)


def test_the_network_from_a_layer_on_is_the_whole_network_with_that_output_replaced(random_model):
    """Chapter 03's spliced-in cases run only the layers after the replaced one (``acts``): for every layer, the
    log probabilities bit for bit those of the whole network with a hook that replaces the output (torch's own
    forward), the clean output and an edited one; a network whose later layers read an earlier value is refused."""
    from helpers.data.suffix import forward_from

    x = model_input(torch.rand(3, 3, 224, 224))
    for layer in ("conv2d0", "mixed3a", *MIXED_LAYERS):
        clean, acts = clean_pass(random_model, layer, x)
        edited = acts.flip(0) * 0.7 + 0.05
        assert torch.equal(spliced_log_probs(random_model, layer, None, acts=acts), clean)
        assert torch.equal(spliced_log_probs(random_model, layer, None, lambda a: a.flip(0) * 0.7 + 0.05, acts=acts),
                           spliced_log_probs(random_model, layer, x, lambda _: edited))
    assert not torch.equal(edited, acts)

    class Skip(torch.nn.Module):  # a residual connection: the output after ``b`` reads ``a`` too
        def forward(self, x):
            a = x + 1
            b = a * 2
            return b + a

    with pytest.raises(ValueError, match=r"reads \['a'\] after 'b'"):
        forward_from(Skip(), "b", torch.ones(1))
    with pytest.raises(ValueError, match="assigns 'c' 0 times"):
        forward_from(Skip(), "c", torch.ones(1))


def test_unknown_layer_lists_valid_ones():
    with pytest.raises(ValueError, match="mixed4z.*choose from mixed3a.*mixed4e"):
        check_layers("mixed4a,mixed4z")
    assert check_layers("mixed4e, mixed4a") == ("mixed4a", "mixed4e")


def test_input_scale():
    u = torch.tensor([[[[0, 117, 255]]]], dtype=torch.uint8).expand(1, 3, 1, 3)
    assert torch.allclose(model_input_from_uint8(u)[0, 0, 0], torch.tensor([-117.0, 0.0, 138.0]))
    assert torch.allclose(model_input(torch.tensor([0.0, 1.0])), torch.tensor([-117.0, 138.0]))


def test_offline_lucent_weights_fail_with_url_and_cache_path(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailable) as e:
        load_model("lucent")
    assert "https://github.com/ProGamerGov" in str(e.value) and str(lucent_cache_path()) in str(e.value)


def test_weights_from_a_pth_file(tmp_path, random_model):
    path = tmp_path / "w.pth"
    torch.save(load_model("random", seed=7)[0].state_dict(), path)
    model, weights_id = load_model(str(path))
    assert weights_id.startswith("file:w.pth:sha256=")
    reference = load_model("random", seed=7)[0]
    assert torch.equal(model.mixed4c_5x5_pre_relu_conv.weight, reference.mixed4c_5x5_pre_relu_conv.weight)
    assert not torch.equal(model.mixed4c_5x5_pre_relu_conv.weight, random_model.mixed4c_5x5_pre_relu_conv.weight)

    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsUnavailable, match="not an InceptionV1"):
        load_model(str(tmp_path / "bad.pth"))
    with pytest.raises(WeightsUnavailable, match="neither 'lucent', 'random'"):
        load_model(str(tmp_path / "missing.pth"))


def test_random_weights_are_labelled(caplog):
    _, weights_id = load_model("random", seed=3)
    assert weights_id == "random(seed=3)"
    assert "RANDOM weights" in caplog.text


def test_weights_that_are_not_a_state_dict_are_named(tmp_path):
    import pickle

    (tmp_path / "notes.pth").write_text("these are not weights")
    with pytest.raises(WeightsUnavailable, match=r"cannot read .*notes.pth as a PyTorch state dict .*torch.save"):
        load_model(str(tmp_path / "notes.pth"))

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(WeightsUnavailable, match="evil.pth as a PyTorch state dict"):
        load_model(str(tmp_path / "evil.pth"))  # refused by weights_only, never run
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsUnavailable, match="holds a list, not a state dict"):
        load_model(str(tmp_path / "list.pth"))


def test_class_names_are_fetched_once_and_fall_back_to_indices(tmp_path, monkeypatch, caplog):
    """The names of the outputs come from Lucid's label file (served here from this machine), are kept beside
    the weights and not fetched again; offline, and for random weights, outputs are named by index."""
    import functools
    import http.server
    import threading

    from helpers.data import inception

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    served = tmp_path / "served"
    served.mkdir()
    (served / "ImageNet_alternate.txt").write_text("dummy\nkit fox\nEnglish setter\n")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(inception, "CLASS_NAMES_URL",
                            f"http://127.0.0.1:{server.server_address[1]}/ImageNet_alternate.txt")
        names = inception.class_names("lucent:inception5h.pth:sha256=0123")
    finally:
        server.shutdown()
    assert names == ["dummy", "kit fox", "English setter"]
    assert (tmp_path / "hub" / "checkpoints" / "ImageNet_alternate.txt").exists()  # beside the weights
    assert inception.class_names("lucent:inception5h.pth:sha256=0123") == names  # the server is gone: the copy
    assert inception.class_label(1, names) == "kit fox" and inception.class_label(1007, names) == "output 1007"
    assert inception.class_names("random(seed=0)") is None  # a random network's outputs mean no class
    assert inception.class_label(1, None) == "output 1"

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "other-hub"))
    monkeypatch.setattr(inception, "CLASS_NAMES_URL", "http://nowhere.invalid/ImageNet_alternate.txt")
    with caplog.at_level("WARNING"):
        assert inception.class_names("lucent:inception5h.pth:sha256=0123") is None
    assert "nowhere.invalid" in caplog.text and str(tmp_path / "other-hub" / "checkpoints") in caplog.text


def test_the_random_network_keeps_its_scale_and_tells_images_apart(image_dir):
    """The smoke book's random network tests something: every mixed layer's activations are of order 1 (torch's
    default init left mixed5b at 1e-2 and gave every image the same class), and with its classifier standardised
    on the images, the images get different outputs, the logits having mean 0 and spread 1 over them."""
    import math

    import numpy as np

    from helpers.data.images import load_image
    from helpers.data.inception import MIXED_LAYERS, load_model, model_input_from_uint8, standardise_classifier_

    model = load_model("random", seed=0)[0]
    paths = sorted(image_dir.glob("*"))
    x = model_input_from_uint8(torch.stack([torch.from_numpy(load_image(p)).permute(2, 0, 1) for p in paths]))
    with torch.no_grad():
        acts = LayerCapture(model, MIXED_LAYERS)(x)
    stds = {name: float(a.std()) for name, a in acts.items()}
    assert all(0.05 < s < 20 for s in stds.values()), stds
    assert max(stds.values()) / min(stds.values()) < 20, stds
    standardise_classifier_(model, x)
    z = {}
    model.softmax2_pre_activation_matmul.register_forward_hook(lambda m, i, o: z.__setitem__("z", o))
    with torch.no_grad():
        p = model(x)
    assert torch.allclose(z["z"].mean(0), torch.zeros(1008), atol=1e-3)
    assert float(z["z"].std(0).mean()) == pytest.approx(1.0, rel=1e-3)
    assert len(set(p.argmax(1).tolist())) >= len(paths) // 2
    kl = (p * (p.log() - p.mean(0, keepdim=True).log())).sum(1)  # each image's output against the mean output
    assert float(kl.mean()) > 0.05 and np.isfinite(float(kl.mean())) and not math.isnan(float(kl.mean()))


def test_a_runs_random_network_is_standardised_once_and_the_same_in_every_chapter(tmp_path, monkeypatch):
    """Each chapter's kernel loads the run's network: the classifier's standardisation is measured once (a forward
    pass over 64 images, ~3 s) and kept in the run; a later kernel's network is the first one's bit for bit; a run
    of other weights measures again."""
    from helpers.data.inception import load_model, model_input_from_uint8, standardise_classifier_
    from helpers.run import artifacts

    g = torch.Generator().manual_seed(0)
    x = model_input_from_uint8(torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8, generator=g))

    def a_new_kernel():
        run = artifacts.open_run("smoke", run_dir=str(tmp_path / "run"))
        monkeypatch.setattr(run, "model_inputs", lambda n, start=0: x)
        return run

    fc = lambda model: (model.softmax2_pre_activation_matmul.weight, model.softmax2_pre_activation_matmul.bias)
    first = a_new_kernel().model()
    direct = standardise_classifier_(load_model("random", seed=0)[0], x)
    assert all(torch.equal(a, b) for a, b in zip(fc(first), fc(direct)))
    measured = []
    stats = artifacts.classifier_stats
    monkeypatch.setattr(artifacts, "classifier_stats", lambda *a: measured.append(1) or stats(*a))
    again = a_new_kernel().model()
    assert measured == [] and all(torch.equal(a, b) for a, b in zip(fc(again), fc(first)))
    kept = tmp_path / "run" / artifacts.CLASSIFIER
    kept.write_text(kept.read_text().replace("random(seed=0)", "random(seed=1)"))  # kept for other weights
    a_new_kernel().model()
    assert measured == [1]


def test_the_fast_layers_give_lucents_numbers(random_model, monkeypatch):
    """load_model's max pools and local response norms (where no gradient is wanted) against Lucent's own network
    with the same weights and torch's functions: every mixed layer and the logits bit for bit; each layer alone
    against torch's at odd sizes, NaN and -inf."""
    import importlib

    from lucent.modelzoo.inceptionv1 import helper_layers

    from helpers.data.layers import local_response_norm
    from helpers.data.pools import MaxPool2dLayer, max_pool_3x3

    lucent_module = importlib.import_module("lucent.modelzoo.inceptionv1.InceptionV1")
    assert sum(isinstance(m, MaxPool2dLayer) for m in random_model.modules()) == 13
    assert lucent_module.F.local_response_norm is local_response_norm
    x = torch.randn(2, 3, 224, 224) * 60
    with torch.no_grad():
        ours = LayerCapture(random_model, MIXED_LAYERS)(x), random_model(x)
        monkeypatch.setattr(lucent_module, "F", torch.nn.functional)  # Lucent's network as Lucent has it
        lucents = lucent_module.InceptionV1(pretrained=False, redirected_ReLU=False).eval().requires_grad_(False)
        lucents.load_state_dict(random_model.state_dict())
        assert sum(isinstance(m, helper_layers.MaxPool2dLayer) for m in lucents.modules()) == 13
        theirs = LayerCapture(lucents, MIXED_LAYERS)(x), lucents(x)
        assert all(torch.equal(ours[0][layer], theirs[0][layer]) for layer in MIXED_LAYERS)
        assert torch.equal(ours[1], theirs[1])
    for shape, size, beta in [((2, 5, 7, 3), 9, 0.5), ((1, 12, 4, 4), 4, 0.75), ((3, 64, 5, 6), 9, 0.5)]:
        t = torch.randn(shape) * 20
        t[0, 0, 1, 1], t[-1, -1, 2, 0] = float("nan"), float("inf")
        got, want = local_response_norm(t, size, 1e-4, beta, 1.0), torch.nn.functional.local_response_norm(t, size, 1e-4, beta, 1.0)
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)) and torch.equal(got.isnan(), want.isnan())
    for shape, stride in [((2, 3, 9, 8), 2), ((1, 2, 7, 7), 1), ((1, 1, 3, 4), 2), ((2, 5, 10, 11), 2)]:
        t = torch.randn(shape)
        t[0, 0, 1, 1], t[-1, -1, 2, 0] = float("nan"), float("-inf")
        want = torch.nn.functional.max_pool2d(t, 3, stride)
        with torch.no_grad():  # the CPU's kernel (max_pool_3x3_padded) and the strided views it falls back to
            for got in (MaxPool2dLayer()(t, stride=(stride, stride)), max_pool_3x3(t, stride)):
                assert got.shape == want.shape and torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
                assert torch.equal(got.isnan(), want.isnan())
    # with a gradient wanted: torch's gradients, its choice among tied inputs (rounded values, zeros) and its order
    # of adding an input's gradients from overlapping windows included
    F = torch.nn.functional
    for shape, stride in [((1, 1, 5, 5), 1), ((2, 3, 9, 8), 2), ((2, 4, 10, 11), 1), ((1, 2, 7, 7), 2),
                          ((2, 3, 40, 37), 1), ((1, 2, 41, 43), 2), ((1, 2, 11, 13), 3)]:
        for t in (torch.zeros(shape), torch.randint(-2, 3, shape).float(), torch.randn(shape).clamp(min=0)):
            t[0, 0, 0] = float("-inf")
            t[-1, -1, 3, 2:4] = float("nan")  # two NaNs in one window: torch keeps the later
            a, b = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
            pools = MaxPool2dLayer()(a, stride=(stride, stride)), F.max_pool2d(b, 3, stride)
            g = torch.randn(pools[1].shape)
            (pools[0] * g).sum().backward(), (pools[1] * g).sum().backward()
            assert torch.equal(pools[0].nan_to_num(7.0), pools[1].nan_to_num(7.0)) and torch.equal(a.grad, b.grad)
    # the -inf padding Lucent makes before a pool, given to it instead (fold_pool_pads_): torch's pool of the padded
    # tensor, its choice among tied entries (a padded -inf first, then -inf inputs) and its gradient, the padded
    # entries' share dropped
    for shape, stride, pad in [((2, 3, 9, 8), 2, (0, 1, 0, 1)), ((2, 4, 10, 11), 1, (1, 1, 1, 1)), ((1, 1, 2, 2), 1, (1, 1, 1, 1)),
                               ((1, 2, 40, 40), 2, (0, 1, 0, 1)), ((1, 2, 11, 13), 3, (2, 0, 1, 3))]:
        for t in (torch.zeros(shape), torch.randint(-2, 3, shape).float(), torch.full(shape, float("-inf")), torch.randn(shape)):
            t.view(-1)[0] = float("-inf")
            t.view(-1)[-3:-1] = float("nan")
            a, b = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
            pools = MaxPool2dLayer()(a, stride=(stride, stride), pad=pad), F.max_pool2d(F.pad(b, pad, value=float("-inf")), 3, stride)
            g = torch.randn(pools[1].shape)
            (pools[0] * g).sum().backward(), (pools[1] * g).sum().backward()
            assert torch.equal(pools[0].nan_to_num(7.0), pools[1].nan_to_num(7.0)) and torch.equal(a.grad, b.grad)
            with torch.no_grad():  # no gradient wanted: the pad read as -inf by max_pool_3x3_padded's kernel
                got = MaxPool2dLayer()(t, stride=(stride, stride), pad=pad)
                assert torch.equal(got.nan_to_num(7.0), pools[1].nan_to_num(7.0)) and torch.equal(got.isnan(), pools[1].isnan())
    for shape, size, beta in [((2, 5, 7, 3), 9, 0.5), ((1, 12, 4, 4), 4, 0.75), ((2, 64, 9, 9), 9, 0.5)]:
        t = torch.randn(shape) * 30
        t[-1, -1, 2, 0] = float("nan")
        a, b = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
        norms = local_response_norm(a, size, 1e-4, beta, 1.0), F.local_response_norm(b, size, 1e-4, beta, 1.0)
        g = torch.randn(shape)
        (norms[0] * g).sum().backward(), (norms[1] * g).sum().backward()
        assert torch.equal(norms[0].nan_to_num(7.0), norms[1].nan_to_num(7.0))
        assert torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0)) and torch.equal(a.grad.isnan(), b.grad.isnan())


def test_the_redirected_relus_gradient_is_lucents():
    """The redirected ReLU (load_model's, its backward one ``where``) against Lucent's own (boolean indexing): the
    same values and gradients, negative inputs scaling the gradient by 0.1 (float32); zeros, -0.0, NaN and infinite
    inputs passing it; NaN gradients staying NaN; a gradient in another memory layout."""
    from lucent.modelzoo.inceptionv1.helper_layers import RedirectedReLU

    from helpers.data.layers import RedirectedReluLayer

    x = torch.randn(2, 3, 77, 71) * 5
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), float("-inf"), -1e-30])
    g = torch.randn(x.shape) * 3
    g.view(-1)[6:9] = torch.tensor([float("nan"), float("inf"), -0.0])
    a, lucents = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = RedirectedReluLayer()(a)
    out.backward(g)
    want_out = RedirectedReLU.apply(lucents)
    want_out.backward(g)
    want = lucents.grad
    assert torch.equal(out.nan_to_num(7.0), want_out.nan_to_num(7.0))
    assert torch.equal(a.grad.nan_to_num(7.0), want.nan_to_num(7.0)) and torch.equal(a.grad.isnan(), want.isnan())
    assert not torch.equal(a.grad, g) and (a.grad[x < 0] != 0).any()  # the negative inputs' gradients were scaled
    b = x.clone().requires_grad_(True)
    RedirectedReluLayer()(b).backward(g.transpose(2, 3).contiguous().transpose(2, 3))
    assert torch.equal(b.grad.nan_to_num(7.0), want.nan_to_num(7.0))  # a gradient in another memory layout


def test_building_the_network_and_reading_images_import_no_torchvision_and_lucent_stays_whole(tmp_path):
    """A process that builds the network and reads an image (every chapter's kernel, every harvest) does not import
    torchvision (1.3 s: lucent.modelzoo's ``__init__`` imports all its models); Lucent's package still answers as
    its own ``__init__`` does afterwards: ``inceptionv1`` is the class, and torchvision's models are there, by name
    and by a star import."""
    import subprocess
    import sys

    from PIL import Image

    Image.new("RGB", (300, 200), (10, 200, 30)).save(tmp_path / "x.jpg")
    code = f"""
import sys
from helpers.data.images import load_image
from helpers.data.inception import load_model
model, _ = load_model("random")
assert load_image({str(tmp_path / "x.jpg")!r}).shape == (224, 224, 3)
print("torchvision" in sys.modules)
from lucent.modelzoo import inceptionv1
from lucent.modelzoo.inceptionv1.InceptionV1 import InceptionV1
import lucent.modelzoo
print(inceptionv1 is InceptionV1, isinstance(model, InceptionV1), callable(lucent.modelzoo.resnet18))
star = {{}}
exec("from lucent.modelzoo import *", star)
print(star["inceptionv1"] is InceptionV1 and callable(star["resnet18"]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:3] == ["False", "True True True", "True"], out
