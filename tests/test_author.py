import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from conftest import stub_hub
from helpers.run import author
from helpers.run.author import (REPO_ID, AuthorSAEMissing, AuthorSAEUnavailable, Candidate, author_file_for,
                                candidates, choose, fetch_author_sae, from_author_state_dict)

# the names the author's code writes (shared/PAPER.md), and what else the repository may hold
WIDTHS = {"mixed4a": 508, "mixed4b": 512, "mixed4c": 512, "mixed4d": 528, "mixed4e": 832}
DECOYS = ["README.md", "TopK_SAE_for_Mixed4a_3x3.pth", "TopK_SAE_for_Mixed4d_1x1.pth", "TopK_SAE_for_Mixed4e_5x5.pth",
          "TopK_SAE_for_Mixed4a_pool.pth", "mixed4c_tensor_dataset.pt", "TOP_k_SAE_mixed4c_tensor_dataset.pt"]


def author_forward(state, x, k=32):
    """The author's Top_K_SAE.forward, written out: encode, TopK + ReLU, tied decode."""
    encoded = (x - state["b_pre"]) @ state["W_enc.weight"].T + state["b_latent"]
    top = encoded.topk(k, dim=-1)
    z = torch.zeros_like(encoded).scatter(-1, top.indices, torch.relu(top.values))
    return z @ state["W_enc.weight"] + state["b_pre"]


def test_conversion_reproduces_the_author_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"W_enc.weight": torch.randn(8192, 512, generator=g) / 20, "b_pre": torch.randn(512, generator=g),
             "b_latent": torch.randn(8192, generator=g) / 10}
    torch.save(state, tmp_path / "TOP_k_SAE_mixed4c.pth")
    loaded = torch.load(tmp_path / "TOP_k_SAE_mixed4c.pth", weights_only=True)
    sae = from_author_state_dict(loaded)
    assert sae.tied == "full" and sae.k == 32 and (sae.d_in, sae.d_sae) == (512, 8192)
    x = torch.relu(torch.randn(16, 512, generator=g))
    torch.testing.assert_close(sae(x), author_forward(state, x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.decoder_directions, state["W_enc.weight"])


def test_bad_state_dicts():
    with pytest.raises(ValueError, match="missing"):
        from_author_state_dict({"W_enc.weight": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="inconsistent shapes"):
        from_author_state_dict({"W_enc.weight": torch.zeros(4, 2), "b_pre": torch.zeros(3), "b_latent": torch.zeros(4)})


def test_file_matching_takes_whole_layer_saes_only():
    files = ["TOP_k_SAE_mixed4c.pth", "TOP_k_SAE_mixed4b.pth", "TOP_k_SAE_mixed4b (1).pth", "TopK_SAE_for_Mixed4d.pth",
             "sub/TOP_k_SAE_mixed4e.pth", *DECOYS]
    assert author_file_for("mixed4c", files) == "TOP_k_SAE_mixed4c.pth"
    assert author_file_for("mixed4d", files) == "TopK_SAE_for_Mixed4d.pth"  # never the 1x1 branch SAE
    assert author_file_for("mixed4e", files) == "sub/TOP_k_SAE_mixed4e.pth"  # never the 5x5 branch SAE
    with pytest.raises(AuthorSAEMissing, match="no file named as a whole-layer SAE of mixed4a"):
        author_file_for("mixed4a", files)  # the 3x3 and pool branch SAEs are not mixed4a's SAE
    with pytest.raises(AuthorSAEMissing, match="2 different files .*mixed4b.*cannot be told"):
        author_file_for("mixed4b", files)  # by name alone the copy and the original cannot be told apart
    assert [c.copy for c in candidates("mixed4b", files)] == [0, 1]


def test_several_matches_are_chosen_by_a_stated_rule():
    same = [Candidate("TOP_k_SAE_mixed4b (1).pth", 1, "d0"), Candidate("TOP_k_SAE_mixed4b.pth", 0, "d0")]
    chosen, why = choose("mixed4b", sorted(same, key=lambda c: c.copy))
    assert chosen.path == "TOP_k_SAE_mixed4b.pth" and "same bytes" in why
    dated = [Candidate("TOP_k_SAE_mixed4b.pth", 0, "d0", "2025-01-02T00:00:00"),
             Candidate("TOP_k_SAE_mixed4b (1).pth", 1, "d1", "2025-03-01T00:00:00")]
    chosen, why = choose("mixed4b", dated)
    assert chosen.path == "TOP_k_SAE_mixed4b (1).pth" and "most recently committed" in why
    with pytest.raises(AuthorSAEMissing, match="cannot be told"):
        choose("mixed4b", [Candidate("a", 0, "d0"), Candidate("b", 1, "d1")])  # other bytes, no dates (offline)
    with pytest.raises(AuthorSAEMissing, match="cannot be told"):
        choose("mixed4b", [Candidate("a", 0, "d0", "2025"), Candidate("b", 1, "d1", "2025")])  # a tie


def author_state(width: int, latents: int, seed: int) -> dict:
    """What the author's notebook saves: four keys, the decoder the encoder's storage."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(latents, width, generator=g) / width ** 0.5
    return {"b_pre": torch.randn(width, generator=g), "b_latent": torch.zeros(latents), "W_enc.weight": w,
            "W_dec.linear.weight": w}


def stand_in_hub(root: Path, files: dict[str, object]) -> Path:
    """A hub cache holding the author's repository at one commit: ``files`` name -> state dict (or bytes)."""
    repo = root / f"models--{REPO_ID.replace('/', '--')}"
    commit = "c0ffee" + "0" * 34
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (snapshot / name).write_bytes(content)
        else:
            torch.save(content, snapshot / name)
    return snapshot


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """The stand-in repository: mixed4c and mixed4d as named in the author's code, mixed4b twice with the same
    bytes, branch SAEs and dumps as decoys, mixed4a and mixed4e only as branch SAEs; a 112-wide file under
    mixed4d's whole-layer name in a second folder (a branch SAE misnamed)."""
    import huggingface_hub.constants as constants

    files = {f"TOP_k_SAE_{layer}.pth": author_state(WIDTHS[layer], 4 * WIDTHS[layer], i)
             for i, layer in enumerate(("mixed4b", "mixed4c"))}
    files["TopK_SAE_for_Mixed4d.pth"] = author_state(528, 4 * 528, 5)
    files["TopK_SAE_for_Mixed4a_3x3.pth"] = author_state(204, 3264, 6)
    files["TopK_SAE_for_Mixed4e_5x5.pth"] = author_state(128, 2048, 7)
    files["mixed4c_tensor_dataset.pt"] = {"x": torch.zeros(3, 512)}
    snapshot = stand_in_hub(tmp_path / "hf", files)
    shutil.copy(snapshot / "TOP_k_SAE_mixed4b.pth", snapshot / "TOP_k_SAE_mixed4b (1).pth")  # a download's copy
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return snapshot


def test_every_layer_gets_its_sae_or_a_clear_refusal_from_the_cache(hub):
    c = fetch_author_sae("mixed4c")
    assert (c.sae.d_in, c.sae.d_sae, c.sae.k, c.sae.tied) == (512, 2048, 32, "full")
    assert c.file == "TOP_k_SAE_mixed4c.pth" and c.revision == "c0ffee" + "0" * 34
    assert c.source == f"hf:{REPO_ID}@{c.revision}/TOP_k_SAE_mixed4c.pth"
    state = torch.load(hub / "TOP_k_SAE_mixed4c.pth", weights_only=True)
    x = torch.relu(torch.randn(8, 512))
    torch.testing.assert_close(c.sae(x), author_forward(state, x), rtol=1e-4, atol=1e-4)
    b = fetch_author_sae("mixed4b")
    assert b.file == "TOP_k_SAE_mixed4b.pth" and "same bytes" in b.why
    assert fetch_author_sae("mixed4d").sae.d_in == 528
    (hub / "TOP_k_SAE_mixed4b (1).pth").unlink()
    torch.save(author_state(512, 2048, 9), hub / "TOP_k_SAE_mixed4b (1).pth")  # now another SAE: offline, refused
    with pytest.raises(AuthorSAEMissing, match="2 different files"):
        fetch_author_sae("mixed4b")


def test_a_file_of_the_wrong_width_or_kind_is_refused_by_name(hub):
    torch.save(author_state(112, 1792, 3), hub / "TopK_SAE_for_Mixed4d.pth")  # a branch SAE under the layer's name
    with pytest.raises(AuthorSAEMissing, match="encodes 112-wide vectors but mixed4d is 528 wide"):
        fetch_author_sae("mixed4d")
    broken = author_state(512, 2048, 4)
    broken["b_latent"][3] = float("nan")
    torch.save(broken, hub / "TOP_k_SAE_mixed4c.pth")
    with pytest.raises(AuthorSAEMissing, match="b_latent holds NaN"):
        fetch_author_sae("mixed4c")
    (hub / "TOP_k_SAE_mixed4c.pth").write_bytes(b"<!doctype html><title>Not found</title>")
    with pytest.raises(AuthorSAEMissing, match="TOP_k_SAE_mixed4c.pth is not a loadable PyTorch state dict"):
        fetch_author_sae("mixed4c")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_with_code_never_runs(hub, capsys):
    import pickle

    (hub / "TOP_k_SAE_mixed4c.pth").write_bytes(pickle.dumps({"W_enc.weight": _Evil()}))
    with pytest.raises(AuthorSAEMissing, match="not a loadable PyTorch state dict"):
        fetch_author_sae("mixed4c")
    assert "pwned" not in capsys.readouterr().out


def test_the_hubs_listing_decides_what_the_cache_cannot(hub, tmp_path, monkeypatch):
    """Online: a layer with no whole-layer file is refused as unpublished; two different copies are chosen by
    their last commit."""
    torch.save(author_state(512, 2048, 9), hub / "TOP_k_SAE_mixed4b (1).pth")
    dates = {"TOP_k_SAE_mixed4b.pth": datetime(2025, 1, 2, tzinfo=timezone.utc),
             "TOP_k_SAE_mixed4b (1).pth": datetime(2025, 2, 1, tzinfo=timezone.utc)}
    monkeypatch.setattr(author, "_from_cache", lambda layer, cache_dir: None)  # nothing downloaded yet
    stub_hub(monkeypatch, hub, tmp_path / "downloaded", dates)
    b = fetch_author_sae("mixed4b")
    assert b.file == "TOP_k_SAE_mixed4b (1).pth" and "most recently committed" in b.why and b.revision == "d" * 40
    for layer in ("mixed4a", "mixed4e"):  # only branch SAEs of these layers were published
        with pytest.raises(AuthorSAEMissing, match=f"no file named as a whole-layer SAE of {layer}"):
            fetch_author_sae(layer)


def test_offline_fetch_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    with pytest.raises(AuthorSAEUnavailable, match="matboz/SAEs_for_inceptionV1.*internet"):
        fetch_author_sae("mixed4c")


def test_the_pages_state_where_our_method_departs_from_the_authors():
    """Chapter 09 and the reproduce page name each difference between the author's code and this book."""
    import nbformat

    root = Path(__file__).resolve().parents[1]
    chapter = "\n".join(c.source for c in nbformat.read(root / "nbs" / "09_comparing_saes.ipynb", as_version=4).cells)
    page = (root / "book" / "reproduce.md").read_text()
    for text in (chapter, page):
        for fact in ("with replacement", "float32", "x*255-117", "[0, 1]", "224x224", "mean", "Euclidean", "cosine",
                     "branch SAE"):
            assert fact in text, fact
