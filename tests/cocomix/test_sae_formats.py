"""Foreign SAE formats: sparsify (its own module and save), SAELens and OpenAI layouts written by hand, checked
against their documented forward passes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conceptlm.cocomix.sae import TopKSAE, save_sae
from conceptlm.cocomix.sae_formats import detect_sae_format, load_any_sae
from conceptlm.core.errors import CheckpointError

D, C, K = 16, 64, 5


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _dense(sae: TopKSAE, h: torch.Tensor) -> torch.Tensor:
    x, _, _ = sae.normalize(h)
    return sae.dense_activations(*sae.encode(x))


def _topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))


def test_sparsify_saved_by_sparsify_matches_its_forward(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=C, k=K))
    with torch.no_grad():
        coder.encoder.bias.copy_(torch.randn(C, generator=_g(1)) * 0.2)
        coder.b_dec.copy_(torch.randn(D, generator=_g(2)) * 0.2)
    coder.save_to_disk(tmp_path / "sp")
    assert detect_sae_format(tmp_path / "sp") == "sparsify"
    ours = load_any_sae(tmp_path / "sp")
    assert (ours.d_in, ours.n_latents, ours.k, ours.normalize_input) == (D, C, K, False)
    x = torch.randn(40, D, generator=_g(3))
    with torch.no_grad():
        ref = coder(x)
        enc = coder.encode(x)
        dense_ref = torch.zeros(40, C).scatter(-1, enc.top_indices, enc.top_acts)
        torch.testing.assert_close(ours.reconstruct(x), ref.sae_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_dense(ours, x), dense_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(enc.top_acts, enc.top_indices), coder.decode(enc.top_acts,
                                                                                            enc.top_indices))


def test_sparsify_unsupported_options_are_refused(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed")
    for name, kw in (("tc", {"transcode": True}), ("skip", {"skip_connection": True})):
        sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=C, k=K, **kw)).save_to_disk(tmp_path / name)
        with pytest.raises(CheckpointError, match=f"field '{list(kw)[0]}'.*not supported"):
            load_any_sae(tmp_path / name)


def _write_saelens(path, *, norm="none", apply_b_dec=True, old_k=False, arch="topk"):
    g = _g(4)
    w = {"W_enc": torch.randn(D, C, generator=g) * 0.3, "b_enc": torch.randn(C, generator=g) * 0.1,
         "W_dec": torch.randn(C, D, generator=g) * 0.3, "b_dec": torch.randn(D, generator=g) * 0.2}
    path.mkdir()
    save_file(w, str(path / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": D, "d_sae": C, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": norm, "reshape_activations": "none",
           "meta": {"hook_name": "blocks.1.hook_resid_post"}}
    cfg.update({"activation_fn_kwargs": {"k": K}} if old_k else {"k": K})
    (path / "cfg.json").write_text(json.dumps(cfg))
    return w


def _saelens_reference(w, x, *, norm, apply_b_dec):
    """SAELens' documented TopK forward (process_sae_in -> TopK(ReLU) -> decode -> norm_out)."""
    mu = std = None
    if norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    acts = _topk_relu((x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"], K)
    out = acts @ w["W_dec"] + w["b_dec"]
    return acts, (out * std + mu if norm == "layer_norm" else out)


@pytest.mark.parametrize("norm, apply_b_dec, old_k", [("none", True, False), ("layer_norm", True, True),
                                                      ("none", False, False)])
def test_saelens_topk_layout_matches_its_forward(tmp_path, norm, apply_b_dec, old_k):
    w = _write_saelens(tmp_path / "sl", norm=norm, apply_b_dec=apply_b_dec, old_k=old_k)
    sae = load_any_sae(tmp_path / "sl")
    assert sae.meta["source_format"] == "saelens" and sae.normalize_input == (norm == "layer_norm")
    x = torch.randn(30, D, generator=_g(5)) * 2 + 0.5
    acts, out = _saelens_reference(w, x, norm=norm, apply_b_dec=apply_b_dec)
    with torch.no_grad():
        torch.testing.assert_close(_dense(sae, x), acts, atol=1e-5, rtol=1e-5)
        # ours de-normalizes with sigma + eps (the exact inverse), SAELens with sigma: relative eps / sigma
        torch.testing.assert_close(sae.reconstruct(x), out, atol=1e-4, rtol=1e-4)


def test_saelens_refuses_other_architectures_and_normalizations(tmp_path):
    _write_saelens(tmp_path / "a", arch="jumprelu")
    with pytest.raises(CheckpointError, match="field 'architecture'"):
        load_any_sae(tmp_path / "a")
    _write_saelens(tmp_path / "b", norm="constant_norm_rescale")
    with pytest.raises(CheckpointError, match="field 'normalize_activations'"):
        load_any_sae(tmp_path / "b")


def test_openai_pt_layout_matches_the_reference_forward(tmp_path):
    g = _g(6)
    sd = {"pre_bias": torch.randn(D, generator=g) * 0.2, "encoder.weight": torch.randn(C, D, generator=g) * 0.3,
          "latent_bias": torch.randn(C, generator=g) * 0.1, "decoder.weight": torch.randn(D, C, generator=g) * 0.3,
          "stats_last_nonzero": torch.zeros(C, dtype=torch.long),
          "latents_activation_frequency": torch.zeros(C), "latents_mean_square": torch.zeros(C),
          "activation": "TopK", "activation_state_dict": {"k": K, "postact_fn": "ReLU"}}
    torch.save(sd, tmp_path / "5.pt")
    sae = load_any_sae(tmp_path / "5.pt")
    assert sae.normalize_input and sae.k == K
    x = torch.randn(25, D, generator=_g(7)) * 3 - 1
    # OpenAI's TopK SAE (CoCoMix paper §2.1): LN (unbiased std), c = TopK(ReLU)(W_enc (x~ - b_pre) + b_lat),
    # x^ = (W_dec c + b_pre) sigma + mu
    mu = x.mean(-1, keepdim=True)
    sigma = (x - mu).std(-1, keepdim=True)
    xn = (x - mu) / (sigma + 1e-5)
    c = _topk_relu((xn - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"], K)
    ref = (c @ sd["decoder.weight"].T + sd["pre_bias"]) * sigma + mu
    with torch.no_grad():
        torch.testing.assert_close(_dense(sae, x), c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.reconstruct(x), ref, atol=1e-4, rtol=1e-4)
    torch.save({**sd, "activation": "ReLU"}, tmp_path / "relu.pt")
    with pytest.raises(CheckpointError, match="field 'activation'"):
        load_any_sae(tmp_path / "relu.pt")


def test_detection_of_ours_and_unknown(tmp_path):
    save_sae(TopKSAE(D, C, K, seed=0), tmp_path / "ours")
    assert detect_sae_format(tmp_path / "ours") == "ours"
    assert load_any_sae(tmp_path / "ours").k == K
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a known SAE format"):
        load_any_sae(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not found"):
        load_any_sae(tmp_path / "nope")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_any_sae(tmp_path / "garbage.pt")
