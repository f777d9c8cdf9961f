"""Publishing an SAE: the upload set and model card from its records, checked offline; nothing is
uploaded when anything is wrong, and a good SAE goes up in one commit (the hub client replaced here)."""

import pytest

from helpers.run import publish
from helpers.cli import main as cli
from helpers.files import write_json
from helpers.run.publish import PublishError, model_card, stage
from helpers.sae.model import TopKSAE


@pytest.fixture()
def sae_dir(tmp_path):
    out = tmp_path / "sae"
    TopKSAE(512, 1024, 32, seed=0).save(out, layer="mixed4c", input_scale="unit", weights_id="lucent:inception5h.pth",
                                        random_weights=False, source="runs/cpu/harvest-unit", vectors_seen=2_000_000,
                                        final_fvu=0.1234, final_fvu_on="16384 held-out vectors", dead_fraction=0.015)
    write_json(out / "train.json", {"config": {"k": 32, "lr": 4e-4}, "final_fvu": 0.1234})
    (out / "metrics.jsonl").write_text('{"step": 1, "fvu": 0.9}\n')
    write_json(out / "spliced.json", {"images": 64, "rows": [
        {"layer": "mixed4c", "spliced in": "SAE reconstruction", "top-1 agreement": 0.875, "KL": 0.0321,
         "KL recovered": 0.912}]})
    (out / "checkpoint.safetensors").write_bytes(b"not for the hub")
    return out


def test_the_upload_set_and_the_card_come_from_the_records(sae_dir, tmp_path):
    files = stage(sae_dir, "me/inceptionv1-sae-mixed4c", tmp_path / "staged")
    assert files == ["README.md", "cfg.json", "metrics.jsonl", "sae_weights.safetensors", "spliced.json", "train.json"]
    assert not (tmp_path / "staged" / "checkpoint.safetensors").exists()
    card = (tmp_path / "staged" / "README.md").read_text()
    for text in ("InceptionV1 mixed4c", "k = 32, 1024 latents on 512 channels", "[0, 1] as is",
                 "`lucent:inception5h.pth`", "2000000", "0.1234 (16384 held-out vectors)", "0.015",
                 "| SAE reconstruction | 0.875 | 0.0321 | 0.912 |", "on 64 images",
                 'TopKSAE.load(snapshot_download("me/inceptionv1-sae-mixed4c"))', "SAE.load_from_disk"):
        assert text in card, text
    assert "RANDOM" not in card
    assert TopKSAE.load(tmp_path / "staged").d_sae == 1024  # the staged folder is an SAE directory


def test_random_weights_are_refused_unless_asked_for_and_then_said(tmp_path):
    out = tmp_path / "random"
    TopKSAE(16, 32, 4).save(out, layer="mixed4a", random_weights=True, warning="InceptionV1 has RANDOM weights")
    with pytest.raises(PublishError, match="random weights.*Nothing was written.*--allow-random"):
        publish.publish(out, "me/x")
    assert "(RANDOM WEIGHTS: NOT A RESULT)" in model_card(out, "me/x")


def test_offline_it_fails_before_anything_is_written(sae_dir, monkeypatch):
    import huggingface_hub

    calls = []

    class Offline:
        def __init__(self, token=None):
            pass

        def whoami(self):
            raise ConnectionError("Name or service not known")

        def create_repo(self, *a, **k):
            calls.append("create_repo")

        def upload_folder(self, *a, **k):
            calls.append("upload_folder")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    with pytest.raises(PublishError, match="needs internet and a token.*nothing was uploaded"):
        publish.publish(sae_dir, "me/x")
    assert calls == []
    with pytest.raises(PublishError, match="OWNER/NAME"):
        publish.publish(sae_dir, "no-owner")
    with pytest.raises(PublishError, match="not an SAE directory"):
        publish.publish(sae_dir.parent, "me/x")


def test_a_good_sae_goes_up_in_one_commit(sae_dir, monkeypatch):
    import huggingface_hub

    seen = {}

    class Hub:
        def __init__(self, token=None):
            pass

        def whoami(self):
            return {"name": "me"}

        def create_repo(self, repo_id, private=False, exist_ok=False):
            seen["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            seen.setdefault("commits", []).append(sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()))
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    url = publish.publish(sae_dir, "me/sae-mixed4c", private=True)
    assert url.endswith("/commit/abc") and seen["repo"] == ("me/sae-mixed4c", True, True)
    assert seen["commits"] == [["README.md", "cfg.json", "metrics.jsonl", "sae_weights.safetensors", "spliced.json",
                                "train.json"]]


def test_the_command_line_dry_run(sae_dir, tmp_path, capsys):
    assert cli(["publish", "--sae", str(sae_dir), "--repo-id", "me/x", "--dry-run", str(tmp_path / "card")]) == 0
    assert (tmp_path / "card" / "README.md").exists() and "wrote README.md" in capsys.readouterr().out
    assert cli(["publish", "--sae", str(tmp_path), "--repo-id", "me/x", "--dry-run", str(tmp_path / "c2")]) == 2
    assert "not an SAE directory" in capsys.readouterr().err


def test_a_dry_run_checks_as_a_publish_does_and_never_overwrites(sae_dir, tmp_path, capsys):
    """A dry run once overwrote a non-empty folder, copied truncated weights a real publish refuses, and gave
    tracebacks for a file or the SAE's own folder as its target, malformed records and an OWNER/NAME/MORE id."""
    def dry(target, sae=sae_dir, repo="me/x"):
        code = cli(["publish", "--sae", str(sae), "--repo-id", repo, "--dry-run", str(target)])
        return code, capsys.readouterr().err

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    code, err = dry(tmp_path / "full")
    assert code == 2 and "is not empty" in err and (tmp_path / "full" / "notes.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    assert dry(tmp_path / "afile")[0] == 2
    code, err = dry(sae_dir)
    assert code == 2 and "the SAE's own folder" in err
    code, err = dry(tmp_path / "a", repo="a/b/c")
    assert code == 2 and "OWNER/NAME, one slash" in err and not (tmp_path / "a").exists()
    for name, text in (("train.json", "{not json"), ("spliced.json", "[]"), ("cfg.json", "[1]")):
        good = (sae_dir / name).read_text()
        (sae_dir / name).write_text(text)
        code, err = dry(tmp_path / f"bad-{name}")
        assert code == 2 and name in err and "Traceback" not in err, err
        (sae_dir / name).write_text(good)
    weights = sae_dir / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, err = dry(tmp_path / "truncated")
    assert code == 2 and "does not load as an SAE" in err and not (tmp_path / "truncated").exists()
