"""Base-LCM: a causal transformer that regresses the next sentence embedding (paper §2.3.1, Fig. 4).

Shapes: ``B`` documents, ``T`` sentences, ``D`` = ``dim`` (sentence-embedding width, e.g. 384 for MiniLM, 1024 for
SONAR), ``d`` = ``d_model``.

The normalizer lives **inside** the model, as frozen buffers ``center``/``scale`` (and optional clip bounds) that are
checkpointed with the weights, so a checkpoint alone can generate::

    z  = normalize(x)   = clamp((x - center) / scale, clip_min, clip_max)        (B, T, D)
    h0 = PreNet(z)      = z W_pre^T + b_pre  (x sqrt(d) if scale_embeddings) (+ learned positions)
    hL = Decoder(h0)    causal pre-norm blocks (RMSNorm, MHA with biases + RoPE, SwiGLU with biases), final RMSNorm
    y  = PostNet(hL)    = hL W_post^T + b_post                                   (normalized space)
    x^ = denormalize(y) = clamp(y, clip_min, clip_max) * scale + center          (raw space)

``y[:, t]`` predicts ``z[:, t + 1]``. Training compares ``y`` with ``z`` (normalized space, as the reference
criterion does); generation and the raw-space metrics use ``x^``. ``normalize=False`` (identity statistics) turns
the normalizer off. The statistics are set once from the training data with :meth:`BaseLCM.set_normalizer` (the
recipe also writes them as a checkpoint artefact for the decoders and evaluation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from conceptlm.core.config import check
from conceptlm.core.modules import Decoder, DecoderConfig, KVCache
from conceptlm.lcm.diffusion.config import DiffusionSection
from conceptlm.lcm.quant_config import QuantSection

__all__ = ["LCMSection", "NormalizedModel", "CausalSentenceModel", "BaseLCM", "swiglu_inner_dim", "LCM_VARIANTS"]

LCM_VARIANTS = ("base", "two_tower", "one_tower", "quant_d", "quant_c")
"""``lcm.model`` values: Base-LCM (MSE), the two diffusion LCMs, Quant-LCM with discrete / continuous targets."""

LEARNED_POSITION_STD = 0.006
"""Init std of learned positions in the reference frontend (the SONAR per-dimension std)."""


def swiglu_inner_dim(ffn_inner_dim: int, multiple_of: int = 256) -> int:
    """The reference's SwiGLU hidden width for a nominal FFN width: ``m * ceil(int(2/3 * f) / m)``
    (8192 -> 5632, 16384 -> 11008)."""
    return multiple_of * math.ceil(int(ffn_inner_dim * 2 / 3) / multiple_of)


@dataclass(kw_only=True)
class LCMSection:
    """The Base-LCM architecture (section ``lcm`` of an LCM run config)."""

    model: Literal["base", "two_tower", "one_tower", "quant_d", "quant_c"] = "base"
    """LCM variant: ``base`` (MSE regression), ``two_tower`` / ``one_tower`` (diffusion, section ``diffusion``),
    ``quant_d`` / ``quant_c`` (Quantized LCM with discrete / continuous targets, section ``quant``)."""
    dim: int = 384
    """Sentence-embedding width ``D``; must equal the data's (checked against the data by the recipe)."""
    d_model: int = 256
    n_layers: int = 2
    """Decoder blocks (0 = PreNet -> PostNet, a linear next-vector baseline); the Two-Tower's contextualizer."""
    n_denoiser_layers: int = 2
    """Two-Tower only: blocks of the denoiser (AdaLN-zero, identity self-attention, cross-attention)."""
    n_heads: int = 4
    d_ff: int = 768
    """SwiGLU hidden width (the reference's ``swiglu_inner_dim(ffn)``: ffn 8192 -> 5632)."""
    dropout: float = 0.1
    """Residual dropout on each sub-layer output (reference: 0.1)."""
    attn_dropout: float = 0.0
    max_sentences: int = 128
    """Longest sequence of sentences the model sees: documents are cut into chunks of this many sentences for
    training (reference ``len_to_wrap_long_seq``), the learned-position table has this many rows, and a generated
    document (prompt + continuation) never grows beyond it."""
    positions: Literal["rope", "learned", "none"] = "rope"
    """RoPE (theta ``rope_theta``) on queries and keys (reference 1.6B arch), a learned table added after the
    PreNet (reference toy arch), or none."""
    rope_theta: float = 10000.0
    scale_embeddings: bool = False
    """Multiply the PreNet output by ``sqrt(d_model)`` (reference option, off by default)."""
    normalize: bool = True
    """Fit the robust normalizer (median / IQR) on the training embeddings; ``false`` = identity statistics."""
    normalizer_samples: int = 100_000
    """At most this many training sentence vectors are used to fit the normalizer."""
    min_context: int = 1
    """Positions ``< min_context`` of each chunk are never targets (reference ``min_context_size``)."""
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    """Noise process and objective of ``two_tower`` / ``one_tower`` (ignored by the other variants)."""
    quant: QuantSection = field(default_factory=QuantSection)
    """Quantizer of ``quant_d`` / ``quant_c`` (ignored by the other variants)."""

    def validate(self) -> None:
        check(self.dim > 0, "lcm.dim", "must be > 0")
        check(self.d_model > 0 and self.n_heads > 0, "lcm.d_model", "d_model and n_heads must be > 0")
        check(self.d_model % self.n_heads == 0, "lcm.n_heads", f"must divide d_model={self.d_model}")
        if self.positions == "rope":
            check((self.d_model // self.n_heads) % 2 == 0, "lcm.n_heads",
                  f"RoPE needs an even head width, d_model/n_heads = {self.d_model // self.n_heads}")
        check(self.n_layers >= 0, "lcm.n_layers", "must be >= 0")
        check(self.d_ff > 0, "lcm.d_ff", "must be > 0")
        check(0.0 <= self.dropout < 1.0 and 0.0 <= self.attn_dropout < 1.0, "lcm.dropout", "must be in [0, 1)")
        check(self.max_sentences >= 2, "lcm.max_sentences", "must be >= 2 (one context and one target)")
        check(self.normalizer_samples > 0, "lcm.normalizer_samples", "must be > 0")
        check(0 <= self.min_context < self.max_sentences, "lcm.min_context",
              f"must be in [0, max_sentences={self.max_sentences})")
        check(self.model in LCM_VARIANTS, "lcm.model", f"must be one of {', '.join(LCM_VARIANTS)}")
        check(self.n_denoiser_layers >= 1, "lcm.n_denoiser_layers", "must be >= 1")
        self.diffusion.validate()
        self.quant.validate()

    @classmethod
    def from_dict(cls, data: dict) -> LCMSection:
        """The section of a saved ``config.yaml`` (its ``diffusion`` / ``quant`` sub-sections as dicts; files
        written before they existed have none). Raises ``TypeError`` for unknown fields."""
        data = dict(data)
        sub = {"diffusion": DiffusionSection, "quant": QuantSection}
        for name, kind in sub.items():
            if isinstance(data.get(name), dict):
                data[name] = kind(**data[name])
        return cls(**data)

    def decoder_config(self) -> DecoderConfig:
        """The shared-blocks config of the reference architecture: RMSNorm, SwiGLU and attention with biases."""
        return DecoderConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, d_ff=self.d_ff,
                             mlp="swiglu", norm="rms", norm_eps=1e-5, rope=self.positions == "rope",
                             rope_theta=self.rope_theta, attention_bias=True, mlp_bias=True, dropout=self.dropout,
                             attn_dropout=self.attn_dropout, causal=True)


class NormalizedModel(nn.Module):
    """Base of every LCM variant: the normalizer as frozen buffers ``center``/``scale``/``clip_min``/``clip_max``
    ``(D,)`` (checkpointed with the weights) and ``cfg`` (:class:`LCMSection`)."""

    def __init__(self, cfg: LCMSection) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("clip_min", torch.full((dim,), -math.inf))
        self.register_buffer("clip_max", torch.full((dim,), math.inf))

    # ----------------------------------------------------------------------------------------- normalizer
    @torch.no_grad()
    def set_normalizer(self, center: torch.Tensor, scale: torch.Tensor, clip_min: torch.Tensor | None = None,
                       clip_max: torch.Tensor | None = None) -> None:
        """Copy normalizer statistics ``(D,)`` into the buffers (clip bounds: none = unbounded)."""
        dim = self.cfg.dim
        for name, v in (("center", center), ("scale", scale), ("clip_min", clip_min), ("clip_max", clip_max)):
            if v is None:
                continue
            v = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
            if v.numel() != dim:
                raise ValueError(f"normalizer {name} has {v.numel()} values, the model's dim is {dim}")
            getattr(self, name).copy_(v)
        if not bool((self.scale > 0).all()):
            raise ValueError("normalizer scale must be > 0 in every dimension")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw ``(..., D)`` -> normalized ``(..., D)``."""
        z = (x - self.center) / self.scale
        return torch.maximum(torch.minimum(z, self.clip_max), self.clip_min)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized ``(..., D)`` -> raw ``(..., D)`` (clamped to the clip bounds first)."""
        z = torch.maximum(torch.minimum(z, self.clip_max), self.clip_min)
        return z * self.scale + self.center


class CausalSentenceModel(NormalizedModel):
    """A normalized model with the reference's causal sentence tower: PreNet (``D -> d``, optionally scaled by
    ``sqrt(d)``, plus learned positions) and a causal :class:`~conceptlm.core.modules.Decoder` with a final norm.
    The Base-LCM's decoder and the Two-Tower's contextualizer."""

    def _build_causal_tower(self, name: str) -> None:
        """Create ``prenet``, ``position`` and the decoder as attribute ``name``. Reference init: attention output
        projections xavier-uniform with zero bias (the PreNet keeps the ``nn.Linear`` init; the other decoder
        weights keep the shared blocks' init)."""
        cfg = self.cfg
        self.prenet = nn.Linear(cfg.dim, cfg.d_model)
        self.position = None
        if cfg.positions == "learned":
            self.position = nn.Embedding(cfg.max_sentences, cfg.d_model)
            nn.init.normal_(self.position.weight, std=LEARNED_POSITION_STD)
        tower = Decoder(cfg.decoder_config())
        for layer in tower.layers:
            nn.init.xavier_uniform_(layer.attn.o_proj.weight)
            nn.init.zeros_(layer.attn.o_proj.bias)
        setattr(self, name, tower)
        self._tower = name

    def _run_causal_tower(self, z: torch.Tensor, *, positions: torch.Tensor | None = None,
                          key_padding_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Normalized ``z`` ``(B, T, D)`` -> tower outputs ``(B, T, d)`` (positions default to ``past + arange(T)``,
        ``past`` = the cache length)."""
        b, t, _ = z.shape
        if positions is None:
            past = cache.length() if cache is not None else 0
            positions = torch.arange(past, past + t, device=z.device).unsqueeze(0).expand(b, t)
        if self.position is not None and int(positions.max()) >= self.cfg.max_sentences:
            raise ValueError(f"sentence position {int(positions.max())} >= lcm.max_sentences="
                             f"{self.cfg.max_sentences} (the learned position table)")
        h = self.prenet(z)
        if self.cfg.scale_embeddings:
            h = h * math.sqrt(self.cfg.d_model)
        if self.position is not None:
            h = h + self.position(positions)
        return getattr(self, self._tower)(h, positions=positions, key_padding_mask=key_padding_mask, cache=cache)


class BaseLCM(CausalSentenceModel):
    """PreNet -> causal :class:`~conceptlm.core.modules.Decoder` -> PostNet, normalizer inside (module docstring).

    Args:
        cfg: the architecture.
    """

    def __init__(self, cfg: LCMSection) -> None:
        super().__init__(cfg)
        self._build_causal_tower("decoder")
        self.postnet = nn.Linear(cfg.d_model, cfg.dim)

    # ----------------------------------------------------------------------------------------- forward
    def forward_normalized(self, z: torch.Tensor, *, positions: torch.Tensor | None = None,
                           key_padding_mask: torch.Tensor | None = None,
                           cache: KVCache | None = None) -> torch.Tensor:
        """Normalized inputs ``z`` ``(B, T, D)`` -> normalized next-sentence predictions ``(B, T, D)``.

        Args:
            positions: long ``(B, T)`` sentence positions (default ``past + arange(T)``, ``past`` = cache length).
            key_padding_mask: bool ``(B, S)`` over all keys (cached + new), True = a real sentence. Not needed for
                right-padded batches (causal attention never lets a real sentence see a later pad).
            cache: :class:`KVCache` updated in place (incremental generation: one position per new sentence).
        """
        h = self._run_causal_tower(z, positions=positions, key_padding_mask=key_padding_mask, cache=cache)
        return self.postnet(h)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Raw inputs ``x`` ``(B, T, D)`` -> raw next-sentence predictions ``(B, T, D)`` (keywords as
        :meth:`forward_normalized`)."""
        return self.denormalize(self.forward_normalized(self.normalize(x), **kwargs))
