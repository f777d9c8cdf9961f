import json
import os
import subprocess
import sys

import pytest

from helpers.cli import main
from helpers.sae.model import TopKSAE


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
                "--expansion", "2", "--k", "4", "--batch-size", "4", "--vectors-seen", "8", "--holdout", "0",
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
    assert main(["train", "--run", str(tmp_path), "--layer", ",,,", "--out", str(tmp_path / "s")]) == 2  # no layer
    assert "--layer names no layer" in capsys.readouterr().err
    assert main(["train", "--run", str(tmp_path), "--layer", "mixed4a,mixed4z", "--out", str(tmp_path / "s")]) == 2
    assert "'mixed4z' is not a layer of InceptionV1" in capsys.readouterr().err


# --- every number on the command line: a valid result, or one line naming the option -------------
import contextlib
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NUMBERS = st.one_of(st.integers(-50, 400), st.sampled_from([0, -1, 1, 2**31]),
                    st.floats(allow_nan=True, allow_infinity=True, width=32))
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _run(argv) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: a value of the wrong type
            code = e.code
    return code, [line for line in err.getvalue().splitlines() if line.startswith("error:") or "error:" in line]


@PROPERTY
@given(option=st.sampled_from(["per-image", "max-images", "batch-size", "shard-images", "workers", "seed"]),
       value=NUMBERS)
def test_every_harvest_number_gives_a_store_or_one_line_naming_it(tmp_path_factory, image_dir, option, value):
    if option == "workers" and isinstance(value, int) and value > 2:
        value = 2  # each worker is a process: a valid count, kept small
    if option in ("batch-size", "max-images", "shard-images", "per-image") and isinstance(value, int) and value > 200:
        value = value % 200 + 1 if option != "per-image" else value  # keeps a run short; per-image above 196 is an error
    out = tmp_path_factory.mktemp("h") / "run"
    code, errors = _run(["harvest", "--images", str(image_dir), "--out", str(out), "--layers", "mixed4a",
                         "--weights", "random", "--workers", "0", "--device", "cpu", f"--{option}", str(value)])
    if code == 0:
        from helpers.data.store import ActivationStore, read_manifest

        m = read_manifest(out)
        assert m.complete and len(ActivationStore(out, "mixed4a")) == m.n_images * m.per_image > 0
    else:
        assert code == 2 and len(errors) == 1 and f"--{option}" in errors[0], (option, value, errors)


@PROPERTY
@given(option=st.sampled_from(["expansion", "k", "aux-k", "aux-coef", "lr", "batch-size", "vectors-seen", "dead-after",
                               "holdout", "log-every", "checkpoint-every", "seed"]), value=NUMBERS)
def test_every_training_number_gives_an_sae_or_one_line_naming_it(tmp_path_factory, option, value):
    import numpy as np

    folder = tmp_path_factory.mktemp("t")
    np.save(folder / "v.npy", np.abs(np.random.default_rng(0).standard_normal((2000, 8))).astype(np.float32))
    if option in ("expansion", "vectors-seen", "checkpoint-every") and isinstance(value, int) and value > 64:
        value = value % 64 + 1  # valid, kept small so the run is short
    args = {"--vectors": str(folder / "v.npy"), "--out": str(folder / "sae"), "--expansion": "2", "--k": "4",
            "--batch-size": "64", "--vectors-seen": "256", "--holdout": "0", "--device": "cpu",
            f"--{option}": str(value)}
    code, errors = _run(["train", *[x for pair in args.items() for x in pair]])
    if code == 0:
        cfg = json.loads((folder / "sae" / "cfg.json").read_text())
        assert cfg["d_sae"] == 8 * int(args["--expansion"]) and cfg["metadata"]["vectors_seen"] > 0
    else:
        assert code == 2 and len(errors) == 1 and f"--{option}" in errors[0], (option, value, errors)


def test_odd_vectors_and_huge_settings_stop_with_one_line(tmp_path, capsys, monkeypatch):
    """Each once ended in a traceback or the allocator's error (or, for d_in = 1, trained and could not save)."""
    import numpy as np

    from helpers.sae import memory as memory_module

    rng = np.random.default_rng(0)
    cases = {"big-endian": rng.normal(size=(3000, 8)).astype(">f4"),
             "float128": rng.normal(size=(3000, 8)).astype(np.longdouble)}
    for name, array in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
        assert main(["train", "--vectors", str(tmp_path / f"{name}.npy"), "--out", str(tmp_path / name)]) == 2
        assert "--vectors reads float16, float32 or float64 in this machine's byte order" in capsys.readouterr().err
    (tmp_path / "empty.npy").write_bytes(b"")
    assert main(["train", "--vectors", str(tmp_path / "empty.npy"), "--out", str(tmp_path / "e")]) == 2
    assert "cannot read" in capsys.readouterr().err
    np.save(tmp_path / "one.npy", rng.normal(size=(3000, 1)).astype(np.float32))  # d_in = 1: trains and saves
    assert main(["train", "--vectors", str(tmp_path / "one.npy"), "--out", str(tmp_path / "one"), "--k", "2",
                 "--expansion", "4", "--vectors-seen", "4096", "--holdout", "256", "--device", "cpu"]) == 0
    assert TopKSAE.load(tmp_path / "one").d_in == 1
    capsys.readouterr()
    assert main(["train", "--vectors", str(tmp_path / "one.npy"), "--out", str(tmp_path / "s"),
                 "--seed", str(2 ** 70)]) == 2
    assert "--seed 1180591620717411303424 is out of range" in capsys.readouterr().err
    assert main(["harvest", "--images", str(tmp_path), "--out", str(tmp_path / "h"), "--per-image", "1000000",
                 "--sampling", "norm-weighted"]) == 2
    assert "--per-image 1000000 is out of range: at most 1024" in capsys.readouterr().err
    monkeypatch.setattr(memory_module, "available_bytes", lambda device: 2**30)  # a 1 GiB machine
    np.save(tmp_path / "wide.npy", rng.normal(size=(3000, 512)).astype(np.float32))
    assert main(["train", "--vectors", str(tmp_path / "wide.npy"), "--out", str(tmp_path / "w"), "--expansion", "4096",
                 "--device", "cpu"]) == 2
    assert "needs about" in capsys.readouterr().err and not (tmp_path / "w" / "checkpoint.safetensors").exists()
    monkeypatch.setenv("PROFILE", "bogus")
    assert main(["book"]) == 2 and "PROFILE='bogus' is not a profile" in capsys.readouterr().err
