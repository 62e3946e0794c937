"""TopK SAE: formulas against dense references, AuxK, firing counters, decoder norm, toy fits, save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conceptlm.cocomix.sae import (
    SAE_CONFIG,
    SAE_WEIGHTS,
    TopKSAE,
    auxk_sum,
    batch_fvu,
    fvu_terms,
    l0_terms,
    load_sae,
    mse_sum,
    save_sae,
)
from conceptlm.core.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sae(d=16, n=48, k=5, **kw) -> TopKSAE:
    sae = TopKSAE(d, n, k, seed=0, **kw)
    with torch.no_grad():  # non-trivial biases so every term of the formulas matters
        sae.b_enc.copy_(torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.3)
        sae.b_dec.copy_(torch.randn(d, generator=torch.Generator().manual_seed(2)) * 0.3)
    return sae


def test_normalize_is_layer_norm_with_unbiased_std_and_denormalize_inverts_it():
    sae = _sae()
    h = torch.randn(3, 7, 16) * 4 + 2
    x, mu, sigma = sae.normalize(h)
    ref_mu = h.sum(-1, keepdim=True) / 16
    ref_sigma = ((h - ref_mu).pow(2).sum(-1, keepdim=True) / 15).sqrt()
    torch.testing.assert_close(mu, ref_mu)
    torch.testing.assert_close(sigma, ref_sigma)
    torch.testing.assert_close(x, (h - ref_mu) / (ref_sigma + 1e-5))
    torch.testing.assert_close(sae.denormalize(x, mu, sigma), h)
    plain = _sae(normalize_input=False)
    x2, mu2, sigma2 = plain.normalize(h)
    assert torch.equal(x2, h) and torch.equal(mu2, torch.zeros(3, 7, 1)) and torch.equal(sigma2, torch.ones(3, 7, 1))


def test_encode_keeps_exactly_k_relu_values_of_the_dense_topk():
    sae = _sae()
    x = torch.randn(4, 9, 16)
    pre = sae.pre_activations(x)
    torch.testing.assert_close(pre, (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (4, 9, 5) and indices.dtype == torch.long
    assert (values >= 0).all()
    assert all(len(set(row.tolist())) == 5 for row in indices.reshape(-1, 5))  # k distinct latents per token
    dense = sae.dense_activations(values, indices)
    ref = torch.zeros_like(pre)
    top = pre.topk(5, dim=-1)
    ref.scatter_(-1, top.indices, F.relu(top.values))
    torch.testing.assert_close(dense, ref)
    assert ((dense != 0).sum(-1) <= 5).all()


def test_decode_equals_dense_product_and_reconstruct_is_in_input_space():
    sae = _sae()
    h = torch.randn(6, 16) * 3 - 1
    x, mu, sigma = sae.normalize(h)
    values, indices = sae.encode(x)
    x_hat = sae.decode(values, indices)
    torch.testing.assert_close(x_hat, sae.dense_activations(values, indices) @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(sae.reconstruct(h), x_hat * (sigma + 1e-5) + mu)
    out = sae(h)
    torch.testing.assert_close(out.x_hat, x_hat)
    assert out.aux is None  # no dead latents yet


def test_decoder_gradient_is_orthogonal_to_rows_and_rows_renormalize():
    sae = _sae()
    mse_sum(sae(torch.randn(32, 16))).backward()
    g = sae.W_dec.grad
    assert g.abs().max() > 0
    # cosine between each row's gradient and the row itself: zero up to fp32 rounding
    cos = (g * sae.W_dec).sum(-1) / (g.norm(dim=-1) * sae.W_dec.norm(dim=-1)).clamp_min(1e-12)
    assert cos.abs().max() < 1e-5, cos.abs().max()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(48, 1) + 0.5)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(48))


def test_firing_counters_are_step_granular():
    sae = _sae(n=6, k=1, d=4, dead_after_tokens=10)
    sae.record_firing(torch.tensor([1, 0, 0, 0, 0, 0]), 4)
    sae.record_firing(torch.tensor([0, 0, 2, 0, 0, 0]), 3)
    assert sae.tokens_since_fired.tolist() == [0] * 6  # nothing committed yet
    sae.commit_firing()
    assert sae.tokens_since_fired.tolist() == [0, 7, 0, 7, 7, 7]
    sae.record_firing(torch.tensor([0, 1, 0, 0, 0, 0]), 5)
    sae.commit_firing()
    assert sae.tokens_since_fired.tolist() == [5, 0, 5, 12, 12, 12]
    assert sae.dead_mask().tolist() == [False, False, False, True, True, True]
    assert not sae.fired_in_step.any() and int(sae.tokens_in_step) == 0
    # forward in training mode records firing (values > 0 only)
    sae.train()
    out = sae(torch.randn(5, 4))
    assert int(sae.tokens_in_step) == 5
    assert sae.fired_in_step.tolist() == (sae.fired_latents(out.values, out.indices) > 0).tolist()


def test_auxk_reconstruction_and_loss_match_dense_reference():
    sae = _sae(k_aux=3, dead_after_tokens=1)
    sae.train()
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::4] = True  # 12 dead latents
    sae.tokens_since_fired.copy_(dead.long() * 5)
    h = torch.randn(10, 16)
    out = sae(h, track=False)
    pre = sae.pre_activations(out.x).detach()
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(3, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
    ref_aux = dense @ sae.W_dec.detach()
    torch.testing.assert_close(out.aux, ref_aux)
    e = (out.x - out.x_hat).detach()
    torch.testing.assert_close(auxk_sum(out), ((e - ref_aux) ** 2).sum() / 16)
    torch.testing.assert_close(mse_sum(out), ((out.x - out.x_hat) ** 2).sum() / 16)
    # the AuxK term trains the dead latents' encoder rows (and nothing flows through the detached residual)
    auxk_sum(out).backward()
    assert sae.W_enc.grad[dead].abs().sum() > 0 and sae.W_enc.grad[~dead].abs().sum() == 0
    sae.eval()
    assert sae(h).aux is None


@pytest.mark.parametrize("normalize", [True, False])
def test_training_forward_and_sparse_backward_equal_the_dense_autograd_reference(monkeypatch, normalize):
    """The training forward (chunked, no-autograd pre-activations + a sparse backward) gives the dense formulas'
    values bit for bit and their gradients (MSE + AuxK), also when the batch spans several chunks."""
    import conceptlm.cocomix.sae as sae_mod

    h = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(3))
    dead = torch.zeros(48, dtype=torch.bool)
    dead[1::3] = True
    grads = []
    for chunk_rows, chunk_elements in ((8192, 1 << 22), (7, 100)):  # one chunk / 5 chunks, 2-row backward parts
        monkeypatch.setattr(sae_mod, "ENCODE_CHUNK_ROWS", chunk_rows)
        monkeypatch.setattr(sae_mod, "_BACKWARD_CHUNK_ELEMENTS", chunk_elements)
        sae = _sae(normalize_input=normalize, k_aux=4, dead_after_tokens=1)
        sae.train()
        sae.tokens_since_fired.copy_(dead.long() * 3)
        out = sae(h, track=False)
        (mse_sum(out) + 0.5 * auxk_sum(out)).backward()
        got = {n: p.grad.clone() for n, p in sae.named_parameters()}
        sae.zero_grad()
        x, _, _ = sae.normalize(h)  # the dense reference: autograd through the (3, 10, 48) pre-activations
        pre = sae.pre_activations(x)
        top = pre.topk(5, dim=-1, sorted=False)
        x_hat = sae.decode(F.relu(top.values), top.indices)
        aux_top = pre.masked_fill(~dead, float("-inf")).topk(4, dim=-1, sorted=False)
        aux = sae.dense_activations(F.relu(aux_top.values), aux_top.indices) @ sae.W_dec
        if chunk_rows == 8192:
            assert torch.equal(out.values, F.relu(top.values)) and torch.equal(out.indices, top.indices)
            assert torch.equal(out.x_hat, x_hat)
        else:
            torch.testing.assert_close(out.values, F.relu(top.values))
        torch.testing.assert_close(out.aux, aux)
        loss = ((x - x_hat) ** 2).sum() / 16 + 0.5 * (((x - x_hat).detach() - aux) ** 2).sum() / 16
        loss.backward()
        for name, p in sae.named_parameters():
            torch.testing.assert_close(got[name], p.grad, msg=name)
        grads.append(got)
    assert all(g["W_enc"][~dead].abs().sum() > 0 and g["W_enc"][dead].abs().sum() > 0 for g in grads)


def test_selected_rows_gradient_is_the_same_by_index_add_and_by_the_sorted_reduction():
    """Both reductions of the encoder-weight gradient (index_add_ on the CPU, embedding_bag's sorted one on CUDA)
    equal the dense product ``S^T @ rows`` of the scattered gradient."""
    from conceptlm.cocomix.sae import _selected_rows_grad

    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 12, (30, 4), generator=g)
    grads, rows, w = torch.randn(30, 4, generator=g), torch.randn(30, 6, generator=g), torch.empty(12, 6)
    dense = torch.zeros(30, 12).scatter_add_(1, idx, grads).T @ rows
    for sorted_reduction in (False, True):
        torch.testing.assert_close(_selected_rows_grad(idx, grads, rows, w, sorted_reduction=sorted_reduction), dense)


def test_metrics_fvu_terms_pool_exactly_and_l0():
    x, x_hat = torch.randn(20, 8), torch.randn(20, 8)
    r = x.mean(0)
    sse, sst = fvu_terms(x, x_hat, r)
    assert abs(float(sse / sst) - batch_fvu(x, x_hat)) < 1e-6  # r = the data mean: the usual FVU
    parts = [fvu_terms(x[i:i + 5], x_hat[i:i + 5], r) for i in range(0, 20, 5)]
    torch.testing.assert_close(sum(p[0] for p in parts), sse)
    torch.testing.assert_close(sum(p[1] for p in parts), sst)
    nz, n = l0_terms(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]))
    assert (int(nz), n) == (3, 2)


def _dictionary_data(n: int, g: torch.Generator, d=32, atoms=64, s=3) -> torch.Tensor:
    """Sums of ``s`` random atoms (positive weights) of a fixed unit-norm dictionary."""
    dictionary = torch.randn(atoms, d, generator=torch.Generator().manual_seed(1))
    dictionary = dictionary / dictionary.norm(dim=1, keepdim=True)
    idx = torch.rand(n, atoms, generator=g).argsort(1)[:, :s]
    return ((torch.rand(n, s, generator=g) + 0.5)[..., None] * dictionary[idx]).sum(1)


def _fit_toy(aux_coef: float, *, silence_half: bool, steps: int = 400) -> tuple[float, float]:
    """Train on the dictionary toy; return (FVU, fraction of latents that never fire) on held-out data."""
    sae = TopKSAE(32, 64, 3, normalize_input=False, seed=0, k_aux=16, dead_after_tokens=1024)
    if silence_half:
        with torch.no_grad():
            sae.b_enc[32:] = -1.0  # these latents lose every top-k: plain TopK never trains them
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        sae.commit_firing()
        out = sae(_dictionary_data(256, g))
        loss = (mse_sum(out) + aux_coef * auxk_sum(out)) / 256
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.normalize_decoder()
    sae.eval()
    with torch.no_grad():
        out = sae(_dictionary_data(2048, torch.Generator().manual_seed(9)))
    never = float((sae.fired_latents(out.values, out.indices) == 0).float().mean())
    return batch_fvu(out.x, out.x_hat), never


def test_toy_dictionary_is_reconstructed_with_low_fvu():
    fvu, _ = _fit_toy(1 / 32, silence_half=False)
    assert fvu < 0.2, fvu  # measured 0.106 (64 atoms, 3 per sample, 64 latents, k=3; 6% never fire)


def test_auxk_revives_latents_that_plain_topk_leaves_dead():
    fvu_plain, dead_plain = _fit_toy(0.0, silence_half=True)
    fvu_aux, dead_aux = _fit_toy(1 / 32, silence_half=True)
    # measured: plain TopK 0.47 never fire, FVU 0.307; with AuxK 0.11, FVU 0.122
    assert dead_plain > 0.4 and dead_aux < 0.25, (dead_plain, dead_aux)
    assert fvu_aux < fvu_plain - 0.1, (fvu_plain, fvu_aux)


def test_save_load_round_trip_and_strict_errors(tmp_path):
    sae = _sae(k_aux=7, dead_after_tokens=123)
    save_sae(sae, tmp_path / "s", layer=2, teacher={"path": "t"})
    back = load_sae(tmp_path / "s")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    assert back.config() == sae.config() and back.meta == {"layer": 2, "teacher": {"path": "t"}}
    h = torch.randn(5, 16)
    torch.testing.assert_close(back.reconstruct(h), sae.reconstruct(h))
    cfg = json.loads((tmp_path / "s" / SAE_CONFIG).read_text())
    assert cfg["layer"] == 2 and cfg["k"] == 5

    with pytest.raises(CheckpointError, match="sae.json: not found"):
        load_sae(tmp_path / "nothing")
    bad = tmp_path / "bad"
    save_sae(sae, bad)
    (bad / SAE_CONFIG).write_text(json.dumps({**cfg, "k": "five"}))
    with pytest.raises(CheckpointError, match="field 'k' must be int"):
        load_sae(bad)
    (bad / SAE_CONFIG).write_text(json.dumps({**cfg, "d_in": 17}))
    with pytest.raises(CheckpointError, match=r"tensor 'W_enc' has shape \(48, 16\), expected \(48, 17\)"):
        load_sae(bad)
    (bad / SAE_CONFIG).write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_sae(bad)
    (bad / SAE_CONFIG).write_text(json.dumps(cfg))
    (bad / SAE_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_sae(bad)
    for err in (CheckpointError,):
        try:
            load_sae(bad)
        except err as e:
            assert "\n" not in str(e)
