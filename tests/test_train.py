import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers.files import read_jsonl
from helpers.sae.model import TopKSAE
from helpers.data.store import StoreError
from helpers.config import SaeConfig, TrainConfig
from helpers.sae.train import CHECKPOINT, NonFiniteLoss, train


@pytest.fixture
def vectors(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "v.npy"
    np.save(path, np.abs(rng.standard_normal((3000, 16))).astype(np.float16))
    return path


def small(vectors, out, **kw):
    """A short training config; the SAE's own settings (tied, aux_k, ...) may be given flat here."""
    shape = {"expansion": 4, "k": 4, **{k: kw.pop(k) for k in ("expansion", "k", "tied", "aux_k", "aux_coef") if k in kw}}
    base = dict(vectors=str(vectors), out=str(out), batch_size=128, vectors_seen=128 * 8, device="cpu", log_every=2,
                holdout=256)
    return TrainConfig(**{**base, **kw}, sae=SaeConfig(**shape))


@pytest.mark.parametrize("tied,store", [("full", "disk"), ("init", "disk"), ("full", "device")])
def test_resumed_training_equals_uninterrupted(tmp_path, vectors, tied, store):
    kw = dict(tied=tied, aux_k=8, dead_after=256, store=store)
    straight = train(small(vectors, tmp_path / "a", **kw))
    train(small(vectors, tmp_path / "b", vectors_seen=128 * 3, **kw))
    resumed = train(small(vectors, tmp_path / "b", resume=True, **kw))
    a, b = load_file(straight / "sae_weights.safetensors"), load_file(resumed / "sae_weights.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [r["step"] for r in read_jsonl(resumed / "metrics.jsonl")]
    assert steps == [2, 3, 4, 6, 8]


def test_fully_tied_sae_is_still_tied_after_training(tmp_path, vectors):
    out = train(small(vectors, tmp_path / "s", tied="full"))
    w = load_file(out / "sae_weights.safetensors")
    assert torch.equal(w["W_enc"].T, w["W_dec"])
    initial = TopKSAE(16, 64, 4, "full", seed=0).W_dec
    assert not torch.allclose(w["W_dec"], initial)  # it trained


def test_tied_init_keeps_unit_decoder_rows(tmp_path, vectors):
    out = train(small(vectors, tmp_path / "s", tied="init"))
    w = load_file(out / "sae_weights.safetensors")
    torch.testing.assert_close(w["W_dec"].norm(dim=1), torch.ones(64))
    assert not torch.allclose(w["W_enc"].T, w["W_dec"])


def test_records_and_cfg(tmp_path, harvest_run, vectors):
    out = train(TrainConfig(run=str(harvest_run), layer="mixed4c", out=str(tmp_path / "sae"),
                            sae=SaeConfig(expansion=2, k=8), batch_size=16, vectors_seen=64, device="cpu", log_every=1, holdout=0))
    full = json.loads((out / "cfg.json").read_text())
    cfg = full["metadata"]
    assert cfg["layer"] == "mixed4c" and full["d_in"] == 512 and full["d_sae"] == 1024
    assert cfg["branch_slices"]["5x5"] == [384, 448] and cfg["weights_id"] == "random(seed=0)"
    assert cfg["random_weights"] is True and "RANDOM" in cfg["warning"]
    assert cfg["vectors_seen"] == 64 and 0 <= cfg["dead_fraction"] <= 1 and cfg["final_fvu"] is None  # --holdout 0
    seconds = json.loads((out / "train.json").read_text())["seconds"]
    assert {"open", "init", "data", "steps", "evaluation", "saving"} <= set(seconds) and seconds["steps"] > 0
    held = json.loads((train(small(vectors, tmp_path / "held")) / "cfg.json").read_text())["metadata"]
    assert held["final_fvu"] > 0 and held["final_fvu_on"] == "256 held-out vectors"
    records = read_jsonl(out / "metrics.jsonl")
    assert len(records) == 4 and {"fvu", "l0", "dead_fraction", "loss_nmse", "vectors_seen"} <= set(records[0])
    assert all(0 < r["l0"] <= 8 for r in records)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, vectors):
    cfg = small(vectors, tmp_path / "s", lr=1e30, log_every=1, checkpoint_every=128, vectors_seen=128 * 20)
    with pytest.raises(NonFiniteLoss, match="last good checkpoint .*Lower --lr"):
        train(cfg)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "s" / CHECKPOINT), framework="pt") as f:
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys() if k.startswith("param/"))


def test_bad_inputs(tmp_path, vectors):
    with pytest.raises(StoreError, match="width 16 but mixed4c is 512 wide"):
        train(small(vectors, tmp_path / "a", layer="mixed4c"))
    with pytest.raises(ValueError, match="either --run"):
        train(TrainConfig(out=str(tmp_path / "b")))
    train(small(vectors, tmp_path / "c"))
    with pytest.raises(FileExistsError, match="--resume"):
        train(small(vectors, tmp_path / "c"))
    with pytest.raises(ValueError, match="cannot resume.*k=4"):
        train(small(vectors, tmp_path / "c", k=5, resume=True))
    np.save(tmp_path / "ints.npy", np.zeros((10, 3), np.int64))
    with pytest.raises(StoreError, match="needs float vectors of shape"):
        train(small(tmp_path / "ints.npy", tmp_path / "d"))


def test_a_damaged_checkpoint_is_named_with_the_fix(tmp_path, vectors):
    from safetensors.torch import save_file

    from helpers.sae.checkpoint import CheckpointError

    out = train(small(vectors, tmp_path / "s", vectors_seen=128 * 3))
    ckpt = out / CHECKPOINT
    good = ckpt.read_bytes()
    cases = {"truncated": good[: len(good) // 2], "garbage": b"not a checkpoint at all" * 50}
    for name, data in cases.items():
        ckpt.write_bytes(data)
        with pytest.raises(CheckpointError, match=f"{ckpt} is not a readable checkpoint .*delete .* to train from"):
            train(small(vectors, out, vectors_seen=128 * 6, resume=True))
    save_file({"x": torch.zeros(2)}, ckpt)  # a safetensors file without this trainer's metadata
    with pytest.raises(CheckpointError, match="lacks this trainer's metadata"):
        train(small(vectors, out, vectors_seen=128 * 6, resume=True))


def test_a_checkpoint_from_before_the_nested_sae_config_resumes(tmp_path, vectors):
    """Checkpoints written while the SAE's shape was flat in the config (k, expansion, ... at the top) still
    resume under the same shape and are refused, naming the setting, under another."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "s"
    train(small(vectors, out, vectors_seen=128 * 4, checkpoint_every=128 * 4))
    ckpt = out / CHECKPOINT
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    config.update(config.pop("sae"))  # the old, flat layout
    config.pop("kernels")
    save_file(load_file(ckpt), ckpt, metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(ValueError, match="cannot resume.*k=4"):
        train(small(vectors, out, k=5, vectors_seen=128 * 8, resume=True))
    resumed = train(small(vectors, out, vectors_seen=128 * 8, resume=True))
    assert json.loads((resumed / "cfg.json").read_text())["metadata"]["vectors_seen"] == 128 * 8


def test_resume_cuts_the_metrics_back_to_the_checkpoint(tmp_path, vectors):
    out = tmp_path / "s"
    cfg = dict(vectors_seen=128 * 8, log_every=1, checkpoint_every=128 * 3)
    straight = read_jsonl(train(small(vectors, tmp_path / "straight", **cfg)) / "metrics.jsonl")
    with pytest.raises(NonFiniteLoss):  # a crash after step 4, past the checkpoint at step 3
        import helpers.sae.train as T

        real = T._log
        def crash(out_, state, *a, **k):
            if state.step == 5:
                raise NonFiniteLoss("simulated crash")
            return real(out_, state, *a, **k)
        T._log = crash
        try:
            train(small(vectors, out, **cfg))
        finally:
            T._log = real
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    train(small(vectors, out, resume=True, **cfg))
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # step 4 once, not twice
    assert [r["fvu"] for r in read_jsonl(out / "metrics.jsonl")] == [r["fvu"] for r in straight]


def test_numbers_that_make_no_sense_are_refused(tmp_path, vectors):
    np.save(tmp_path / "ten.npy", np.random.default_rng(0).random((10, 16), np.float32))
    with pytest.raises(ValueError, match="only 1 of the 10 vectors can be held out .*--holdout 0"):
        train(small(tmp_path / "ten.npy", tmp_path / "a"))
    with pytest.raises(ValueError, match="--k 65 exceeds the 64 latents"):
        train(small(vectors, tmp_path / "b", k=65))
    with open(tmp_path / "two.npy", "wb") as f:  # an .npz archive under an .npy name
        np.savez(f, a=np.zeros((4, 4)), b=np.ones(3))
    with pytest.raises(StoreError, match="is an .npz archive .*numpy.save"):
        train(small(tmp_path / "two.npy", tmp_path / "c"))
    for bad in (dict(lr=0), dict(batch_size=-64), dict(vectors_seen=-5), dict(log_every=0),
                dict(checkpoint_every=0), dict(batch_size=0)):
        option = "--" + next(iter(bad)).replace("_", "-")
        with pytest.raises(ValueError, match=f"{option} .* is out of range"):
            small(vectors, tmp_path / "d", **bad)


@pytest.mark.parametrize("fused", [True, False])
def test_our_adam_takes_torchs_adam_steps(monkeypatch, fused):
    """adam.Adam against torch.optim.Adam (the reference): the same parameters after several steps with
    gradients missing on some, on the fused kernel and on the fallback a device without it takes."""
    from helpers.sae.adam import Adam

    if not fused:
        def unsupported(*args, **kwargs):
            raise NotImplementedError("no fused Adam on this device")
        monkeypatch.setattr(torch, "_fused_adam_", unsupported)
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(40, 24, generator=g), torch.randn(24, generator=g)]
    ours, theirs = [p.clone().requires_grad_(True) for p in start], [p.clone().requires_grad_(True) for p in start]
    opt, ref = Adam(ours, 3e-2), torch.optim.Adam(theirs, lr=3e-2)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in start]
        for params, o in ((ours, opt), (theirs, ref)):
            o.zero_grad(set_to_none=True)
            for i, (p, grad) in enumerate(zip(params, grads)):
                if not (i == 1 and step == 2):  # a parameter without a gradient is left alone
                    p.grad = grad.clone()
            o.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (ours[0] - start[0]).abs().max() > 0.1  # it did move
    for p, q in zip(ours, theirs):  # the same state, so a checkpoint of either resumes in the other
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(torch.as_tensor(opt.state[p][key]).float(), torch.as_tensor(ref.state[q][key]).float())


@pytest.mark.parametrize("fused", [True, False])
def test_autograd_sees_a_parameter_our_adam_changed(monkeypatch, fused):
    """A step changes parameters in place; a graph that saved one before the step must refuse to backpropagate
    through its old value, as after any in-place change (torch's fused kernel alone would not tell autograd)."""
    from helpers.sae.adam import Adam

    if not fused:
        monkeypatch.setattr(torch, "_fused_adam_", lambda *a, **k: (_ for _ in ()).throw(NotImplementedError()))
    w = torch.randn(5, requires_grad=True)
    saved = (w * w).sum()  # saves w for its backward pass
    opt = Adam([w], 0.1)
    w.grad = torch.ones(5)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_the_optimizer_does_not_import_torch_dynamo():
    """Constructing and stepping adam.Adam leaves torch._dynamo unimported (1.4 s here, 3 s on a GPU
    machine, that every training process would otherwise pay before its first step)."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom helpers.sae.adam import Adam\np = torch.zeros(3, requires_grad=True)\n"
            "o = Adam([p], 0.1)\np.grad = torch.ones(3)\no.step()\nprint('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_second_training_into_the_same_out_stops_at_once(tmp_path, vectors):
    """While one training holds --out, another (the same or another seed) stops with the holder's pid and writes
    nothing there; then the folder is free again. --out naming a file is refused by name."""
    from helpers.files import LockedError, exclusive_lock
    from helpers.sae.train import LOCK

    out = tmp_path / "s"
    with exclusive_lock(out / LOCK, "the training directory"):
        with pytest.raises(LockedError, match=r"in use by pid \d+ .*wait for it to finish, or choose another --out"):
            train(small(vectors, out, seed=1))
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
    train(small(vectors, out))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="--out .*file is a file"):
        train(small(vectors, tmp_path / "file"))


def test_two_trainings_at_once_one_runs_one_stops(tmp_path, vectors):
    """Two real processes into one --out: one trains, the other says why it stopped; metrics.jsonl holds one run."""
    import subprocess
    import sys

    def args(seed):
        return [sys.executable, "-m", "helpers", "train", "--vectors", str(vectors), "--out", str(tmp_path / "s"),
                "--expansion", "4", "--k", "4", "--batch-size", "128", "--vectors-seen", str(128 * 40), "--holdout",
                "256", "--log-every", "1", "--device", "cpu", "--seed", str(seed)]

    procs = [subprocess.Popen(args(seed), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    results = [(p.returncode, err) for p in procs for _, err in [p.communicate()]]
    codes = sorted(code for code, _ in results)
    if codes == [0, 0] or any("already holds a training checkpoint" in err for _, err in results):
        pytest.skip("the two trainings did not overlap (one started after the other had finished)")
    assert codes == [0, 2], "\n\n".join(f"exit {code}:\n{err[-2000:]}" for code, err in results)
    assert "in use by pid" in next(err for code, err in results if code == 2)
    steps = [r["step"] for r in read_jsonl(tmp_path / "s" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) == list(range(1, 41))  # one run's records, not two interleaved
    winner = next(seed for (code, _), seed in zip(results, (0, 1)) if code == 0)
    assert json.loads((tmp_path / "s" / "train.json").read_text())["config"]["seed"] == winner


def test_non_finite_or_constant_held_out_vectors_are_named_not_printed_as_numbers(tmp_path):
    """NaN only in the held-out rows once gave "final_fvu": NaN (invalid JSON) and exit 0; constant rows an FVU of
    3e6 and rows near 1e-40 one of 2e9. Now: refused by name, or the FVU recorded as undefined, saying why."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 16)).astype(np.float32)
    x[-5, 3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(ValueError, match=r"held-out vectors of .*nan.npy \(its last 256 rows\) hold NaN"):
        train(small(tmp_path / "nan.npy", tmp_path / "a"))
    for name, rows in (("constant", np.ones((4096, 16), np.float32)),
                       ("tiny", (rng.normal(size=(4096, 16)) * 1e-40).astype(np.float32))):
        np.save(tmp_path / f"{name}.npy", rows)
        out = train(small(tmp_path / f"{name}.npy", tmp_path / name))
        meta = json.loads((out / "cfg.json").read_text())["metadata"]
        assert meta["final_fvu"] is None and meta["final_fvu_on"].startswith("undefined: the 256 held-out vectors")
        json.loads((out / "train.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in train.json"))
    from helpers.sae.train import varies

    assert varies(torch.from_numpy(x[:100]).nan_to_num()) and not varies(torch.ones(10, 4))


def test_a_training_called_under_no_grad_still_learns(tmp_path, vectors):
    """An evaluation that trains what it needs may run inside torch.no_grad(); the training turns gradients on."""
    with torch.no_grad():
        out = train(small(vectors, tmp_path / "s"))
    assert json.loads((out / "train.json").read_text())["final_fvu"] is not None
