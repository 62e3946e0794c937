"""Generation: KV-cached decoding equals recomputing the sequence (greedy and seeded sampling, both styles, every
mix), logit filters, and steering."""

from __future__ import annotations

import pytest
import torch

from conceptlm.cocomix.config import StudentSection
from conceptlm.cocomix.generate import filter_logits, generate, sample_next
from conceptlm.cocomix.model import Steering, StudentLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model(style: str, mix: str, insert_layer: int = 1, seed: int = 0) -> StudentLM:
    torch.manual_seed(seed)
    positions = mix.endswith("_pos")  # the second slot also gets the position embedding
    mix = mix.removesuffix("_pos")
    cfg = StudentSection(style=style, vocab_size=30, d_model=32, n_layers=3, n_heads=4, max_len=32, n_concepts=40,
                         concept_k=4, insert_layer=insert_layer, mix=mix, concept_head=mix != "pause",
                         slot_positions=positions)
    m = StudentLM(cfg)
    with torch.no_grad():  # sharper logits than at init, so greedy/sampled paths are not all ties
        m.embed.weight.mul_(5)
    return m


CASES = [(s, mx) for s in ("gpt2", "llama") for mx in ("interleave", "add", "pause", "none")]
CASES += [("gpt2", "pause_pos"), ("gpt2", "interleave_pos")]  # + the position embedding in the second slot


@pytest.mark.parametrize("style,mix", CASES)
def test_cached_step_logits_equal_full_recomputation(style, mix):
    m = model(style, mix).eval()
    ids = torch.randint(0, 30, (2, 9))
    with torch.no_grad():
        full = m(ids).logits
        cache = m.new_cache()
        first = m(ids[:, :5], cache=cache).logits
        steps = [m(ids[:, i:i + 1], cache=cache).logits for i in range(5, 9)]
    assert torch.allclose(first, full[:, :5], atol=1e-5)
    assert torch.allclose(torch.cat(steps, 1), full[:, 5:], atol=1e-5)
    assert m.past_tokens(cache) == 9


@pytest.mark.parametrize("style,mix", CASES)
def test_generation_with_cache_equals_without_greedy_and_sampled(style, mix):
    m = model(style, mix)
    prompt = torch.randint(0, 30, (3, 4))
    greedy = [generate(m, prompt, max_new_tokens=10, use_cache=c) for c in (True, False)]
    assert torch.equal(*greedy) and greedy[0].shape == (3, 14) and torch.equal(greedy[0][:, :4], prompt)
    sampled = [generate(m, prompt, max_new_tokens=10, temperature=1.5, top_k=8, top_p=0.95, use_cache=c,
                        generator=torch.Generator().manual_seed(5)) for c in (True, False)]
    assert torch.equal(*sampled)
    assert not torch.equal(sampled[0], greedy[0])  # sampling really sampled
    assert m.training  # the mode is restored


def test_cache_with_insertion_at_layer_zero_counts_tokens():
    m = model("llama", "interleave", insert_layer=0).eval()
    prompt = torch.randint(0, 30, (1, 5))
    assert torch.equal(generate(m, prompt, max_new_tokens=6), generate(m, prompt, max_new_tokens=6, use_cache=False))


def test_top_left_causal_alignment_would_break_cached_interleaving():
    """What the reference's SDPA path does (is_causal=True on a 2-query step): different logits. Ours matches."""
    import torch.nn.functional as F

    m = model("gpt2", "interleave").eval()
    ids = torch.randint(0, 30, (1, 7))
    orig = F.scaled_dot_product_attention

    def top_left(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if q.shape[2] == 2 and k.shape[2] > 2:  # a cached interleaved step
            return orig(q, k, v, dropout_p=dropout_p, is_causal=True, **kw)
        return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    with torch.no_grad():
        full = m(ids).logits[:, -1]
        cache = m.new_cache()
        m(ids[:, :-1], cache=cache)
        ours = m(ids[:, -1:], cache=cache).logits[:, -1]
        F.scaled_dot_product_attention = top_left
        try:
            cache = m.new_cache()
            m(ids[:, :-1], cache=cache)
            buggy = m(ids[:, -1:], cache=cache).logits[:, -1]
        finally:
            F.scaled_dot_product_attention = orig
    assert torch.allclose(ours, full, atol=1e-5)
    assert not torch.allclose(buggy, full, atol=1e-3)


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    k2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False, False]]
    p = filter_logits(logits, top_p=0.8)  # 0.5 + 0.2 < 0.8, + 0.15 reaches it
    assert torch.isfinite(p).tolist() == [[True, True, True, False, False]]
    tiny_p = filter_logits(logits, top_p=0.01)  # the arg-max always survives
    assert torch.isfinite(tiny_p).tolist() == [[True, False, False, False, False]]
    assert sample_next(logits).tolist() == [0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, temperature=1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1}


def test_eos_rows_stay_finished():
    m = model("gpt2", "add").eval()
    prompt = torch.randint(0, 30, (2, 3))
    free = generate(m, prompt, max_new_tokens=6)
    eos = int(free[0, 4])
    out = generate(m, prompt, max_new_tokens=6, eos_token_id=eos)
    row = out[0, 3:].tolist()
    first = row.index(eos)
    assert all(t == eos for t in row[first:])


@pytest.mark.parametrize("mix", ["interleave", "add"])
def test_steering_in_generation_is_cache_consistent_and_changes_the_text(mix):
    m = model("llama", mix)
    with torch.no_grad():
        m.head.compress.weight[7].mul_(200)  # make concept 7 matter when it is kept
    prompt = torch.randint(0, 30, (2, 4))
    steer = Steering(concept=7, factor=5.0, force=True)
    steered = [generate(m, prompt, max_new_tokens=8, steer=steer, use_cache=c) for c in (True, False)]
    assert torch.equal(*steered)
    assert not torch.equal(steered[0], generate(m, prompt, max_new_tokens=8))
    with pytest.raises(ValueError, match="steering needs a mixed concept"):
        generate(model("gpt2", "none"), prompt, max_new_tokens=1, steer=steer)
