"""The real path, offline: Lucent's weights file and the author's Hugging Face files replaced by
stand-ins of the same names, shapes and places (random, and marked so), and the `cpu` profile's code
path run on them: the only difference from a reader's run is the bytes of the files (and, to stay
quick, the sizes: fewer images and vectors)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import make_images
from helpers.run import profiles
from helpers.run.artifacts import Run
from helpers.run.author import AUTHOR_K, REPO_ID
from helpers.data.inception import (RANDOM_WARNING, STAND_IN_KEY, is_stand_in, load_model, lucent_cache_path,
                               stand_in_state_dict)
from helpers.data.store import read_manifest


@pytest.fixture()
def stand_ins(tmp_path, monkeypatch):
    """inception5h.pth where torch.hub puts the download, and the author's repository in the hub cache."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch-hub"))
    lucent_cache_path().parent.mkdir(parents=True)
    torch.save(stand_in_state_dict(seed=3), lucent_cache_path())
    repo = tmp_path / "hf" / f"models--{REPO_ID.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for layer, width in (("mixed4b", 512), ("mixed4c", 512)):  # the author's file names and key names
        torch.save({"W_enc.weight": torch.randn(4 * width, width, generator=g) / width ** 0.5,
                    "b_pre": torch.randn(width, generator=g), "b_latent": torch.zeros(4 * width)},
                   snapshot / f"TOP_k_SAE_{layer}.pth")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_a_stand_in_at_the_download_path_loads_as_lucent_and_is_labelled_random(stand_ins, caplog):
    model, weights_id = load_model("lucent")
    assert weights_id.startswith("random(stand-in") and is_stand_in("lucent")
    assert RANDOM_WARNING in caplog.text
    reference = load_model("random", seed=3)[0]  # the same random weights, built directly
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert STAND_IN_KEY not in model.state_dict()


def test_the_cpu_profiles_path_with_the_authors_saes_runs_on_stand_ins(stand_ins):
    cpu = profiles.PROFILES["cpu"]
    make_images(stand_ins / "images", 12)
    profile = dataclasses.replace(cpu, harvest=dataclasses.replace(cpu.harvest, images=str(stand_ins / "images"),
                                                                   batch_size=6, layers=("mixed4b", "mixed4c")),
                                  circuit_images=2, circuit_sources=8)
    assert profile.weights == "lucent"  # the real loading path, not "random"
    run = Run(profile, stand_ins / "run", saes="author")
    assert run.random_weights and "Not a result" in run.banner()  # the stand-in is found out and labelled

    sae = run.sae("mixed4c")  # from the hub cache, converted, saved with its convention
    assert (sae.k, sae.d_sae, sae.tied) == (AUTHOR_K, 2048, "full")
    cfg = json.loads((run.sae_path("mixed4c") / "cfg.json").read_text())
    assert cfg["metadata"]["input_scale"] == "unit"
    assert cfg["metadata"]["source"] == f"hf:{REPO_ID}@{'0' * 40}/TOP_k_SAE_mixed4c.pth"  # the commit it came from
    manifest = read_manifest(run.harvest())
    assert manifest.input_scale == "unit" and manifest.random_weights and "stand-in" in manifest.weights_id
    assert manifest.sampling == "norm-weighted" and run.harvest_dir.name == "harvest-author"  # the author's harvest
    assert run.sae_origin("mixed4c") == f"the author's ({REPO_ID}@{'0' * 40}/TOP_k_SAE_mixed4c.pth)"
    analysis = run.branches("mixed4c")
    assert analysis.fractions.shape == (2048, 4) and np.isfinite(analysis.fractions).all()
    examples = run.examples("mixed4c")
    assert (examples.top_image[:, 0] >= 0).any()
    acts = run.layer_activations(["mixed4b", "mixed4c"], 2)
    from helpers.analysis.circuits import ablation_control
    control = ablation_control(run.model(), run.sae("mixed4b"), sae, "mixed4b",
                               acts["mixed4b"], [0, 1])
    assert control["cases"] == 4


def test_an_author_run_harvests_as_the_author_did(tmp_path):
    """[0, 1] inputs, positions drawn in proportion to the norm with replacement (more draws than the grid
    has cells: only with replacement), and float32 (no bf16 autocast on CUDA)."""
    smoke = profiles.PROFILES["smoke"]
    make_images(tmp_path / "images", 3)
    profile = dataclasses.replace(smoke, harvest=dataclasses.replace(smoke.harvest, images=str(tmp_path / "images"),
                                                                     layers=("mixed4a",), per_image=300, workers=0))
    run = Run(profile, tmp_path / "run", saes="author")
    cfg = run.harvest_config()
    assert (cfg.input_scale, cfg.sampling, cfg.amp) == ("unit", "norm-weighted", False)
    assert Run(profile, tmp_path / "run").harvest_config().sampling == profile.harvest.sampling == "top-norm"
    manifest = run.manifest()
    assert (manifest.input_scale, manifest.sampling, manifest.per_image) == ("unit", "norm-weighted", 300)
    from helpers.data.store import ActivationStore

    prov = ActivationStore(run.harvest(), "mixed4a").load_provenance()
    first = prov[prov["image"] == prov["image"][0]]
    assert len(first) == 300 and len({(int(y), int(x)) for y, x in zip(first["y"], first["x"])}) < 196


def test_a_layer_the_author_did_not_publish_is_trained_here_and_said_so(stand_ins, monkeypatch):
    """mixed4a: only its branch SAEs are on the hub (a stand-in listing), so the run trains ours on the author's
    harvest, says so, and every later artifact works; mixed4c is the author's."""
    from conftest import stub_hub

    snapshot = next((stand_ins / "hf").glob("models--*/snapshots/*"))
    torch.save({"W_enc.weight": torch.randn(3264, 204), "b_pre": torch.zeros(204), "b_latent": torch.zeros(3264)},
               snapshot / "TopK_SAE_for_Mixed4a_3x3.pth")  # a branch SAE: never mixed4a's
    stub_hub(monkeypatch, snapshot, stand_ins / "downloads")
    smoke = profiles.PROFILES["smoke"]
    make_images(stand_ins / "images", 6)
    profile = dataclasses.replace(smoke, harvest=dataclasses.replace(
        smoke.harvest, images=str(stand_ins / "images"), weights="lucent", layers=("mixed4a", "mixed4c"), workers=0,
        per_image=60))
    run = Run(profile, stand_ins / "run", saes="author")
    ours = run.sae("mixed4a")
    assert ours.d_in == 508 and ours.d_sae == 4 * 508  # the profile's SAE, not the 204-wide branch SAE
    assert run.sae_origin("mixed4a").startswith("trained here, in place of the author's: ")
    assert "no file named as a whole-layer SAE of mixed4a" in run.sae_origin("mixed4a")
    assert run.sae_origin("mixed4c").startswith("the author's (")
    assert ours.metadata["input_scale"] == "unit"  # trained on the author's harvest, beside the author's SAEs
    assert run.branches("mixed4a").fractions.shape == (4 * 508, 4)


def test_the_untrained_control_is_the_same_profile_on_random_weights(tmp_path):
    run = Run(profiles.PROFILES["cpu"], tmp_path / "run")
    control = run.untrained_control()
    assert control.profile.weights == "random" and control.random_weights
    assert control.profile.harvest.images == run.profile.harvest.images and control.profile.train == run.profile.train
    assert control.harvest_dir == tmp_path / "run" / "untrained" / "harvest" and control.saes == "train"
