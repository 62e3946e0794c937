"""Concept attribution: values against a dense autograd reference (the reference code's recipe), a finite-difference
check of the linearization, masks, frozen-teacher guarantees, Llama- and GPT-2-style teachers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conceptlm.cocomix.attribution import (
    ConceptLabeler,
    concept_labels,
    decoder_scale,
    dense_attribution,
    freeze,
    post_attribution,
    teacher_pass,
)
from conceptlm.cocomix.config import LabelSection
from conceptlm.cocomix.sae import TopKSAE
from conceptlm.cocomix.teacher import teacher_blocks
from conceptlm.core.errors import ConfigError
from conceptlm.core.hf import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, N_LATENTS, K, VOCAB, T = 32, 96, 8, 64, 12


def make_sae(seed: int = 0, dtype=torch.float32, n_latents: int = N_LATENTS, **kw) -> TopKSAE:
    """The project's TopK SAE with random biases (a fresh SAE has zero biases, which would hide mistakes)."""
    sae = TopKSAE(D, n_latents, K, seed=seed, **kw)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(n_latents, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(D, generator=gen))
    return sae.to(dtype)


def make_teacher(arch: str, seed: int = 0, dtype=torch.float32, layers: int = 3) -> nn.Module:
    return freeze(build_tiny_model(arch, VOCAB, hidden_size=D, num_layers=layers, num_heads=4, seed=seed)
                  .to(dtype))


def windows(b: int = 3, t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def reference_code_pass(teacher, ids, layer):
    """The reference code's recipe on a copy of the teacher: hooks store the activation and its gradient, HF's own
    shifted mean loss, a full ``loss.backward()`` with parameter gradients."""
    model = copy.deepcopy(teacher).requires_grad_(True)
    cache = {}

    def fwd(_m, _a, out):
        cache["h"] = out.detach()
        out.register_hook(lambda grad: cache.__setitem__("g", grad.detach()))

    handle = teacher_blocks(model)[layer].register_forward_hook(fwd)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    handle.remove()
    return cache["h"], cache["g"], loss.detach()


@pytest.fixture(params=["llama", "gpt2"])
def arch(request):
    return request.param


# ------------------------------------------------------------------------------------------------ teacher side
def test_teacher_pass_matches_reference_code_recipe(arch):
    teacher, ids, layer = make_teacher(arch), windows(), 1
    tp = teacher_pass(teacher, ids, layer)
    h_ref, g_ref, loss_ref = reference_code_pass(teacher, ids, layer)
    hs = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(tp.hidden, hs[layer + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(tp.hidden, h_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(tp.loss, loss_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tp.grad, g_ref, rtol=1e-5, atol=1e-9)
    assert tp.grad[:, -1].abs().max() == 0  # the last position influences no loss term
    assert tp.grad[:, :-1].abs().amax(-1).min() > 0


def test_window_mean_gradient_scale_and_windows_independent():
    """g is the gradient of the mean over B(T-1) targets: a window's gradient in a batch of B equals its gradient
    alone divided by B (windows do not interact)."""
    teacher, ids = make_teacher("llama", dtype=torch.float64), windows(b=4)
    together = teacher_pass(teacher, ids, 1).grad
    alone = torch.cat([teacher_pass(teacher, ids[i:i + 1], 1).grad for i in range(4)])
    torch.testing.assert_close(together * 4, alone, rtol=1e-10, atol=1e-14)


def test_teacher_untouched_frozen_and_without_grads(arch):
    teacher, ids = make_teacher(arch), windows()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():  # as in a unit's prepare: gradients are enabled locally
        out = concept_labels(teacher, make_sae(), ids, layer=1)
    assert out.mask[:, :-1].all()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    live = build_tiny_model(arch, VOCAB, hidden_size=D, num_layers=2, num_heads=4, seed=0)
    with pytest.raises(ValueError, match="freeze the teacher"):
        concept_labels(live, make_sae(), ids, layer=1)
    with pytest.raises(ValueError, match="out of range"):
        teacher_pass(teacher, ids, 3)


def test_sae_gets_no_graph_and_no_grads():
    sae = make_sae()
    out = concept_labels(make_teacher("llama"), sae, windows(), layer=0)
    assert not out.scores.requires_grad and not out.labels.requires_grad
    assert all(p.grad is None for p in sae.parameters())


# --------------------------------------------------------------------------------------------------- scores
def dense_reference(sae, h, g, mode):
    """The reference code's dense attribution: (g @ W_dec^T) * activations over all latents."""
    x, _, _ = sae.normalize(h)
    act = sae.dense_activations(*sae.encode(x)) if mode == "post" else sae.pre_activations(x)
    return (g @ sae.W_dec.T) * act


@pytest.mark.parametrize("mode", ["post", "pre"])
def test_scores_and_labels_match_dense_reference(arch, mode):
    teacher, sae, ids, layer = make_teacher(arch), make_sae(), windows(), 1
    h_ref, g_ref, _ = reference_code_pass(teacher, ids, layer)
    with torch.no_grad():
        dense = dense_reference(sae, h_ref, g_ref, mode)  # (B, T, C)
    out = concept_labels(teacher, sae, ids, layer=layer, section=LabelSection(k_attr=4, mode=mode))
    ref = dense.topk(4, dim=-1)
    # the chosen scores are the dense scores at the chosen latents
    torch.testing.assert_close(out.scores, dense.gather(-1, out.labels), rtol=1e-4, atol=1e-9)
    # wherever the reference's top 4 are strictly positive (no zero-score tie-breaking) the labels agree
    definite = ref.values[..., -1] > 0
    assert definite[:, :-1].float().mean() > 0.3  # the comparison covers a good share of the tokens
    assert torch.equal(out.labels[definite], ref.indices[definite])
    torch.testing.assert_close(out.scores[definite], ref.values[definite], rtol=1e-4, atol=1e-9)


def test_post_attribution_gathers_active_decoder_rows():
    sae = make_sae()
    h, g = torch.randn(50, D), torch.randn(50, D)
    x, _, _ = sae.normalize(h)
    values, indices = sae.encode(x)
    with torch.no_grad():
        dense = (g @ sae.W_dec.T) * sae.dense_activations(values, indices)
        for chunk in (0, 1, 7):
            got = post_attribution(sae, g, values, indices, chunk_tokens=chunk)
            torch.testing.assert_close(got, dense.gather(-1, indices), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dense_attribution(sae, x, g), (g @ sae.W_dec.T) * sae.pre_activations(x))


def test_dense_chunks_equal_one_chunk():
    teacher, sae, ids = make_teacher("llama"), make_sae(), windows()
    one = concept_labels(teacher, sae, ids, layer=1, section=LabelSection(mode="pre"))
    for chunk in (1, 5):
        out = concept_labels(teacher, sae, ids, layer=1, section=LabelSection(mode="pre", chunk_tokens=chunk))
        assert torch.equal(out.labels, one.labels) and torch.equal(out.mask, one.mask)
        torch.testing.assert_close(out.scores, one.scores, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["post", "pre"])
def test_finite_difference_of_the_linearization(mode):
    """Scaling latent j's code by (1 + eps) in the decoded reconstruction moves the residual by
    eps * c_j * s_t * W_dec[j]; spliced into the teacher, the loss changes by eps * A_j (A with the sigma factor),
    so removing the latent changes the loss by about -A_j."""
    teacher, sae = make_teacher("gpt2", dtype=torch.float64), make_sae(dtype=torch.float64)
    ids, layer = windows(b=2, t=8), 1
    out = concept_labels(teacher, sae, ids, layer=layer,
                         section=LabelSection(k_attr=3, mode=mode, include_sigma=True))
    ref = concept_labels(teacher, sae, ids, layer=layer, section=LabelSection(k_attr=3, mode=mode))
    h = teacher_pass(teacher, ids, layer, grad=False).hidden
    x, mu, sigma = sae.normalize(h)
    values, indices = sae.encode(x)
    codes = sae.dense_activations(values, indices) if mode == "post" else sae.pre_activations(x)
    torch.testing.assert_close(out.scores, ref.scores * decoder_scale(sae, sigma)[..., None], rtol=1e-10, atol=0)

    def loss_with(residual):
        handle = teacher_blocks(teacher)[layer].register_forward_hook(lambda *_: residual)
        try:
            with torch.no_grad():  # fp64 throughout (HF's own loss upcasts only to fp32)
                logits = teacher(input_ids=ids).logits
            return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        finally:
            handle.remove()

    def spliced(b, t, j, eps):
        dense = sae.dense_activations(values, indices)
        moved = dense.clone()
        moved[b, t, j] += eps * codes[b, t, j]
        # the decoded reconstruction, perturbed along latent j, back in the residual space; spliced in at the
        # true h (where the gradient is taken): h + h_hat(c + eps c_j e_j) - h_hat(c)
        recon = sae.denormalize(moved @ sae.W_dec + sae.b_dec, mu, sigma)
        recon0 = sae.denormalize(sae.decode(values, indices), mu, sigma)
        return h + (recon - recon0)

    eps, checked = 1e-4, 0
    for b, t in [(0, 0), (0, 3), (1, 5), (1, 6)]:
        for i in range(3):
            j = int(out.labels[b, t, i])
            fd = (loss_with(spliced(b, t, j, eps)) - loss_with(spliced(b, t, j, -eps))) / (2 * eps)
            assert abs(out.scores[b, t, i].item()) > 1e-6
            torch.testing.assert_close(fd, out.scores[b, t, i], rtol=1e-6, atol=1e-10)
            checked += 1
    assert checked == 12


# ------------------------------------------------------------------------------------------- labels and masks
@pytest.mark.parametrize("selection,mode", [("attribution", "post"), ("attribution", "pre"),
                                            ("activation", "post")])
def test_last_position_masked(arch, selection, mode):
    out = concept_labels(make_teacher(arch), make_sae(), windows(), layer=1,
                         section=LabelSection(mode=mode, selection=selection))
    assert out.labels.shape == (3, T, 4) and out.labels.dtype == torch.long
    if selection == "attribution":
        assert not out.mask[:, -1].any() and out.mask[:, :-1].all()
        assert out.scores[:, -1].abs().max() == 0
    else:
        assert out.mask.all()  # activations exist at every position


def test_sigma_factor_leaves_labels_and_masks_unchanged():
    teacher, sae, ids = make_teacher("llama"), make_sae(), windows(b=4)
    for mode in ("post", "pre"):
        a = concept_labels(teacher, sae, ids, layer=1, section=LabelSection(mode=mode))
        b = concept_labels(teacher, sae, ids, layer=1, section=LabelSection(mode=mode, include_sigma=True))
        assert torch.equal(a.labels, b.labels) and torch.equal(a.mask, b.mask)


def test_abs_score_ranks_by_magnitude():
    teacher, sae, ids = make_teacher("llama"), make_sae(), windows()
    h, g, _ = reference_code_pass(teacher, ids, 1)
    with torch.no_grad():
        dense = dense_reference(sae, h, g, "pre")
    out = concept_labels(teacher, sae, ids, layer=1, section=LabelSection(mode="pre", score="abs"))
    ref = dense.abs().topk(4, dim=-1)
    keep = torch.ones_like(out.mask)
    keep[:, -1] = False
    assert torch.equal(out.labels[keep], ref.indices[keep])
    torch.testing.assert_close(out.scores.abs(), dense.gather(-1, out.labels).abs(), rtol=1e-4, atol=1e-9)
    signed = concept_labels(teacher, sae, ids, layer=1, section=LabelSection(mode="pre"))
    assert not torch.equal(signed.labels[keep], out.labels[keep])  # the ablation changes something


def test_activation_selection_takes_most_active_latents_without_backward():
    teacher, sae, ids = make_teacher("gpt2"), make_sae(), windows()
    calls = []
    handle = teacher_blocks(teacher)[2].register_forward_hook(lambda *a: calls.append(1))
    out = concept_labels(teacher, sae, ids, layer=1, section=LabelSection(selection="activation", k_attr=3))
    handle.remove()
    assert not calls  # the forward pass stopped at the SAE's block
    x, _, _ = sae.normalize(teacher(input_ids=ids, output_hidden_states=True).hidden_states[2])
    dense = sae.dense_activations(*sae.encode(x))
    ref = dense.topk(3, dim=-1)
    assert torch.equal(out.labels, ref.indices)
    torch.testing.assert_close(out.scores, ref.values)


def test_labeler_freezes_and_describes():
    teacher = build_tiny_model("llama", VOCAB, hidden_size=D, num_layers=2, num_heads=4, seed=0)
    lab = ConceptLabeler(teacher, make_sae(), 1, LabelSection(k_attr=2))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert lab.describe() == {"k_attr": 2, "mode": "post", "score": "signed", "selection": "attribution",
                              "include_sigma": False, "layer": 1, "n_latents": N_LATENTS}
    labels, mask = lab(windows())
    full = lab.labels(windows())
    assert labels.shape == (3, T, 2) and torch.equal(labels, full.labels) and torch.equal(mask, full.mask)
    lab.train()
    assert not lab.teacher.training and not lab.sae.training
    with pytest.raises(ValueError, match="k_attr=9 exceeds"):
        concept_labels(teacher, make_sae(), windows(), layer=1, section=LabelSection(k_attr=9))


def test_bf16_autocast_teacher_still_labels_in_fp32():
    teacher, sae, ids = make_teacher("llama"), make_sae(), windows()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = concept_labels(teacher, sae, ids, layer=1)
    assert out.scores.dtype == torch.float32 and not out.mask[:, -1].any() and out.mask[:, :-1].all()


@pytest.mark.parametrize("field,value,match", [
    ("k_attr", 0, "labels.k_attr"), ("mode", "post_act", "labels.mode"), ("score", "neg", "labels.score"),
    ("selection", "random", "labels.selection"), ("chunk_windows", 12, "labels.chunk_windows"),
    ("batch_size", 0, "labels.batch_size"), ("chunk_tokens", -1, "labels.chunk_tokens")])
def test_label_section_validate(field, value, match):
    sec = LabelSection(batch_size=8, chunk_windows=64)
    setattr(sec, field, value)
    with pytest.raises(ConfigError, match=match):
        sec.validate()
