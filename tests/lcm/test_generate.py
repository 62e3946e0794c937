"""Generation: the stopping rules on a hand-built rotation model, cached == uncached, per-document early stop in a
batch, decoding through a nearest-neighbour bank."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conceptlm.lcm.config import GenerationOptions, LCMSection
from conceptlm.lcm.generate import generate
from conceptlm.lcm.variants.base import BaseLCM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rotation_model(omega_deg: float, max_sentences: int = 64) -> BaseLCM:
    """0 layers, identity PreNet, PostNet = rotation by omega in the (e0, e1) plane: x_{n+1} = R x_n exactly."""
    m = BaseLCM(LCMSection(dim=4, d_model=4, n_layers=0, n_heads=1, d_ff=4, dropout=0.0, positions="none",
                           max_sentences=max_sentences))
    w = math.radians(omega_deg)
    r = torch.eye(4)
    r[:2, :2] = torch.tensor([[math.cos(w), -math.sin(w)], [math.sin(w), math.cos(w)]])
    with torch.no_grad():
        m.prenet.weight.copy_(torch.eye(4))
        m.prenet.bias.zero_()
        m.postnet.weight.copy_(r)
        m.postnet.bias.zero_()
    return m


def at(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([math.cos(a), math.sin(a), 0.0, 0.0])


def prompt(*degs: float) -> torch.Tensor:
    return torch.stack([at(d) for d in degs])


EOT = at(180.0)  # cos >= 0.9 <=> within 25.84 degrees of 180


def test_end_of_text_rule_stops_each_document_at_its_own_step_and_trims_the_stop_sentence():
    m = rotation_model(30.0)
    out = generate(m, [prompt(-30.0, 0.0), prompt(100.0), prompt(50.0, 70.0, 90.0)], eot=EOT)
    # doc 0: 30, 60, ..., 180 -> stop at step 6; doc 1: 130, 160 (20 deg from 180) -> step 2;
    # doc 2: 120, 150, 180 -> step 3. Consecutive cosines are cos 30 = 0.866 < 0.9: no repetition stop.
    assert [d.stop for d in out] == ["eot"] * 3
    assert [d.steps for d in out] == [6, 2, 3]
    assert [len(d.vectors) for d in out] == [5, 1, 2]
    assert torch.allclose(out[0].vectors, prompt(30, 60, 90, 120, 150), atol=1e-5)
    assert torch.allclose(out[1].vectors, prompt(130), atol=1e-5)
    kept = generate(m, [prompt(100.0)], eot=EOT, options=GenerationOptions(trim_stop_sentence=False))[0]
    assert torch.allclose(kept.vectors, prompt(130, 160), atol=1e-5)


def test_repetition_rule_min_and_max_lengths():
    m = rotation_model(20.0)  # consecutive cosine = cos 20 = 0.940
    first = generate(m, [prompt(0.0)], eot=EOT)[0]
    assert first.stop == "repetition" and first.steps == 1 and first.vectors.shape == (0, 4)
    later = generate(m, [prompt(0.0)], options=GenerationOptions(min_new_sentences=3))[0]
    assert later.stop == "repetition" and torch.allclose(later.vectors, prompt(20, 40), atol=1e-5)
    assert generate(m, [prompt(0.0)], options=GenerationOptions(repetition_threshold=0.95))[0].stop == \
        "max_new_sentences"
    capped = generate(m, [prompt(0.0)], options=GenerationOptions(repetition_threshold=None,
                                                                  max_new_sentences=4))[0]
    assert capped.stop == "max_new_sentences" and torch.allclose(capped.vectors, prompt(20, 40, 60, 80), atol=1e-5)
    short = rotation_model(20.0, max_sentences=8)
    full = generate(short, [prompt(0.0, 1.0, 2.0)], options=GenerationOptions(repetition_threshold=None,
                                                                              max_new_sentences=50))[0]
    assert full.stop == "max_sentences" and len(full.vectors) == 5  # 3 + 5 = max_sentences


def random_model(positions: str, seed: int = 0) -> BaseLCM:
    torch.manual_seed(seed)
    m = BaseLCM(LCMSection(dim=8, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, positions=positions,
                           max_sentences=32))
    m.set_normalizer(torch.randn(8) * 0.1, torch.rand(8) + 0.5)
    return m


def prompts(seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 8, generator=g) for n in (3, 7, 1, 5)]


def assert_same(a, b, tol=1e-5):
    assert [d.stop for d in a] == [d.stop for d in b]
    for x, y in zip(a, b):
        assert x.vectors.shape == y.vectors.shape
        assert torch.allclose(x.vectors, y.vectors, atol=tol), (x.vectors - y.vectors).abs().max()


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_cached_equals_uncached_and_batch_equals_one_document_at_a_time(positions):
    m = random_model(positions)
    ps = prompts()
    probe = generate(m, ps, options=GenerationOptions(repetition_threshold=None, max_new_sentences=2))
    eot = probe[1].vectors[1]  # document 1 stops at its 2nd sentence, the others run to the maximum
    opts = dict(repetition_threshold=None, max_new_sentences=9, eos_threshold=0.999)
    cached = generate(m, ps, eot=eot, options=GenerationOptions(**opts))
    uncached = generate(m, ps, eot=eot, options=GenerationOptions(**opts, use_cache=False))
    assert [d.stop for d in cached] == ["max_new_sentences", "eot", "max_new_sentences", "max_new_sentences"]
    assert [len(d.vectors) for d in cached] == [9, 1, 9, 9]
    assert_same(cached, uncached)
    alone = [generate(m, [p], eot=eot, options=GenerationOptions(**opts))[0] for p in ps]
    assert_same(cached, alone)
    # and the continuation is what the model predicts from the full sequence
    seq = torch.cat([ps[0], cached[0].vectors])
    with torch.no_grad():
        assert torch.allclose(m(seq.unsqueeze(0))[0, len(ps[0]) - 1:-1], cached[0].vectors, atol=1e-5)


def test_temperature_noise_is_per_document_and_seeded():
    m = random_model("rope")
    ps = prompts()
    o = GenerationOptions(repetition_threshold=None, max_new_sentences=4, temperature=0.5, seed=7)
    noisy = generate(m, ps, options=o)
    assert_same(noisy, generate(m, ps, options=o))
    plain = generate(m, ps, options=GenerationOptions(repetition_threshold=None, max_new_sentences=4))
    assert not torch.allclose(noisy[0].vectors, plain[0].vectors, atol=1e-3)
    # a document's noise does not depend on its batch-mates
    assert torch.allclose(generate(m, [ps[0]], options=o)[0].vectors, noisy[0].vectors, atol=1e-5)


def test_decode_is_called_once_and_texts_are_joined():
    m = rotation_model(30.0)
    bank_text = [f"s{d}" for d in range(0, 360, 10)]
    bank = F.normalize(torch.stack([at(d) for d in range(0, 360, 10)]), dim=-1)
    calls = []

    def nearest(v: torch.Tensor) -> list[str]:
        calls.append(len(v))
        return [bank_text[i] for i in (F.normalize(v, dim=-1) @ bank.T).argmax(-1).tolist()]

    out = generate(m, [prompt(0.0), prompt(100.0), prompt(150.0)], eot=EOT, decode=nearest)
    assert calls == [5 + 1 + 0]
    assert out[0].sentences == ["s30", "s60", "s90", "s120", "s150"]
    assert out[0].text == "s30 s60 s90 s120 s150" and out[1].text == "s130" and out[2].text == ""
    assert out[2].stop == "eot" and out[2].steps == 1  # 180 itself


def test_bad_prompts_are_refused():
    m = rotation_model(30.0, max_sentences=4)
    with pytest.raises(ValueError, match="prompt 1 has 4 sentences"):
        generate(m, [prompt(0.0), prompt(0, 1, 2, 3)])
    with pytest.raises(ValueError, match=r"prompt 0: expected a non-empty \(n, 4\)"):
        generate(m, [torch.zeros(2, 5)])
