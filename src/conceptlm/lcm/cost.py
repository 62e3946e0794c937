"""Inference-FLOPs model of LCM generation vs a token-level LLM (LCM paper §2.5.1, Fig. 13).

A closed-form count of forward FLOPs, Kaplan-style: one new position of a Transformer with ``N`` (non-embedding)
parameters, ``n_layer`` layers of width ``d`` that attends ``c`` positions costs ``2 N + 2 n_layer c d``.

LLM over a document of ``L = P + G`` tokens (``P`` prompt, ``G`` generated), position ``i`` attends ``i`` tokens::

    F_LLM = sum_{i=1..L} (2 N + 2 n_layer d i) = 2 N L + n_layer d L (L + 1)

LCM over ``n = P + G`` sentences of ``l`` tokens (``P`` prompt and ``G`` generated *sentences*), ``S`` inference
steps, ``r`` = 2 rows per step with classifier-free guidance (conditional + unconditional, batched) else 1::

    encode         n * (2 N_enc l + 2 n_enc d_enc l^2)                   every sentence, bidirectional encoder
    contextualizer sum_{i=1..n} (2 N_ctx + 2 L_ctx d i)                  KV-cached, one position per sentence
    denoiser       S r sum_{k=P..n-1} (2 N_den' + 2 L_den d (k + 1))     k previous sentences + the zero key
    decode         G b sum_{j=1..l} (2 N_dec + 2 n_dec d_dec (j + 1))    ``b`` = beam size
    with N_den' = N_den - N_t when the timestep-only parameters N_t (AdaLN modulators + timestep MLP) are
    precomputed per timestep (as our generation does), else N_den.

The paper prints no closed form; in our reconstruction of its Fig. 13, every sentence is counted as SONAR-encoded
(the generated ones too) and the unconditional CFG row is counted at the conditional row's cost (the reference
batches both halves over the padded context). Non-integer sentence counts use the same closed forms (an average
document). The Base-LCM has no denoiser (one contextualizer pass per sentence); the One-Tower LCM uses its single
Transformer both as the contextualizer (the clean copy of each sentence, KV-cached) and as the denoiser (``S``
passes of the noisy position, which attends the clean prefix and itself: ``k + 1`` keys).

:func:`run_cost` is the single entry point of ``conceptlm lcm cost``: it prints the table, writes ``cost.md`` and
``cost.png`` and returns the rows and break-even points.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from conceptlm.core.errors import ConfigError
from conceptlm.core.io import atomic_write_text
from conceptlm.lcm.config import CostSection, LCMSection, TransformerSize

__all__ = [
    "swiglu_inner_dim", "LCMSize", "LLAMA2_7B", "SONAR_ENCODER", "SONAR_DECODER", "MINILM_L6_ENCODER",
    "attention_params", "swiglu_params", "contextualizer_layer_params", "denoiser_layer_params", "modulator_params",
    "two_tower_params", "base_lcm_params", "one_tower_params", "two_tower_lcm", "base_lcm", "one_tower_lcm",
    "lcm_from_section", "TWO_TOWER_1_6B", "TWO_TOWER_7B", "ONE_TOWER_1_6B", "LCM_PRESETS", "LLM_PRESETS",
    "ENCODER_PRESETS", "DECODER_PRESETS", "llm_generation_flops", "lcm_generation_flops",
    "break_even_sentence_length", "crossover_total_tokens", "resolve_sizes", "cost_table",
    "cost_markdown", "run_cost",
]


def swiglu_inner_dim(ffn_inner_dim: int, multiple_of: int = 256) -> int:
    """The reference's SwiGLU hidden width for a nominal FFN width: ``m * ceil(int(2/3 * f) / m)``
    (8192 -> 5632, 16384 -> 11008)."""
    return multiple_of * math.ceil(int(ffn_inner_dim * 2 / 3) / multiple_of)


@dataclass(kw_only=True)
class LCMSize:
    """An LCM for the FLOPs model: the part run once per sentence and the part run per inference step."""

    name: str
    contextualizer: TransformerSize
    """Run once per sentence (KV-cached); the position of sentence ``i`` attends ``i`` positions."""
    denoiser: TransformerSize | None
    """Run ``inference_steps`` times (x2 rows with CFG) per generated sentence, attending ``k + 1`` keys after
    ``k`` sentences; ``None`` for the Base-LCM (its regression head is part of the contextualizer pass)."""
    timestep_params: int = 0
    """Denoiser parameters that depend on the timestep only (AdaLN modulators + timestep MLP): precomputable."""


LLAMA2_7B = TransformerSize(name="llama2_7b", n_params=6_476_271_616, n_layers=32, d_model=4096)
"""Llama-2-7B without its token embedding and LM head: 32 x (4 d^2 + 3 d 11008 + 2 d) + d."""
SONAR_ENCODER = TransformerSize(name="sonar_encoder", n_params=500_000_000, n_layers=24, d_model=1024)
"""SONAR text encoder, ~0.50B non-embedding parameters (LCM paper §2.5.1)."""
SONAR_DECODER = TransformerSize(name="sonar_decoder", n_params=600_000_000, n_layers=24, d_model=1024)
"""SONAR text decoder, ~0.60B non-embedding parameters (LCM paper §2.5.1)."""
MINILM_L6_ENCODER = TransformerSize(name="minilm_l6", n_params=10_647_552, n_layers=6, d_model=384)
"""all-MiniLM-L6-v2 (BERT, 6 layers, d 384, FFN 1536, biases, LayerNorms), the project's default encoder."""


# ----------------------------------------------------------------------------------------- parameter counts
def attention_params(d: int) -> int:
    """Multi-head attention with biases on q/k/v/o: ``4 (d^2 + d)``."""
    return 4 * (d * d + d)


def swiglu_params(d: int, hidden: int) -> int:
    """SwiGLU with biases: gate and up ``2 (d f + f)``, down ``f d + d``."""
    return 2 * (d * hidden + hidden) + hidden * d + d


def modulator_params(d: int) -> int:
    """AdaLN modulator of a denoiser layer: ``Linear(d, 9 d)`` (shift/scale/gate for 3 sub-layers)."""
    return d * 9 * d + 9 * d


def contextualizer_layer_params(d: int, hidden: int) -> int:
    """Causal pre-norm block (Base-LCM, contextualizer, One-Tower): attention + SwiGLU + 2 RMSNorms."""
    return attention_params(d) + swiglu_params(d, hidden) + 2 * d


def denoiser_layer_params(d: int, hidden: int) -> int:
    """Two-Tower denoiser block: self- and cross-attention + SwiGLU + 3 RMSNorms + AdaLN modulator."""
    return 2 * attention_params(d) + swiglu_params(d, hidden) + 3 * d + modulator_params(d)


def _hidden(ffn_inner: int, nominal_ffn: bool) -> int:
    return swiglu_inner_dim(ffn_inner) if nominal_ffn else ffn_inner


def two_tower_params(d: int, n_ctx_layers: int, n_den_layers: int, ffn_inner: int, dim_in: int,
                     freq_dim: int = 256, *, nominal_ffn: bool = True) -> dict[str, int]:
    """Parameter counts of the Two-Tower diffusion LCM (LCM paper §2.3.4, Fig. 6; biases on every projection).

    Args:
        d: model width (both towers; the timestep embedding width equals ``d``).
        n_ctx_layers, n_den_layers: contextualizer / denoiser blocks.
        ffn_inner: the reference's nominal ``ffn_inner_dim`` (SwiGLU hidden = ``swiglu_inner_dim(ffn_inner)``:
            8192 -> 5632), or the SwiGLU hidden width itself with ``nominal_ffn=False`` (``LCMSection.d_ff``).
        dim_in: sentence-embedding width ``D``.
        freq_dim: sinusoidal timestep features fed to the timestep MLP.

    Returns:
        ``prenet``, ``contextualizer_layers``, ``contextualizer_norm``, ``contextualizer`` (their sum),
        ``timestep_mlp``, ``pre_denoiser``, ``denoiser_layers`` (modulators included), ``modulators``,
        ``denoiser_norm``, ``post_denoiser``, ``denoiser`` (sum), ``total`` (1.6B config: 1,645,538,304;
        7B: 6,930,781,696).
    """
    f = _hidden(ffn_inner, nominal_ffn)
    c = {"prenet": dim_in * d + d, "contextualizer_layers": n_ctx_layers * contextualizer_layer_params(d, f),
         "contextualizer_norm": d}
    c["contextualizer"] = c["prenet"] + c["contextualizer_layers"] + c["contextualizer_norm"]
    den = {"timestep_mlp": freq_dim * d + d + d * d + d, "pre_denoiser": dim_in * d + d,
           "denoiser_layers": n_den_layers * denoiser_layer_params(d, f), "denoiser_norm": d,
           "post_denoiser": d * dim_in + dim_in}
    c.update(den)
    c["modulators"] = n_den_layers * modulator_params(d)
    c["denoiser"] = sum(den.values())
    c["total"] = c["contextualizer"] + c["denoiser"]
    return c


def base_lcm_params(d: int, n_layers: int, ffn_inner: int, dim_in: int, *, nominal_ffn: bool = True,
                    max_positions: int = 0) -> dict[str, int]:
    """Parameter counts of the Base-LCM (LCM paper §2.3.1, Fig. 4): PreNet, causal blocks, final RMSNorm, PostNet.

    ``max_positions`` rows of learned positions (0 with RoPE) are reported as ``positions`` and are part of
    ``total`` but not of ``non_embedding`` (the ``N`` of the FLOPs model). ``ffn_inner`` as in
    :func:`two_tower_params`.
    """
    f = _hidden(ffn_inner, nominal_ffn)
    c = {"prenet": dim_in * d + d, "positions": max_positions * d,
         "layers": n_layers * contextualizer_layer_params(d, f), "norm": d, "postnet": d * dim_in + dim_in}
    c["total"] = sum(c.values())
    c["non_embedding"] = c["total"] - c["positions"]
    return c


def one_tower_params(d: int, n_layers: int, ffn_inner: int, dim_in: int, freq_dim: int = 256, *,
                     nominal_ffn: bool = True, timestep_dim: int | None = None,
                     max_positions: int = 0) -> dict[str, int]:
    """Parameter counts of the One-Tower diffusion LCM (LCM paper §2.3.3; the paper gives no code, so assumptions).

    Assumed: the timestep embedding is the Two-Tower's DiT-style MLP (``freq_dim -> t_dim -> t_dim``, ``t_dim =
    timestep_dim or d``), **concatenated** to the input embedding before the PreNet (``(D + t_dim) -> d``, as the
    reference frontend's ``timestep_embed_dim`` pre-linear); learned positions (``max_positions`` rows, excluded
    from ``non_embedding``); causal blocks as the Base-LCM's; final RMSNorm; PostNet ``d -> D``.
    """
    f = _hidden(ffn_inner, nominal_ffn)
    td = timestep_dim or d
    c = {"timestep_mlp": freq_dim * td + td + td * td + td, "prenet": (dim_in + td) * d + d,
         "positions": max_positions * d, "layers": n_layers * contextualizer_layer_params(d, f), "norm": d,
         "postnet": d * dim_in + dim_in}
    c["total"] = sum(c.values())
    c["non_embedding"] = c["total"] - c["positions"]
    return c


def two_tower_lcm(d: int, n_ctx_layers: int, n_den_layers: int, ffn_inner: int, dim_in: int, *,
                  name: str = "two_tower", nominal_ffn: bool = True, freq_dim: int = 256) -> LCMSize:
    """:class:`LCMSize` of a Two-Tower LCM (arguments as :func:`two_tower_params`)."""
    c = two_tower_params(d, n_ctx_layers, n_den_layers, ffn_inner, dim_in, freq_dim, nominal_ffn=nominal_ffn)
    return LCMSize(name=name,
                   contextualizer=TransformerSize(name=f"{name}.contextualizer", n_params=c["contextualizer"],
                                                  n_layers=n_ctx_layers, d_model=d),
                   denoiser=TransformerSize(name=f"{name}.denoiser", n_params=c["denoiser"], n_layers=n_den_layers,
                                            d_model=d),
                   timestep_params=c["modulators"] + c["timestep_mlp"])


def base_lcm(d: int, n_layers: int, ffn_inner: int, dim_in: int, *, name: str = "base",
             nominal_ffn: bool = True) -> LCMSize:
    """:class:`LCMSize` of a Base-LCM (no denoiser)."""
    c = base_lcm_params(d, n_layers, ffn_inner, dim_in, nominal_ffn=nominal_ffn)
    return LCMSize(name=name, contextualizer=TransformerSize(name=name, n_params=c["non_embedding"],
                                                             n_layers=n_layers, d_model=d), denoiser=None)


def one_tower_lcm(d: int, n_layers: int, ffn_inner: int, dim_in: int, *, name: str = "one_tower",
                  nominal_ffn: bool = True, freq_dim: int = 256) -> LCMSize:
    """:class:`LCMSize` of a One-Tower LCM: the same Transformer as contextualizer and denoiser."""
    c = one_tower_params(d, n_layers, ffn_inner, dim_in, freq_dim, nominal_ffn=nominal_ffn)
    size = TransformerSize(name=name, n_params=c["non_embedding"], n_layers=n_layers, d_model=d)
    return LCMSize(name=name, contextualizer=size, denoiser=size, timestep_params=c["timestep_mlp"])


TWO_TOWER_1_6B = two_tower_lcm(2048, 5, 13, 8192, 1024, name="two_tower_1.6b")
TWO_TOWER_7B = two_tower_lcm(4096, 5, 14, 16384, 1024, name="two_tower_7b")
ONE_TOWER_1_6B = one_tower_lcm(2048, 32, 8192, 1024, name="one_tower_1.6b")
"""The paper's One-Tower (32 layers, d 2048, FFN 8192 taken as nominal), under :func:`one_tower_params`'s
assumptions."""
LCM_PRESETS = {s.name: s for s in (TWO_TOWER_1_6B, TWO_TOWER_7B, ONE_TOWER_1_6B)}
LLM_PRESETS = {"llama2_7b": LLAMA2_7B}
ENCODER_PRESETS = {"sonar": SONAR_ENCODER, "minilm_l6": MINILM_L6_ENCODER}
DECODER_PRESETS = {"sonar": SONAR_DECODER}


def lcm_from_section(lcm: LCMSection) -> LCMSize:
    """:class:`LCMSize` of a run's ``lcm`` section (``d_ff`` is the SwiGLU hidden width itself).

    Raises:
        ConfigError: (field ``lcm.model``) for the Quantized LCM, which has no cost model here.
    """
    name = f"run ({lcm.model})"
    if lcm.model == "two_tower":
        return two_tower_lcm(lcm.d_model, lcm.n_layers, lcm.n_denoiser_layers, lcm.d_ff, lcm.dim, name=name,
                             nominal_ffn=False)
    if lcm.model == "one_tower":
        return one_tower_lcm(lcm.d_model, lcm.n_layers, lcm.d_ff, lcm.dim, name=name, nominal_ffn=False)
    if lcm.model == "base":
        return base_lcm(lcm.d_model, lcm.n_layers, lcm.d_ff, lcm.dim, name=name, nominal_ffn=False)
    raise ConfigError(f"no inference cost model for lcm.model={lcm.model!r} (supported: base, one_tower, two_tower)",
                      field="lcm.model")


# ----------------------------------------------------------------------------------------- FLOPs
def _positions(size: TransformerSize, first: float, count: float) -> float:
    """FLOPs of ``count`` positions whose attended lengths are ``first + 1 .. first + count``:
    ``sum (2 N + 2 n_layer d c) = 2 N count + 2 n_layer d (count first + count (count + 1) / 2)``."""
    return 2.0 * size.n_params * count + 2.0 * size.n_layers * size.d_model * (count * first
                                                                                + count * (count + 1) / 2)


def llm_generation_flops(llm: TransformerSize, prompt_tokens: float, new_tokens: float) -> dict[str, float]:
    """Forward FLOPs of a token LLM reading ``prompt_tokens`` and generating ``new_tokens`` (KV-cached).

    Returns ``prefill`` (prompt positions), ``generate`` (new positions) and ``total`` ``= 2 N L + n_layer d L (L +
    1)`` with ``L = prompt_tokens + new_tokens``.
    """
    prefill = _positions(llm, 0, prompt_tokens)
    generate = _positions(llm, prompt_tokens, new_tokens)
    return {"prefill": prefill, "generate": generate, "total": prefill + generate}


def lcm_generation_flops(lcm: LCMSize, encoder: TransformerSize, decoder: TransformerSize, prompt_sentences: float,
                         new_sentences: float, sentence_tokens: float, inference_steps: int = 40, cfg: bool = True,
                         precompute_modulation: bool = False, beam_size: int = 1) -> dict[str, float]:
    """Forward FLOPs of an LCM reading ``prompt_sentences`` and generating ``new_sentences`` of ``sentence_tokens``
    tokens each (formulas in the module docstring).

    Args:
        inference_steps: diffusion steps ``S`` per sentence (ignored by the Base-LCM).
        cfg: classifier-free guidance (2 denoiser rows per step).
        precompute_modulation: drop the timestep-only parameters (AdaLN modulators, timestep MLP) from each step.
        beam_size: decoder beam (multiplies the decode cost).

    Returns:
        ``encode``, ``contextualizer``, ``denoiser``, ``decode`` and ``total`` FLOPs.
    """
    p, g, ell = float(prompt_sentences), float(new_sentences), float(sentence_tokens)
    n = p + g
    enc = n * (2.0 * encoder.n_params * ell + 2.0 * encoder.n_layers * encoder.d_model * ell * ell)
    ctx = _positions(lcm.contextualizer, 0, n)
    den = 0.0
    if lcm.denoiser is not None:
        n_eff = lcm.denoiser.n_params - (lcm.timestep_params if precompute_modulation else 0)
        step = TransformerSize(name=lcm.denoiser.name, n_params=n_eff, n_layers=lcm.denoiser.n_layers,
                               d_model=lcm.denoiser.d_model)
        # generated sentence k (k = P .. n-1) attends k + 1 keys: positions with attended lengths P+1 .. P+G
        den = inference_steps * (2 if cfg else 1) * _positions(step, p, g)
    dec = g * beam_size * (2.0 * decoder.n_params * ell
                           + decoder.n_layers * decoder.d_model * (ell * ell + 3 * ell))
    return {"encode": enc, "contextualizer": ctx, "denoiser": den, "decode": dec, "total": enc + ctx + den + dec}


def break_even_sentence_length(lcm: LCMSize, encoder: TransformerSize, decoder: TransformerSize,
                               llm: TransformerSize, inference_steps: int = 40, cfg: bool = True,
                               precompute_modulation: bool = False, beam_size: int = 1) -> float:
    """Sentence length ``l`` (tokens) at which the LCM and the LLM cost the same per generated token when the
    document context is negligible (its attention terms dropped; the SONAR within-sentence terms kept).

    Per generated token the LCM costs ``A / l + B + a l`` and the LLM ``2 N``, with ``A = 2 N_ctx + S r 2 N_den'``
    (one sentence), ``B = 2 N_enc + b (2 N_dec + 3 n_dec d_dec)``, ``a = 2 n_enc d_enc + b n_dec d_dec``; the
    result is the smaller root of ``a l^2 + (B - 2 N) l + A = 0``: longer sentences favour the LCM up to the
    (far larger) second root. ``math.inf`` when no length makes the LCM as cheap.
    """
    big_a = 2.0 * lcm.contextualizer.n_params
    if lcm.denoiser is not None:
        n_eff = lcm.denoiser.n_params - (lcm.timestep_params if precompute_modulation else 0)
        big_a += inference_steps * (2 if cfg else 1) * 2.0 * n_eff
    b = 2.0 * encoder.n_params + beam_size * (2.0 * decoder.n_params + 3.0 * decoder.n_layers * decoder.d_model)
    b -= 2.0 * llm.n_params
    a = 2.0 * encoder.n_layers * encoder.d_model + beam_size * decoder.n_layers * decoder.d_model
    if b >= 0:
        return math.inf
    disc = b * b - 4 * a * big_a
    if disc < 0:
        return math.inf
    return 2 * big_a / (-b + math.sqrt(disc))  # the smaller root, in the cancellation-free form


def crossover_total_tokens(lcm: LCMSize, encoder: TransformerSize, decoder: TransformerSize, llm: TransformerSize,
                           sentence_tokens: float, inference_steps: int = 40, cfg: bool = True,
                           precompute_modulation: bool = False, prompt_fraction: float = 0.5,
                           beam_size: int = 1) -> float:
    """Total length ``L*`` (tokens) beyond which the LCM generates a document more cheaply than the LLM, with
    ``prompt_fraction`` of the document given as the prompt.

    Both totals are ``L (a L + b)`` in ``L`` (no constant term), so the difference ``L (a L + b)`` changes sign at
    most once for ``L > 0``: ``L* = -b / a``; ``0.0`` if the LCM is cheaper at every length, ``math.inf`` if the
    LCM's quadratic coefficient is not smaller (it never wins on long documents).
    """
    def diff_per_token(total: float) -> float:
        prompt = prompt_fraction * total
        lcm_f = lcm_generation_flops(lcm, encoder, decoder, prompt / sentence_tokens,
                                     (total - prompt) / sentence_tokens, sentence_tokens, inference_steps, cfg,
                                     precompute_modulation, beam_size)["total"]
        return (lcm_f - llm_generation_flops(llm, prompt, total - prompt)["total"]) / total

    x1, x2 = 1000.0, 2000.0
    y1, y2 = diff_per_token(x1), diff_per_token(x2)
    a = (y2 - y1) / (x2 - x1)
    b = y1 - a * x1
    if a >= 0:
        return math.inf
    return max(0.0, -b / a)


# ----------------------------------------------------------------------------------------- report
def resolve_sizes(section: CostSection, lcm_section: LCMSection | None = None
                  ) -> tuple[LCMSize, TransformerSize, TransformerSize, TransformerSize]:
    """``(lcm, llm, encoder, decoder)`` sizes of a validated section; ``lcm: run`` needs ``lcm_section``.

    Raises:
        ConfigError: naming ``cost.lcm`` when ``run`` has no lcm section, or ``lcm.model`` for an unsupported one.
    """
    if section.lcm == "run":
        if lcm_section is None:
            raise ConfigError("'run' needs the run's lcm section (pass it, or pick a preset)", field="cost.lcm")
        lcm = lcm_from_section(lcm_section)
    else:
        lcm = LCM_PRESETS[section.lcm]

    def pick(value: str | TransformerSize, presets: dict[str, TransformerSize]) -> TransformerSize:
        return presets[value] if isinstance(value, str) else value

    return (lcm, pick(section.llm, LLM_PRESETS), pick(section.encoder, ENCODER_PRESETS),
            pick(section.decoder, DECODER_PRESETS))


def cost_table(section: CostSection, lcm_section: LCMSection | None = None) -> list[dict]:
    """One row per ``total_tokens``: ``total_tokens``, ``prompt_tokens``, ``new_tokens``, ``llm_flops``,
    ``lcm_flops`` / ``ratio`` (LCM / LLM) / ``lcm_parts`` (the :func:`lcm_generation_flops` dict), each keyed by
    sentence length."""
    section.validate()
    lcm, llm, enc, dec = resolve_sizes(section, lcm_section)
    rows = []
    for total in section.total_tokens:
        prompt = section.prompt_fraction * total
        llm_f = llm_generation_flops(llm, prompt, total - prompt)["total"]
        row = {"total_tokens": total, "prompt_tokens": prompt, "new_tokens": total - prompt, "llm_flops": llm_f,
               "lcm_flops": {}, "ratio": {}, "lcm_parts": {}}
        for ell in section.sentence_tokens:
            parts = lcm_generation_flops(lcm, enc, dec, prompt / ell, (total - prompt) / ell, ell,
                                         section.inference_steps, section.cfg, section.precompute_modulation,
                                         section.beam_size)
            row["lcm_parts"][ell], row["lcm_flops"][ell] = parts, parts["total"]
            row["ratio"][ell] = parts["total"] / llm_f
        rows.append(row)
    return rows


def _break_even(section: CostSection, lcm_section: LCMSection | None) -> dict:
    lcm, llm, enc, dec = resolve_sizes(section, lcm_section)
    opts = dict(inference_steps=section.inference_steps, cfg=section.cfg,
                precompute_modulation=section.precompute_modulation, beam_size=section.beam_size)
    return {"sentence_tokens": break_even_sentence_length(lcm, enc, dec, llm, **opts),
            "crossover_total_tokens": {ell: crossover_total_tokens(lcm, enc, dec, llm, ell,
                                                                   prompt_fraction=section.prompt_fraction, **opts)
                                       for ell in section.sentence_tokens}}


def cost_markdown(section: CostSection, rows: list[dict], break_even: dict, lcm_name: str, llm_name: str) -> str:
    """The markdown report: settings, the FLOPs table (rows: total length) and the break-even points."""
    ells = section.sentence_tokens
    head = ["total tokens", f"{llm_name} FLOPs"] + [f"LCM l={e:g}" for e in ells] + [f"ratio l={e:g}" for e in ells]
    lines = [f"# Inference FLOPs: {lcm_name} vs {llm_name}", "",
             f"S={section.inference_steps} steps, CFG {'on' if section.cfg else 'off'}, modulation "
             f"{'precomputed' if section.precompute_modulation else 'per step'}, beam {section.beam_size}, "
             f"prompt = {section.prompt_fraction:g} of the total length; l = tokens per sentence; ratio = LCM / LLM.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['total_tokens']}", f"{r['llm_flops']:.3e}"] + [f"{r['lcm_flops'][e]:.3e}" for e in ells]
        cells += [f"{r['ratio'][e]:.3f}" for e in ells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Break-even sentence length (short context, per generated token): "
                  f"{break_even['sentence_tokens']:.1f} tokens. The table counts whole documents: a prompt sentence "
                  "costs the LCM only its encoding and one contextualizer position, so with a prompt the LCM "
                  "wins at shorter sentences than that.", "",
              "Whole document (prompt + output), LCM vs LLM:"]
    for e, x in break_even["crossover_total_tokens"].items():
        where = "never" if math.isinf(x) else ("at every length" if x == 0 else f"beyond {x:,.0f} total tokens")
        lines.append(f"- l={e:g}: LCM cheaper {where}")
    return "\n".join(lines) + "\n"


def _plot(section: CostSection, rows: list[dict], path: Path, lcm_name: str, llm_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["total_tokens"] for r in rows]
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax.plot(xs, [r["llm_flops"] for r in rows], color="k", lw=2, label=llm_name)
    for i, ell in enumerate(section.sentence_tokens):
        ax.plot(xs, [r["lcm_flops"][ell] for r in rows], color=f"C{i}", marker="o", ms=3, label=f"LCM, l={ell:g}")
        axr.plot(xs, [r["ratio"][ell] for r in rows], color=f"C{i}", marker="o", ms=3, label=f"l={ell:g}")
    axr.axhline(1.0, color="k", lw=1, ls="--")
    for a, ylabel in ((ax, "inference FLOPs"), (axr, "LCM / LLM FLOPs")):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("total length (prompt + output, LLM tokens)")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    fig.suptitle(f"{lcm_name} (S={section.inference_steps}, CFG {'on' if section.cfg else 'off'}) vs {llm_name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def run_cost(section: CostSection, out_dir: Path | None, lcm_section: LCMSection | None = None) -> dict:
    """Print the FLOPs table, write ``cost.md`` and ``cost.png`` into ``out_dir`` (atomically; ``None`` = print
    only) and return ``{"rows": cost_table(...), "break_even": {"sentence_tokens": l*, "crossover_total_tokens":
    {l: L*}}, "files": [paths]}``.

    Raises:
        ConfigError: naming the ``cost.*`` field of an invalid section.
    """
    rows = cost_table(section, lcm_section)
    lcm, llm, _, _ = resolve_sizes(section, lcm_section)
    be = _break_even(section, lcm_section)
    text = cost_markdown(section, rows, be, lcm.name, llm.name)
    print(text, end="")
    files: list[str] = []
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / "cost.md", text)
        _plot(section, rows, out_dir / "cost.png", lcm.name, llm.name)
        files = [str(out_dir / "cost.md"), str(out_dir / "cost.png")]
    return {"rows": rows, "break_even": be, "files": files}
