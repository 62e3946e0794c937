"""A stack of :class:`~.block.DecoderBlock` plus a final norm.

``h`` denotes hidden states ``(B, T, D)`` (embeddings are the caller's job).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import build_attention_mask
from .block import DecoderBlock
from .cache import KVCache
from .modulation import AdaLNModulation
from .norms import build_norm
from .rope import RotaryEmbedding

__all__ = ["DecoderConfig", "Decoder", "positions_from_padding"]


@dataclass
class DecoderConfig:
    """Hyper-parameters of a :class:`Decoder`.

    Attributes:
        d_model: width ``D``. n_layers: number of blocks.
        n_heads: query heads. n_kv_heads: key/value heads (``None`` = ``n_heads``; GQA when smaller).
        head_dim: per-head width (``None`` = ``d_model // n_heads``).
        d_ff: MLP hidden width (``None`` = ``4 * d_model``).
        mlp: ``"swiglu"`` | ``"gelu"`` | ``"gelu_tanh"``. norm: ``"rms"`` | ``"layer"``.
        norm_eps: norm epsilon. rope: use rotary embeddings. rope_theta: RoPE base.
        attention_bias: biases on q/k/v/o. mlp_bias: biases in the MLP.
        dropout: residual dropout. attn_dropout: attention-probability dropout.
        causal: causal self-attention.
        cross_attention: add a cross-attention sub-layer. d_memory: memory width (``None`` = ``d_model``).
        adaln: AdaLN-zero modulation. d_cond: conditioning width (``None`` = ``d_model``).
        init_std: std of the normal init of linear weights (biases zero; modulation stays zero).
    """

    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int | None = None
    mlp: str = "swiglu"
    norm: str = "rms"
    norm_eps: float = 1e-6
    rope: bool = True
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    dropout: float = 0.0
    attn_dropout: float = 0.0
    causal: bool = True
    cross_attention: bool = False
    d_memory: int | None = None
    adaln: bool = False
    d_cond: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={kv}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} not divisible by n_heads={self.n_heads}; set head_dim")

    @property
    def ffn_dim(self) -> int:
        """Resolved MLP hidden width."""
        return self.d_ff or 4 * self.d_model

    @property
    def resolved_head_dim(self) -> int:
        """Resolved per-head width."""
        return self.head_dim or self.d_model // self.n_heads


def positions_from_padding(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Positions ``(B, S)`` long from a bool keep-mask ``(B, S)``: 0, 1, ... over kept tokens.

    Padding slots before the first real token get 0. For left-padded incremental
    decoding pass ``positions_from_padding(full_mask)[:, -T:]`` for the ``T`` new tokens.
    """
    m = key_padding_mask.to(torch.long)
    return (m.cumsum(-1) - 1).clamp_min(0)


class Decoder(nn.Module):
    """``nn.ModuleList`` of :class:`DecoderBlock` (``self.layers``) + final norm (``self.norm``).

    Any contiguous range of layers can be run on its own (``layers=slice(a, b)``), e.g.
    ``h = dec(h, layers=slice(0, k)); h = f(h); h = dec(h, layers=slice(k, None))``.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.rope = RotaryEmbedding(cfg.resolved_head_dim, cfg.rope_theta) if cfg.rope else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, ``init_std``) linear weights, zero biases, unit norms, zero AdaLN modulation."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=self.config.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, AdaLNModulation):
                m.reset_parameters()

    def forward(
        self,
        h: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        memory_attn_mask: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layers: slice | None = None,
        final_norm: bool = True,
    ) -> torch.Tensor:
        """Run (a slice of) the blocks: ``h`` ``(B, T, D)`` -> ``(B, T, D)``.

        Args:
            positions: long ``(B, T)`` RoPE positions; default ``arange(T) + past`` where
                ``past`` is the cache length of the first layer run.
            key_padding_mask: bool ``(B, S)`` over all keys (``S = past + T``), True = keep.
            attn_mask: additive float ``(B|1, H|1, T, S)`` for self-attention.
            memory: ``(B, S_mem, Dm)`` for cross-attention; with a cache it is projected once
                and reused on later calls (then ``memory`` may be ``None``).
            memory_mask: bool ``(B, S_mem)``, True = keep. memory_attn_mask: additive ``(B|1, H|1, T, S_mem)``.
            cond: AdaLN conditioning ``(B, C)`` or ``(B, T, C)`` (required if ``config.adaln``).
            cache: :class:`KVCache` updated in place (keys are global layer indices).
            layers: run only ``self.layers[layers]`` (a slice with step 1).
            final_norm: apply ``self.norm`` at the end -- only if the run includes the last layer.
        """
        idx = range(len(self.layers))[layers] if layers is not None else range(len(self.layers))
        if len(idx) == 0:
            return h
        if idx.step != 1:
            raise ValueError("`layers` must be a contiguous slice (step 1)")
        b, t = h.shape[:2]
        past = cache.length(idx[0]) if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + t, device=h.device).unsqueeze(0).expand(b, t)
        rope = self.rope(positions, h.dtype) if self.rope is not None else None
        mask = build_attention_mask(
            t, past + t, causal=self.config.causal, key_padding_mask=key_padding_mask,
            attn_mask=attn_mask, dtype=h.dtype, device=h.device,
        )
        for i in idx:
            h = self.layers[i](
                h, rope=rope, mask=mask, memory=memory, memory_mask=memory_mask,
                memory_attn_mask=memory_attn_mask, cond=cond, cache=cache,
            )
        if final_norm and idx[-1] == len(self.layers) - 1:
            h = self.norm(h)
        return h
