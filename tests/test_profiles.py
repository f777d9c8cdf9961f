import pytest

from helpers.run import book, profiles
from helpers.run.artifacts import Run, open_run


def test_profiles_scale_up():
    p = profiles.PROFILES
    assert p["smoke"].weights == "random" and p["cpu"].weights == p["gpu"].weights == p["paper"].weights == "lucent"
    seen = [p[name].train.vectors_seen for name in ("smoke", "cpu", "gpu", "paper")]
    assert seen == sorted(seen) and len(set(seen)) == 4
    assert (p["cpu"].train.sae.expansion, p["cpu"].train.sae.k) == (16, 32)  # the paper's SAEs from cpu up
    for profile in p.values():  # every profile logs enough points to draw its training curves
        assert -(-profile.train.vectors_seen // profile.train.batch_size) // profile.train.log_every >= 20
    with pytest.raises(ValueError, match="profile 'huge' is unknown"):
        profiles.get_profile("huge")


def test_a_run_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_PROFILE", "smoke")
    monkeypatch.setenv("SAE_RUN_DIR", str(tmp_path))
    run = open_run()
    assert run.profile.name == "smoke" and run.run_dir == tmp_path and run.random_weights
    assert run.sae_path("mixed4c") == tmp_path / "saes" / "mixed4c"
    assert run.banner().startswith(":::{warning}") and "Not a result" in run.banner()
    monkeypatch.setenv("SAE_SAES", "author")
    assert open_run().sae_path("mixed4c") == tmp_path / "author-saes" / "mixed4c"


def test_real_profile_banner_is_a_note():
    run = Run(profiles.PROFILES["cpu"], profiles.ROOT / "runs" / "cpu")
    assert run.banner().startswith(":::{note}") and "Not a result" not in run.banner()


def test_default_build_falls_back_to_smoke_with_the_reason(monkeypatch, capsys):
    monkeypatch.setattr(book, "preflight", lambda name: "no internet (URL x, put the file at y)")
    assert book.choose_profile(None) == ("smoke", "no internet (URL x, put the file at y)")
    assert "cannot run here" in capsys.readouterr().err
    with pytest.raises(book.ProfileUnavailable, match="profile 'cpu' cannot run here:\\nno internet"):
        book.choose_profile("cpu")
    monkeypatch.setattr(book, "preflight", lambda name: None)
    assert book.choose_profile(None) == ("cpu", None)
    assert book.choose_profile("gpu") == ("gpu", None)


def test_preflight_offline_names_what_failed(monkeypatch):
    import urllib.error

    import torch

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("offline")))
    reason = book.preflight("cpu")
    assert "inception5h.pth" in reason and "imagenette2-320.tgz" in reason
    assert book.preflight("smoke") is None


def test_smoke_images_come_from_the_sample_or_are_generated(tmp_path, monkeypatch):
    run = Run(profiles.PROFILES["smoke"], tmp_path)
    monkeypatch.setattr(profiles, "SAMPLE", tmp_path / "absent")
    folder = run.image_source()
    from helpers.data.images import list_images
    assert len(list_images(folder)) == 64


def test_on_colab_a_chapter_defaults_to_the_authors_saes_on_a_small_image_set(monkeypatch, tmp_path):
    import sys
    import types

    monkeypatch.delenv("SAE_PROFILE", raising=False)
    monkeypatch.delenv("SAE_SAES", raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    run = open_run(None, str(tmp_path))
    assert run.profile.name == "colab" and run.saes == "author" and run.harvest_config().input_scale == "unit"
    assert run.profile.harvest.images == "imagenet-sample" and run.profile.weights == "lucent"
    assert open_run("colab", str(tmp_path), "train").saes == "train"  # one switch away


def test_the_environment_is_read_in_one_place(monkeypatch, tmp_path):
    """Settings.from_environment is the one reader of SAE_*; a run opened with explicit settings ignores the
    environment, and a bad SAE_SAES is named."""
    monkeypatch.setenv("SAE_PROFILE", "cpu")
    run = open_run(settings=profiles.Settings(profile="smoke", run_dir=str(tmp_path), saes="train"))
    assert (run.profile.name, run.run_dir, run.saes) == ("smoke", tmp_path, "train")
    monkeypatch.setenv("SAE_SAES", "theirs")
    with pytest.raises(ValueError, match="SAE_SAES='theirs'; choose 'train' or 'author'"):
        profiles.Settings.from_environment()
    paper = profiles.get_profile("paper", profiles.Settings(imagenet_train="/imagenet/train"))
    assert paper.harvest.images == "/imagenet/train"
    assert profiles.get_profile("paper").harvest.images == profiles.IMAGENET_TRAIN


def test_the_book_shows_the_authors_saes_by_default_when_they_can_be_fetched(monkeypatch):
    from helpers.run import author

    monkeypatch.delenv("SAE_SAES", raising=False)
    monkeypatch.setattr(author, "available", lambda layer="mixed4c": True)
    assert book.choose_saes("cpu") == "author" and book.choose_saes("gpu") == "author"
    assert book.choose_saes("smoke") == "train"  # random weights: the author's SAEs would mean nothing
    monkeypatch.setattr(author, "available", lambda layer="mixed4c": False)
    assert book.choose_saes("cpu") == "train"
    monkeypatch.setenv("SAE_SAES", "train")  # one switch away
    monkeypatch.setattr(author, "available", lambda layer="mixed4c": True)
    assert book.choose_saes("cpu") == "train"


def test_an_installed_package_runs_beside_the_notebook_not_in_site_packages(tmp_path, monkeypatch):
    """On Colab the package lives in site-packages (no _toc.yml beside it): runs go to runs/ of the working
    directory, where the notebook is; in a checkout, to the checkout's runs/."""
    from helpers.run import profiles
    from helpers.run.artifacts import open_run

    monkeypatch.delenv("SAE_RUN_DIR", raising=False)
    assert open_run("smoke").run_dir == profiles.ROOT / "runs" / "smoke"
    site = tmp_path / "site-packages"
    (site / "helpers").mkdir(parents=True)
    monkeypatch.setattr(profiles, "ROOT", site)
    monkeypatch.chdir(tmp_path)
    assert open_run("smoke").run_dir == tmp_path / "runs" / "smoke"
