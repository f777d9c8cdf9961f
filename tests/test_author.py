import pytest
import torch

from helpers.run.author import AuthorSAEUnavailable, author_file_for, fetch_author_sae, from_author_state_dict


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


def test_file_matching():
    files = ["README.md", "TOP_k_SAE_mixed4c.pth", "TOP_k_SAE_mixed4b (1).pth", "TopK_SAE_for_Mixed4d.pth"]
    assert author_file_for("mixed4d", files) == "TopK_SAE_for_Mixed4d.pth"
    with pytest.raises(AuthorSAEUnavailable, match="found none"):
        author_file_for("mixed4e", files)


def test_offline_fetch_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    with pytest.raises(AuthorSAEUnavailable, match="matboz/SAEs_for_inceptionV1.*internet"):
        fetch_author_sae("mixed4c")
