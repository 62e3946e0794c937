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

import torch
from torch import nn

from conceptlm.core.modules import Decoder, KVCache
from conceptlm.lcm.config import LCMSection

__all__ = ["NormalizedModel", "CausalSentenceModel", "BaseLCM"]

LEARNED_POSITION_STD = 0.006
"""Init std of learned positions in the reference frontend (the SONAR per-dimension std)."""


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
