"""The CoCoMix student: chunked concept head == dense, sparse compression == dense, interleaving order and read-out,
causality, parameter counts, steering and config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conceptlm.cocomix.config import StudentSection
from conceptlm.cocomix.costs import count_parameters
from conceptlm.cocomix.model import ConceptHead, Steering, StudentLM, compress_concepts, concept_head, sae_layer_norm
from conceptlm.core.config import load_config
from conceptlm.core.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**kw) -> StudentSection:
    base = dict(style="gpt2", vocab_size=40, d_model=32, n_layers=3, n_heads=4, max_len=24, n_concepts=48,
                concept_k=5, insert_layer=1, mix="interleave", concept_head=True)
    base.update(kw)
    return StudentSection(**base)


def dense_head(x, w, b, labels, mask, k):
    """The naive computation: all N x C logits, full softmax CE over the labels, TopK values."""
    z = x @ w.t() + b
    logp = z.log_softmax(-1)
    ce_rows = -logp.gather(1, labels).mean(1)
    val, idx = z.topk(k, dim=1)
    return (ce_rows * mask).sum(), val, idx, z


# ------------------------------------------------------------------------------------------------ concept head
@pytest.mark.parametrize("chunk", [1, 7, 0])
def test_chunked_concept_head_equals_dense_loss_and_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    n, d, c, a, k = 23, 8, 37, 3, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, c, (n, a), generator=g)
    mask = torch.rand(n, generator=g) > 0.3
    weights = torch.randn(n, k, generator=g, dtype=torch.float64)  # a downstream use of the kept logits

    ce, val, idx, correct = concept_head(x, w, b, k=k, labels=labels, mask=mask, chunk=chunk)
    (2.5 * ce + (val * weights).sum()).backward()
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ce_ref, val_ref, idx_ref, z = dense_head(x, w, b, labels, mask.double(), k)
    (2.5 * ce_ref + (val_ref * weights).sum()).backward()
    assert torch.allclose(ce.double(), ce_ref, atol=1e-5)
    assert torch.equal(idx, idx_ref) and torch.allclose(val.double(), val_ref, atol=1e-5)
    assert torch.equal(correct, (z.argmax(1, keepdim=True) == labels).any(1) & mask)
    for a_, b_ in zip(got, (x.grad, w.grad, b.grad)):
        assert torch.allclose(a_.double(), b_, atol=1e-5)


def test_concept_head_without_ce_gradient_keeps_topk_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, generator=g, requires_grad=True)
    w = torch.randn(20, 6, generator=g, requires_grad=True)
    b = torch.zeros(20, requires_grad=True)
    labels = torch.randint(0, 20, (9, 2), generator=g)
    ce, val, _, _ = concept_head(x, w, b, k=3, labels=labels, ce_grad=False)
    assert not ce.requires_grad
    val.sum().backward()
    xr = x.detach().clone().requires_grad_()
    (xr @ w.detach().t() + b.detach()).topk(3, dim=1).values.sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-6)


def test_concept_head_never_holds_all_logits(monkeypatch):
    """Memory stays bounded: with 4 rows per chunk the largest fp32 temporary is 4 x C, not N x C."""
    n, d, c = 64, 8, 4096
    x = torch.randn(n, d, requires_grad=True)
    w = torch.randn(c, d, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    labels = torch.randint(0, c, (n, 4))
    seen = []
    orig = F.linear

    def spy(*args, **kw):
        out = orig(*args, **kw)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(F, "linear", spy)
    ce, val, _, _ = concept_head(x, w, b, k=8, labels=labels, chunk=4)
    (ce + val.sum()).backward()
    assert len(seen) == n // 4 and max(seen) == 4 * c


def test_sae_layer_norm_uses_unbiased_std():
    h = torch.tensor([[1.0, 2.0, 4.0, 9.0]])
    x, mu, sigma = sae_layer_norm(h)
    m = h.mean()
    s = ((h - m) ** 2).sum().div(3).sqrt()  # n - 1
    assert torch.allclose(mu, m.view(1, 1)) and torch.allclose(sigma, s.view(1, 1))
    assert torch.allclose(x, (h - m) / (s + 1e-5))


def test_sparse_compression_equals_dense_matmul_with_gradients():
    g = torch.Generator().manual_seed(2)
    n, c, d, k = 11, 30, 7, 4
    w = torch.randn(c, d, generator=g, requires_grad=True)
    z = torch.randn(n, c, generator=g, requires_grad=True)
    val, idx = z.topk(k, dim=1)
    out = compress_concepts(val, idx, w)
    dense = torch.zeros(n, c).scatter(1, idx, val) @ w
    assert torch.allclose(out, dense, atol=1e-6)
    gw, gz = torch.autograd.grad((out * torch.arange(d)).sum(), (w, z), retain_graph=True)
    gw_ref, gz_ref = torch.autograd.grad((dense * torch.arange(d)).sum(), (w, z))
    assert torch.allclose(gw, gw_ref, atol=1e-6) and torch.allclose(gz, gz_ref, atol=1e-6)


def test_concept_head_module_matches_the_reference_formula():
    """ĉ = (W_c TopK(z) + b_c + pre_bias) * sigma + mu with z = W_p (LN(h) - pre_bias) + b_p (CoCoMix paper §2.2,
    Eq. 3)."""
    torch.manual_seed(3)
    head = ConceptHead(8, 25, 3, compress=True)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    h = torch.randn(2, 5, 8)
    out = head(h)
    x, mu, sigma = sae_layer_norm(h)
    z = (x - head.pre_bias) @ head.predictor.weight.t() + head.predictor.bias
    val, idx = z.topk(3, dim=-1)
    zs = torch.zeros_like(z).scatter(-1, idx, val)  # raw values kept, no ReLU
    ref = (zs @ head.compress.weight + head.compress_bias + head.pre_bias) * sigma + mu
    assert torch.allclose(out.continuous, ref, atol=1e-5)
    assert torch.equal(out.indices, idx)


# ------------------------------------------------------------------------------------------------ model
def test_interleave_order_and_read_out_match_a_manual_construction():
    """[h_1, ĉ_1, h_2, ĉ_2, ...] through the upper blocks; logits for x_{t+1} from the slot of ĉ_t."""
    torch.manual_seed(4)
    m = StudentLM(tiny(n_layers=2, insert_layer=1)).eval()
    ids = torch.randint(0, 40, (2, 6))
    got = m(ids).logits
    pos = torch.arange(6).expand(2, 6)
    h = m.decoder(m.embed(ids) + m.pos_embed(pos), layers=slice(0, 1), final_norm=False)
    c = m.head(h).continuous
    seq = torch.empty(2, 12, 32)
    seq[:, 0::2], seq[:, 1::2] = h, c
    out = m.decoder(seq, layers=slice(1, None))  # plain causal attention over 2T, final norm
    ref = F.linear(out[:, 1::2], m.embed.weight)
    assert torch.allclose(got, ref, atol=1e-5)
    wrong = F.linear(out[:, 0::2], m.embed.weight)
    assert not torch.allclose(got, wrong, atol=1e-3)


CASES = [(s, mx) for s in ("gpt2", "llama") for mx in ("interleave", "add", "pause", "none")]
CASES += [("gpt2", "pause_pos"), ("gpt2", "interleave_pos")]  # + the position embedding in the second slot


@pytest.mark.parametrize("style,mix", CASES)
def test_logits_at_t_do_not_depend_on_later_tokens(style, mix):
    torch.manual_seed(5)
    positions = mix.endswith("_pos")
    mix = mix.removesuffix("_pos")
    m = StudentLM(tiny(style=style, mix=mix, concept_head=mix != "pause", slot_positions=positions)).eval()
    ids = torch.randint(0, 40, (2, 12))
    t = 6
    other = ids.clone()
    other[:, t + 1:] = torch.randint(0, 40, (2, 12 - t - 1))
    assert not torch.equal(other, ids)
    a, b = m(ids), m(other)
    assert torch.allclose(a.logits[:, : t + 1], b.logits[:, : t + 1], atol=1e-6)
    assert not torch.allclose(a.logits[:, t + 1:], b.logits[:, t + 1:], atol=1e-4)  # the test can see a change
    if a.concept is not None:
        assert torch.equal(a.concept.indices[:, : t + 1], b.concept.indices[:, : t + 1])


@pytest.mark.parametrize("mix", ["pause", "interleave"])
def test_second_slots_carry_the_position_embedding_with_slot_positions(mix):
    """Slot 2t+1 holds (pause or ĉ_t) + pos_embed(t); off, the same weights give the plain construction."""
    torch.manual_seed(8)
    kw = dict(n_layers=2, insert_layer=1, mix=mix, concept_head=mix == "interleave")
    m = StudentLM(tiny(**kw, slot_positions=True)).eval()
    ids = torch.randint(0, 40, (2, 6))
    pos = torch.arange(6).expand(2, 6)
    h = m.decoder(m.embed(ids) + m.pos_embed(pos), layers=slice(0, 1), final_norm=False)
    second = m.pause.expand(2, 6, -1) if mix == "pause" else m.head(h).continuous
    seq = torch.empty(2, 12, 32)
    seq[:, 0::2], seq[:, 1::2] = h, second + m.pos_embed(pos)
    ref = F.linear(m.decoder(seq, layers=slice(1, None))[:, 1::2], m.embed.weight)
    assert torch.allclose(m(ids).logits, ref, atol=1e-5)
    off = StudentLM(tiny(**kw)).eval()
    off.load_state_dict(m.state_dict())
    seq[:, 1::2] = second
    assert torch.allclose(off(ids).logits, F.linear(off.decoder(seq, layers=slice(1, None))[:, 1::2],
                                                    m.embed.weight), atol=1e-5)
    assert not torch.allclose(off(ids).logits, ref, atol=1e-4)


def test_slot_positions_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="student.slot_positions"):
        tiny(style="llama", mix="pause", concept_head=False, slot_positions=True).validate()
    with pytest.raises(ConfigError, match="student.slot_positions"):
        tiny(mix="add", slot_positions=True).validate()


def test_mixing_changes_the_output_and_pause_is_learned():
    torch.manual_seed(6)
    base = StudentLM(tiny(mix="none"))
    ids = torch.randint(0, 40, (2, 8))
    ref = base(ids).logits
    for mix in ("interleave", "add"):
        m = StudentLM(tiny(mix=mix))
        m.load_state_dict(base.state_dict(), strict=False)
        assert not torch.allclose(m(ids).logits, ref, atol=1e-4)
    p = StudentLM(tiny(mix="pause", concept_head=False))
    p(ids).logits.sum().backward()
    assert p.pause.grad is not None and p.pause.grad.abs().sum() > 0


@pytest.mark.parametrize("cfg", [tiny(), tiny(style="llama", tie_embeddings=False), tiny(mix="add"),
                                 tiny(mix="pause", concept_head=False), tiny(mix="none", concept_head=False),
                                 tiny(mix="none"), tiny(style="llama", d_ff=40)])
def test_parameter_count_formula_matches_the_module(cfg):
    m = StudentLM(cfg)
    got = count_parameters(cfg)
    assert got["total"] == sum(p.numel() for p in m.parameters())
    if cfg.compresses:
        assert got["total"] - got["active"] == (cfg.n_concepts - cfg.concept_k) * cfg.d_model


def test_steering_factor_one_is_identity_and_force_keeps_the_concept():
    torch.manual_seed(7)
    m = StudentLM(tiny()).eval()
    ids = torch.randint(0, 40, (1, 8))
    with torch.no_grad():
        ref = m(ids)
        same = m(ids, steer=Steering(concept=3, factor=1.0))
        forced = m(ids, steer=Steering(concept=17, factor=8.0, force=True))
    assert torch.equal(ref.logits, same.logits)
    assert (forced.concept.indices == 17).any(-1).all()
    assert not torch.allclose(forced.logits, ref.logits, atol=1e-4)
    with pytest.raises(ValueError, match="inference"):
        m(ids, steer=Steering(concept=3, factor=2.0))


def test_sequence_longer_than_max_len_is_refused():
    m = StudentLM(tiny(max_len=8))
    with pytest.raises(ValueError, match="max_len=8"):
        m(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("override,match", [
    ("student.insert_layer=3", "student.insert_layer"),
    ("student.concept_k=99", "student.concept_k"),
    ("student.d_model=30", "student.d_model"),
    ("student.mix=add", "student.concept_head"),
])
def test_bad_student_sections_are_one_line_config_errors(override, match):
    from conceptlm.cocomix.config import StudentTrainConfig

    args = ["student.n_layers=3", "student.n_concepts=48", "student.d_model=32", "student.n_heads=4", override]
    if "mix=add" in override:
        args.append("student.concept_head=false")
    with pytest.raises(ConfigError, match=match) as e:
        load_config(StudentTrainConfig, None, args)
    assert "\n" not in str(e.value)


def test_sequential_interleave_positions_differ_from_shared_for_llama():
    torch.manual_seed(8)
    a = StudentLM(tiny(style="llama"))
    b = StudentLM(dataclasses.replace(tiny(style="llama"), interleave_positions="sequential"))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 40, (1, 8))
    assert not torch.allclose(a(ids).logits, b(ids).logits, atol=1e-5)
