"""Base-LCM architecture: PreNet/PostNet and the normalizer, causality, padding, KV cache, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from conceptlm.core.config import load_config
from conceptlm.core.errors import ConfigError
from conceptlm.core.modules import KVCache, positions_from_padding
from conceptlm.lcm.config import LCMSection
from conceptlm.lcm.cost import swiglu_inner_dim
from conceptlm.lcm.variants.base import BaseLCM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(**kw) -> LCMSection:
    base = dict(dim=12, d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0, max_sentences=16)
    base.update(kw)
    return LCMSection(**base)


def with_stats(model: BaseLCM, seed: int = 0) -> BaseLCM:
    g = torch.Generator().manual_seed(seed)
    model.set_normalizer(torch.randn(model.cfg.dim, generator=g), torch.rand(model.cfg.dim, generator=g) + 0.5)
    return model


def test_swiglu_inner_dim_matches_the_reference_archs():
    assert swiglu_inner_dim(8192) == 5632 and swiglu_inner_dim(16384) == 11008


def test_normalizer_round_trip_and_clipping():
    m = with_stats(BaseLCM(small()))
    x = torch.randn(3, 5, 12)
    z = m.normalize(x)
    assert torch.allclose(z, (x - m.center) / m.scale)
    assert torch.allclose(m.denormalize(z), x, atol=1e-6)
    m.set_normalizer(m.center, m.scale, clip_min=torch.full((12,), -0.5), clip_max=torch.full((12,), 0.5))
    assert m.normalize(x * 100).abs().max() <= 0.5
    big = torch.full((1, 12), 3.0)
    assert torch.allclose(m.denormalize(big), 0.5 * m.scale + m.center)


def test_set_normalizer_checks_width_and_sign():
    m = BaseLCM(small())
    with pytest.raises(ValueError, match="has 3 values, the model's dim is 12"):
        m.set_normalizer(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="scale must be > 0"):
        m.set_normalizer(torch.zeros(12), torch.zeros(12))


def test_zero_layer_model_is_prenet_then_postnet_in_normalized_space():
    """Hand composition: x^ = denormalize(W_post (W_pre normalize(x) + b_pre) + b_post), and sqrt(d) scaling."""
    for scale in (False, True):
        m = with_stats(BaseLCM(small(n_layers=0, positions="none", scale_embeddings=scale)))
        x = torch.randn(2, 4, 12)
        z = (x - m.center) / m.scale
        h = z @ m.prenet.weight.T + m.prenet.bias
        h = h * math.sqrt(16) if scale else h
        want = (h @ m.postnet.weight.T + m.postnet.bias) * m.scale + m.center
        assert torch.allclose(m(x), want, atol=1e-5)


def test_reference_init_and_biases():
    m = BaseLCM(small())
    layer = m.decoder.layers[0]
    assert layer.attn.q_proj.bias is not None and layer.mlp.up_proj.bias is not None  # biases everywhere
    assert torch.equal(layer.attn.o_proj.bias, torch.zeros(16))
    bound = math.sqrt(6 / (16 + 16))  # xavier-uniform output projection
    assert layer.attn.o_proj.weight.abs().max() <= bound and layer.attn.o_proj.weight.std() > 0.1 * bound
    learned = BaseLCM(small(positions="learned"))
    assert learned.position.weight.shape == (16, 16)
    assert learned.position.weight.std().item() == pytest.approx(0.006, rel=0.2)


@pytest.mark.parametrize("positions", ["rope", "learned", "none"])
def test_predictions_are_causal(positions):
    torch.manual_seed(0)
    m = BaseLCM(small(positions=positions)).eval()
    x = torch.randn(1, 6, 12)
    x2 = x.clone()
    x2[:, 4] += 1.0
    a, b = m(x), m(x2)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_left_padding_with_key_padding_and_positions_equals_the_unpadded_document(positions):
    torch.manual_seed(1)
    m = with_stats(BaseLCM(small(positions=positions))).eval()
    doc = torch.randn(1, 5, 12)
    padded = torch.cat([torch.randn(1, 3, 12), doc], dim=1)  # 3 garbage pads on the left
    keep = torch.tensor([[False] * 3 + [True] * 5])
    out = m(padded, positions=positions_from_padding(keep), key_padding_mask=keep)
    assert torch.allclose(out[:, 3:], m(doc), atol=1e-5)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_kv_cache_one_position_at_a_time_equals_the_full_pass(positions):
    torch.manual_seed(2)
    m = with_stats(BaseLCM(small(positions=positions))).eval()
    x = torch.randn(2, 7, 12)
    full = m(x)
    cache = KVCache()
    steps = [m(x[:, :3], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(3, 7)]
    assert cache.length() == 7
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_learned_positions_beyond_the_table_are_an_error():
    m = BaseLCM(small(positions="learned", max_sentences=4))
    with pytest.raises(ValueError, match="position 4 >= lcm.max_sentences=4"):
        m(torch.randn(1, 5, 12))


@pytest.mark.parametrize("override,match", [
    ("lcm.n_heads=3", "must divide d_model"),
    ("lcm.max_sentences=1", "must be >= 2"),
    ("lcm.dropout=1.5", r"must be in \[0, 1\)"),
    ("lcm.positions=alibi", "is not one of"),
    ("lcm.min_context=200", "must be in"),
])
def test_section_validation_names_the_field(override, match):
    from dataclasses import dataclass, field

    from conceptlm.core.config import RunConfig

    @dataclass(kw_only=True)
    class Cfg(RunConfig):
        lcm: LCMSection = field(default_factory=LCMSection)

    with pytest.raises(ConfigError, match=match) as e:
        load_config(Cfg, None, ["lcm.d_model=32", override])
    assert "lcm." in str(e.value)
