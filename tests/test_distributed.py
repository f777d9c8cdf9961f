"""torchrun on CPU (gloo, 2 processes): the same store and the same training as one process.

One process is run with one thread, as torchrun gives each of its processes: with the same
thread count the float sums agree, so the stores are byte-identical.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers.files import read_json


def run(args, procs=1, tmp_env=None):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **(tmp_env or {})}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
              "--master_port", str(29500 + os.getpid() % 1000)] if procs > 1 else [sys.executable]
    done = subprocess.run(prefix + ["-m", "helpers", *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def npy_files(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*.npy"))}


def records(run_dir):
    return [{k: v for k, v in read_json(p).items() if k != "seconds"} for p in sorted((run_dir / "shards").glob("*.json"))]


def test_torchrun_harvest_equals_one_process_and_resumes(tmp_path, image_dir):
    common = ["harvest", "--images", str(image_dir), "--weights", "random", "--layers", "mixed4a,mixed4c",
              "--shard-images", "2", "--batch-size", "2", "--workers", "0", "--sampling", "norm-weighted"]
    run(common + ["--out", str(tmp_path / "one")])
    run(common + ["--out", str(tmp_path / "two")], procs=2)
    assert npy_files(tmp_path / "one") == npy_files(tmp_path / "two")
    assert records(tmp_path / "one") == records(tmp_path / "two")
    m = read_json(tmp_path / "two" / "manifest.json")
    assert m["complete"] and m["vectors"] == 70 and m["n_shards"] == 4
    (tmp_path / "two" / "shards" / "000001.json").unlink()  # as if rank 1 died before committing shard 1
    (tmp_path / "two" / "mixed4c" / "000001.vectors.npy").unlink()
    run(common + ["--out", str(tmp_path / "two")], procs=2)
    assert npy_files(tmp_path / "one") == npy_files(tmp_path / "two")


@pytest.fixture
def vectors(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "v.npy", np.abs(rng.standard_normal((6000, 32))).astype(np.float32))
    return tmp_path / "v.npy"


def test_torchrun_training_follows_the_single_process_loss_curve_and_resumes(tmp_path, vectors):
    common = ["train", "--vectors", str(vectors), "--expansion", "4", "--k", "4", "--batch-size", "256",
              "--log-every", "2", "--device", "cpu", "--aux-k", "8", "--dead-after", "1000", "--tied", "init"]
    run(common + ["--out", str(tmp_path / "one"), "--vectors-seen", "5120"])
    run(common + ["--out", str(tmp_path / "two"), "--vectors-seen", "5120"], procs=2)
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):  # stated tolerance: 1e-4 relative
        assert b["loss_nmse"] == pytest.approx(a["loss_nmse"], rel=1e-4)
        assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-4) and b["dead_fraction"] == a["dead_fraction"]
    run(common + ["--out", str(tmp_path / "resumed"), "--vectors-seen", "2560", "--checkpoint-every", "2560"], procs=2)
    run(common + ["--out", str(tmp_path / "resumed"), "--vectors-seen", "5120", "--resume"], procs=2)
    w2, wr = load_file(tmp_path / "two" / "sae_weights.safetensors"), load_file(tmp_path / "resumed" / "sae_weights.safetensors")
    for key in w2:
        np.testing.assert_allclose(wr[key], w2[key], rtol=1e-5, atol=1e-6)


def test_several_layers_train_at_once_one_process_each(tmp_path, harvest_run):
    run(["train", "--run", str(harvest_run), "--layer", "mixed4a,mixed4c", "--out", str(tmp_path / "saes"),
         "--expansion", "2", "--k", "4", "--batch-size", "8", "--vectors-seen", "16", "--holdout", "0",
         "--device", "cpu,cpu"])
    for layer, width in (("mixed4a", 508), ("mixed4c", 512)):
        cfg = read_json(tmp_path / "saes" / layer / "cfg.json")
        assert cfg["metadata"]["layer"] == layer and cfg["d_in"] == width and cfg["metadata"]["vectors_seen"] == 16


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie, killed but not yet reaped by its new parent, counts as gone)."""
    from pathlib import Path

    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_killing_a_multi_layer_training_stops_its_children(tmp_path, harvest_run):
    """kill -9 of `train --layer a,b` once left both children training into the same folders: they now end
    with the parent (Linux: PR_SET_PDEATHSIG), so a rerun finds the folders free."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    proc = subprocess.Popen([sys.executable, "-m", "helpers", "train", "--run", str(harvest_run), "--layer",
                             "mixed4a,mixed4c", "--out", str(tmp_path / "saes"), "--expansion", "2", "--k", "4",
                             "--batch-size", "8", "--vectors-seen", str(10**9), "--holdout", "0", "--device", "cpu,cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, children = time.time() + 120, []
    while time.time() < deadline and not all((tmp_path / "saes" / l / "metrics.jsonl").exists()
                                              for l in ("mixed4a", "mixed4c")):
        time.sleep(0.5)
    children = [c for c in _children(proc.pid) if _alive(c)]
    assert len(children) >= 2, children  # both layers training (plus, perhaps, multiprocessing's tracker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(c) for c in children):
        time.sleep(0.2)
    left = [c for c in children if _alive(c)]
    for c in left:
        os.kill(c, signal.SIGKILL)
    assert left == [], "children kept training after their parent was killed"


def test_a_rank_leaves_its_process_group_at_exit(monkeypatch):
    """The process group a torchrun rank joins is destroyed by an exit handler, while the interpreter is whole (left
    to its teardown, gloo's threads sometimes aborted a rank: "terminate called without an active exception"). A real
    gloo group of one process, joined as setup joins one."""
    import socket

    import torch.distributed as dist

    from helpers import distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))  # as under torchrun; the group itself has one rank
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    handlers = []
    monkeypatch.setattr(distributed.atexit, "register", handlers.append)
    distributed.setup("cpu")
    try:
        assert dist.is_initialized() and len(handlers) == 1
        handlers[0]()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
