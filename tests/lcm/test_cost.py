"""LCM vs LLM inference-FLOPs model: hand-computed FLOPs, parameter counts, break-evens, report files, config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from conceptlm.core.config import load_config, save_config
from conceptlm.core.errors import ConfigError
from conceptlm.core.modules import DecoderConfig
from conceptlm.core.modules.block import DecoderBlock
from conceptlm.lcm.config import CostSection, LCMSection, TransformerSize
from conceptlm.lcm.cost import (
    LLAMA2_7B,
    SONAR_DECODER,
    SONAR_ENCODER,
    TWO_TOWER_1_6B,
    TWO_TOWER_7B,
    LCMSize,
    base_lcm_params,
    break_even_sentence_length,
    contextualizer_layer_params,
    cost_table,
    crossover_total_tokens,
    denoiser_layer_params,
    lcm_from_section,
    lcm_generation_flops,
    llm_generation_flops,
    one_tower_params,
    resolve_sizes,
    run_cost,
    two_tower_params,
)
from conceptlm.lcm.variants.base import BaseLCM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CTX = TransformerSize(name="ctx", n_params=100, n_layers=2, d_model=4)
DEN = TransformerSize(name="den", n_params=1000, n_layers=3, d_model=8)
TINY = LCMSize(name="tiny", contextualizer=CTX, denoiser=DEN, timestep_params=300)
ENC = TransformerSize(name="enc", n_params=10, n_layers=1, d_model=2)
DEC = TransformerSize(name="dec", n_params=20, n_layers=1, d_model=3)


def position(size: TransformerSize, c: int) -> int:
    """One new position attending ``c`` positions."""
    return 2 * size.n_params + 2 * size.n_layers * c * size.d_model


# ----------------------------------------------------------------------------------------- FLOPs by hand
def test_llm_flops_by_hand():
    llm = TransformerSize(name="llm", n_params=50, n_layers=2, d_model=4)
    f = llm_generation_flops(llm, 3, 2)
    # positions 1..5 attend 1..5 tokens: 5 * 100 + 16 * (1 + ... + 5)
    assert f == {"prefill": 300 + 16 * 6, "generate": 200 + 16 * 9, "total": 740}
    assert f["total"] == sum(position(llm, i) for i in range(1, 6))


def test_lcm_flops_by_hand():
    p, g, ell, steps = 2, 3, 4, 5
    f = lcm_generation_flops(TINY, ENC, DEC, p, g, ell, steps, True, False)
    encode = (p + g) * (2 * 10 * ell + 2 * 1 * 2 * ell * ell)
    ctx = sum(position(CTX, i) for i in range(1, p + g + 1))
    den = steps * 2 * sum(position(DEN, k + 1) for k in range(p, p + g))
    dec = g * sum(2 * 20 + 2 * 1 * 3 * (j + 1) for j in range(1, ell + 1))
    assert (encode, ctx, den, dec) == (720, 1240, 65760, 732)
    assert f == {"encode": encode, "contextualizer": ctx, "denoiser": den, "decode": dec,
                 "total": encode + ctx + den + dec}
    # no CFG halves the denoiser; precomputed modulation removes 2 * 300 FLOPs per row, step and sentence
    assert lcm_generation_flops(TINY, ENC, DEC, p, g, ell, steps, False, False)["denoiser"] == den / 2
    pre = lcm_generation_flops(TINY, ENC, DEC, p, g, ell, steps, True, True)
    assert pre["denoiser"] == den - steps * 2 * g * 2 * 300 == 47760
    assert pre["contextualizer"] == ctx and pre["encode"] == encode
    assert lcm_generation_flops(TINY, ENC, DEC, p, g, ell, steps, True, False, beam_size=4)["decode"] == 4 * dec
    base = LCMSize(name="base", contextualizer=CTX, denoiser=None)
    fb = lcm_generation_flops(base, ENC, DEC, p, g, ell, steps, True, True)
    assert fb["denoiser"] == 0 and fb["total"] == encode + ctx + dec


def test_fractional_counts_use_the_same_closed_form():
    """An average document of 2.5 + 1.5 sentences lies between its integer neighbours (the sums are polynomials)."""
    lo = lcm_generation_flops(TINY, ENC, DEC, 2, 1, 4.0, 5)["total"]
    hi = lcm_generation_flops(TINY, ENC, DEC, 3, 2, 4.0, 5)["total"]
    assert lo < lcm_generation_flops(TINY, ENC, DEC, 2.5, 1.5, 4.0, 5)["total"] < hi


# ----------------------------------------------------------------------------------------- parameter counts
def test_reference_two_tower_parameter_counts():
    c7 = two_tower_params(4096, 5, 14, 16384, 1024)
    c16 = two_tower_params(2048, 5, 13, 8192, 1024)
    assert c7["total"] == 6_930_781_696  # the reference archs.py docstring, exactly
    assert c16["total"] == 1_645_538_304
    for c in (c7, c16):
        assert c["total"] == c["contextualizer"] + c["denoiser"]
        assert 0.35 < c["modulators"] / c["denoiser"] < 0.36  # "about 36% of the denoiser" (our FLOPs model)
    assert TWO_TOWER_7B.denoiser.n_params == c7["denoiser"]
    assert TWO_TOWER_1_6B.timestep_params == c16["modulators"] + c16["timestep_mlp"]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_per_layer_formulas_match_the_shared_blocks():
    d, f = 16, 40
    common = dict(d_model=d, n_heads=2, d_ff=f, mlp="swiglu", norm="rms", attention_bias=True, mlp_bias=True)
    assert count(DecoderBlock(DecoderConfig(**common))) == contextualizer_layer_params(d, f)
    den = DecoderBlock(DecoderConfig(**common, cross_attention=True, adaln=True))
    assert count(den) == denoiser_layer_params(d, f)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_base_lcm_count_matches_the_model(positions):
    cfg = LCMSection(dim=12, d_model=16, n_layers=2, n_heads=2, d_ff=40, max_sentences=16, positions=positions)
    c = base_lcm_params(16, 2, 40, 12, nominal_ffn=False, max_positions=16 if positions == "learned" else 0)
    assert c["total"] == count(BaseLCM(cfg))
    assert c["non_embedding"] == c["total"] - c["positions"]
    assert lcm_from_section(cfg).contextualizer.n_params == c["total"] - c["positions"]


def test_one_tower_count_by_hand():
    d, f, dim, fr = 8, 16, 6, 4
    c = one_tower_params(d, 2, f, dim, fr, nominal_ffn=False, max_positions=10)
    assert c["timestep_mlp"] == fr * d + d + d * d + d == 112
    assert c["prenet"] == (dim + d) * d + d == 120  # embedding concatenated with the timestep embedding
    assert c["layers"] == 2 * (4 * (d * d + d) + 2 * (d * f + f) + f * d + d + 2 * d)
    assert c["total"] == 112 + 120 + 80 + c["layers"] + d + (d * dim + dim)
    assert c["non_embedding"] == c["total"] - 80


def test_run_section_sizes():
    lcm = LCMSection(model="two_tower", dim=12, d_model=16, n_layers=2, n_denoiser_layers=3, n_heads=2, d_ff=40)
    size = lcm_from_section(lcm)
    c = two_tower_params(16, 2, 3, 40, 12, nominal_ffn=False)
    assert (size.contextualizer.n_params, size.denoiser.n_params) == (c["contextualizer"], c["denoiser"])
    assert size.denoiser.n_layers == 3
    with pytest.raises(ConfigError) as e:
        lcm_from_section(LCMSection(model="quant_d"))
    assert e.value.field == "lcm.model"


# ----------------------------------------------------------------------------------------- break-even
@pytest.mark.parametrize("lcm,cfg,expected", [(TWO_TOWER_1_6B, False, 10), (TWO_TOWER_1_6B, True, 21),
                                              (TWO_TOWER_7B, False, 44), (TWO_TOWER_7B, True, 88)])
def test_break_even_matches_the_spec(lcm, cfg, expected):
    """Spec §8.6's values are rounded and use the denoiser's layer parameters only (1.377B / 5.89B); the full
    denoiser (+ pre/post projections, timestep MLP: +0.4-0.7%) moves the break-even by < 0.5 token, hence +-1."""
    ell = break_even_sentence_length(lcm, SONAR_ENCODER, SONAR_DECODER, LLAMA2_7B, 40, cfg)
    assert abs(ell - expected) < 1.0
    # at that length, one generated sentence costs what its tokens cost the LLM (context ~ 0: attention terms
    # are < 0.1% here)
    lcm_f = lcm_generation_flops(lcm, SONAR_ENCODER, SONAR_DECODER, 0, 1, ell, 40, cfg)["total"]
    llm_f = llm_generation_flops(LLAMA2_7B, 0, ell)["total"]
    assert lcm_f == pytest.approx(llm_f, rel=2e-3)
    pre = break_even_sentence_length(lcm, SONAR_ENCODER, SONAR_DECODER, LLAMA2_7B, 40, cfg, True)
    assert pre < 0.7 * ell  # the modulators are ~36% of the per-step cost


def test_break_even_infinite_when_the_llm_is_cheaper_than_the_sonar_stack():
    small_llm = TransformerSize(name="small", n_params=100_000_000, n_layers=12, d_model=768)
    assert math.isinf(break_even_sentence_length(TWO_TOWER_1_6B, SONAR_ENCODER, SONAR_DECODER, small_llm))


def test_crossover_and_long_context_monotonicity():
    args = (TWO_TOWER_1_6B, SONAR_ENCODER, SONAR_DECODER, LLAMA2_7B)
    x = crossover_total_tokens(*args, 5.0)
    assert 1e4 < x < 1e6

    def diff(total):
        lcm = lcm_generation_flops(*args[:3], total / 10, total / 10, 5.0, 40, True)["total"]
        return lcm - llm_generation_flops(LLAMA2_7B, total / 2, total / 2)["total"]
    assert diff(0.99 * x) > 0 > diff(1.01 * x)
    section = CostSection(sentence_tokens=[5, 10, 40], total_tokens=[1000, 8000, 64000, 512000])
    rows = cost_table(section)
    for ell in section.sentence_tokens:
        ratios = [r["ratio"][ell] for r in rows]
        assert all(a > b for a, b in zip(ratios, ratios[1:]))  # the LCM gains with context
    assert rows[0]["ratio"][5] > 1 > rows[-1]["ratio"][5]  # the LCM wins at long context
    assert [rows[0]["ratio"][e] for e in (5, 10, 40)] == sorted([rows[0]["ratio"][e] for e in (5, 10, 40)],
                                                               reverse=True)


# ----------------------------------------------------------------------------------------- report + config
def test_run_cost_writes_table_and_png(tmp_path, capsys):
    section = CostSection(sentence_tokens=[10, 30], total_tokens=[1000, 4000, 16000])
    out = run_cost(section, tmp_path / "cost")
    md = (tmp_path / "cost" / "cost.md").read_text()
    assert out["files"] == [str(tmp_path / "cost" / "cost.md"), str(tmp_path / "cost" / "cost.png")]
    assert (tmp_path / "cost" / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "cost").iterdir()) == ["cost.md", "cost.png"]  # no temp files left
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3 and "ratio l=30" in table[0] and table[1].startswith("| 1000 |")
    assert capsys.readouterr().out == md
    assert len(out["rows"]) == 3 and out["rows"][2]["llm_flops"] == llm_generation_flops(LLAMA2_7B, 8000,
                                                                                         8000)["total"]
    assert out["break_even"]["sentence_tokens"] == pytest.approx(20.68, abs=0.05)
    assert set(out["break_even"]["crossover_total_tokens"]) == {10, 30}
    assert run_cost(section, None)["files"] == []


@pytest.mark.parametrize("kw,fld", [(dict(lcm="two_tower_3b"), "cost.lcm"), (dict(llm="gpt5"), "cost.llm"),
                                    (dict(inference_steps=0), "cost.inference_steps"),
                                    (dict(sentence_tokens=[10, 0]), "cost.sentence_tokens"),
                                    (dict(total_tokens=[]), "cost.total_tokens"),
                                    (dict(prompt_fraction=1.0), "cost.prompt_fraction"),
                                    (dict(encoder=TransformerSize(n_params=0, n_layers=2, d_model=8)),
                                     "cost.encoder.n_params")])
def test_bad_section_names_the_field(kw, fld):
    with pytest.raises(ConfigError) as e:
        CostSection(**kw).validate()
    assert e.value.field == fld


def test_run_preset_needs_the_lcm_section():
    with pytest.raises(ConfigError) as e:
        resolve_sizes(CostSection(lcm="run"))
    assert e.value.field == "cost.lcm"
    lcm = LCMSection(model="base", dim=12, d_model=16, n_layers=2, n_heads=2, d_ff=40)
    rows = cost_table(CostSection(lcm="run", sentence_tokens=[10], total_tokens=[100]), lcm)
    assert rows[0]["lcm_parts"][10]["denoiser"] == 0


@dataclass(kw_only=True)
class _Cfg:
    cost: CostSection = field(default_factory=CostSection)

    def validate(self) -> None:
        self.cost.validate()


def test_yaml_explicit_sizes(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cost:\n  llm: {name: mine, n_params: 6.5e+9, n_layers: 32, d_model: 4096}\n  cfg: false\n")
    cfg = load_config(_Cfg, path)
    assert cfg.cost.llm == TransformerSize(name="mine", n_params=6_500_000_000, n_layers=32, d_model=4096)
    assert resolve_sizes(cfg.cost)[1].n_params == 6_500_000_000
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(_Cfg, tmp_path / "saved.yaml") == cfg  # the resolved config round-trips
    path.write_text("cost:\n  llm: {n_params: 1000, n_layers: 0, d_model: 8}\n")
    with pytest.raises(ConfigError) as e:
        load_config(_Cfg, path)
    assert e.value.field == "cost.llm.n_layers" and e.value.line == 2
