import json
import os
import subprocess
import sys

import pytest

from helpers.cli import main


def run_cli(*args):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "helpers", *args], capture_output=True, text=True, env=env)


def test_harvest_then_train_from_the_command_line(tmp_path, image_dir):
    run = tmp_path / "run"
    h = run_cli("harvest", "--images", str(image_dir), "--out", str(run), "--weights", "random",
                "--layers", "mixed4b", "--max-images", "3", "--workers", "0", "--per-image", "4",
                "--sampling", "norm-weighted", "--decode", "device")
    assert h.returncode == 0, h.stderr
    assert "RANDOM weights" in h.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["vectors"] == 12 and manifest["sampling"] == "norm-weighted"
    assert manifest["config"]["max_images"] == 3 and manifest["config"]["decode"] == "device"

    t = run_cli("train", "--run", str(run), "--layer", "mixed4b", "--out", str(tmp_path / "sae"),
                "--expansion", "2", "--k", "4", "--batch-size", "4", "--vectors-seen", "8", "--holdout", "2",
                "--tied", "init", "--device", "cpu", "--store", "device")
    assert t.returncode == 0, t.stderr
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_sae"] == 1024 and cfg["tied"] == "init" and cfg["metadata"]["layer"] == "mixed4b"
    assert json.loads((tmp_path / "sae" / "train.json").read_text())["config"]["store"] == "device"


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["harvest", "--layers", "mixed4z", "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "choose from mixed3a" in capsys.readouterr().err
    assert main(["train", "--run", str(tmp_path), "--layer", "mixed4a"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--tied", "half"])
