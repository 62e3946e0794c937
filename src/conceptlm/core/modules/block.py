"""Pre-norm transformer decoder block.

``h`` is the residual stream ``(B, T, D)``. Sub-layers, each
``h = h + dropout(sublayer(norm(h)))``:

1. causal (or bidirectional) self-attention with RoPE and optional KV cache;
2. optional cross-attention to a memory ``(B, S_mem, Dm)``;
3. MLP (SwiGLU or GELU).

With ``adaln`` each sub-layer is modulated by a conditioning vector
(``norm(h) * (1 + scale) + shift`` and a ``gate`` on the residual branch), see
:mod:`.modulation`; the modulation is zero-initialised so a fresh block is the
identity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMask, CrossAttention, SelfAttention
from .cache import KVCache
from .mlp import build_mlp
from .modulation import AdaLNModulation, Modulation, modulate
from .norms import build_norm

if TYPE_CHECKING:
    from .decoder import DecoderConfig

__all__ = ["DecoderBlock"]


class DecoderBlock(nn.Module):
    """One pre-norm block built from a :class:`~.decoder.DecoderConfig`.

    Submodules: ``attn_norm``, ``attn`` (:class:`SelfAttention`), optionally
    ``cross_norm``/``cross_attn`` (:class:`CrossAttention`), ``mlp_norm``,
    ``mlp`` and optionally ``modulation`` (:class:`AdaLNModulation`).

    Args:
        cfg: decoder configuration.
        layer_idx: index of this block; used as its key in a :class:`KVCache`.
    """

    def __init__(self, cfg: DecoderConfig, layer_idx: int = 0) -> None:
        super().__init__()
        d = cfg.d_model
        self.layer_idx = layer_idx
        self.dropout = cfg.dropout
        self.attn_norm = build_norm(cfg.norm, d, cfg.norm_eps)
        self.attn = SelfAttention(
            d, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, bias=cfg.attention_bias,
            causal=cfg.causal, dropout=cfg.attn_dropout,
        )
        self.cross_norm: nn.Module | None = None
        self.cross_attn: CrossAttention | None = None
        if cfg.cross_attention:
            self.cross_norm = build_norm(cfg.norm, d, cfg.norm_eps)
            self.cross_attn = CrossAttention(
                d, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, d_memory=cfg.d_memory,
                bias=cfg.attention_bias, dropout=cfg.attn_dropout,
            )
        self.mlp_norm = build_norm(cfg.norm, d, cfg.norm_eps)
        self.mlp = build_mlp(cfg.mlp, d, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.modulation: AdaLNModulation | None = None
        if cfg.adaln:
            self.modulation = AdaLNModulation(d, cfg.d_cond, n_sublayers=3 if cfg.cross_attention else 2)

    def _residual(self, h: torch.Tensor, out: torch.Tensor, mod: Modulation | None) -> torch.Tensor:
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        if mod is not None:
            out = mod.gate * out
        return h + out

    @staticmethod
    def _pre(norm: nn.Module, h: torch.Tensor, mod: Modulation | None) -> torch.Tensor:
        x = norm(h)
        return x if mod is None else modulate(x, mod.shift, mod.scale)

    def forward(
        self,
        h: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        mask: AttentionMask | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        memory_attn_mask: torch.Tensor | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cond: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``h`` ``(B, T, D)`` -> ``(B, T, D)``.

        Args:
            rope: ``(cos, sin)`` each ``(B, T, d)``, or ``None`` for no RoPE.
            key_padding_mask: bool ``(B, S)`` over all self-attention keys (cached + new), True = keep.
            attn_mask: additive float ``(B|1, H|1, T, S)`` for self-attention.
            mask: prebuilt self-attention :class:`AttentionMask` (overrides the two above).
            memory: ``(B, S_mem, Dm)`` for cross-attention (may be ``None`` when K/V are cached).
            memory_mask: bool ``(B, S_mem)``, True = keep. memory_attn_mask: additive ``(B|1, H|1, T, S_mem)``.
            memory_kv: precomputed cross-attention ``(k, v)`` (see :meth:`CrossAttention.project_memory`).
            cond: conditioning ``(B, C)`` or ``(B, T, C)``; required iff the block has ``modulation``.
            cache: :class:`KVCache`; self-attention K/V and memory K/V are stored under ``layer_idx``.
        """
        mods: list[Modulation] | list[None]
        if self.modulation is not None:
            if cond is None:
                raise ValueError("this block uses AdaLN modulation: pass `cond`")
            mods = self.modulation(cond)
        else:
            mods = [None, None, None]
        x = self._pre(self.attn_norm, h, mods[0])
        a = self.attn(
            x, rope=rope, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            cache=cache, layer_idx=self.layer_idx, mask=mask,
        )
        h = self._residual(h, a, mods[0])
        if self.cross_attn is not None:
            assert self.cross_norm is not None
            x = self._pre(self.cross_norm, h, mods[1])
            c = self.cross_attn(
                x, memory, memory_mask=memory_mask, attn_mask=memory_attn_mask,
                memory_kv=memory_kv, cache=cache, layer_idx=self.layer_idx,
            )
            h = self._residual(h, c, mods[1])
        mod_mlp = mods[-1]
        x = self._pre(self.mlp_norm, h, mod_mlp)
        return self._residual(h, self.mlp(x), mod_mlp)
