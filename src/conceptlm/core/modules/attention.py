"""Self- and cross-attention on top of ``F.scaled_dot_product_attention`` (SDPA).

Shape conventions: ``B`` batch, ``T`` query length, ``S`` key length (past +
new keys for self-attention, memory length for cross-attention), ``D`` model
width, ``H`` query heads, ``Hkv`` key/value heads (grouped-query attention when
``Hkv < H``), ``d`` head dimension.

Masks:

* ``key_padding_mask``: bool ``(B, S)``, ``True`` = keep (attend to this key).
* ``attn_mask``: additive float ``(B or 1, 1 or H, T, S)`` added to the logits
  (``-inf`` entries are clamped to the dtype's most negative finite value).

Masked positions get the most negative finite value rather than ``-inf``, so a
query row whose keys are all masked (e.g. a left-padding query) yields finite,
meaningless values instead of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .rope import apply_rotary

__all__ = ["KVCache", "AttentionMask", "build_attention_mask", "SelfAttention", "CrossAttention"]


@dataclass
class AttentionMask:
    """A mask ready for SDPA: additive ``bias`` ``(B|1, H|1, T, S)`` or ``None``, plus ``is_causal``."""

    bias: torch.Tensor | None
    is_causal: bool


def build_attention_mask(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> AttentionMask:
    """Combine causal / key-padding / additive masks into one SDPA mask.

    Causal alignment is bottom-right: query ``i`` sees keys ``j <= i + (S - T)``,
    which is what cached decoding needs when ``T < S``. When no explicit mask is
    needed the result has ``bias=None`` (and ``is_causal=True`` for a square
    causal mask) so SDPA can use its fast kernels.

    Args:
        q_len: ``T``. k_len: ``S``.
        key_padding_mask: bool ``(B, S)``, True = keep.
        attn_mask: additive float ``(B|1, H|1, T, S)``.
    """
    need_causal = causal and q_len > 1
    if key_padding_mask is None and attn_mask is None:
        if not need_causal:
            return AttentionMask(None, False)
        if q_len == k_len:
            return AttentionMask(None, True)
    if device is None:
        device = (key_padding_mask if key_padding_mask is not None else attn_mask).device  # type: ignore[union-attr]
    keep: torch.Tensor | None = None
    if need_causal:
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len).view(1, 1, q_len, k_len)
    if key_padding_mask is not None:
        if key_padding_mask.shape[-1] != k_len:
            raise ValueError(f"key_padding_mask has {key_padding_mask.shape[-1]} keys, expected {k_len}")
        kpm = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        keep = kpm if keep is None else keep & kpm
    neg = torch.finfo(dtype).min
    if attn_mask is not None:
        bias = attn_mask.to(device=device, dtype=dtype).clamp(min=neg)
        if keep is not None:
            bias = torch.where(keep, bias, torch.tensor(neg, dtype=dtype, device=device))
    else:
        assert keep is not None
        bias = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, neg)
    return AttentionMask(bias, False)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, Hkv, S, d)`` -> ``(B, Hkv * n_rep, S, d)``; kv head ``g`` serves query heads
    ``g*n_rep ... (g+1)*n_rep-1``."""
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """SDPA with grouped-query support. ``q`` ``(B, H, T, d)``, ``k``/``v`` ``(B, Hkv, S, d)`` -> ``(B, H, T, d)``."""
    n_rep = q.shape[1] // k.shape[1]
    bias = mask.bias
    if n_rep > 1:
        if bias is None:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=mask.is_causal, enable_gqa=True
            )
        if q.shape[2] == 1 and bias.shape[1] == 1:
            # One query per head: fold the n_rep query heads of a group into the query axis.
            b, h, _, d = q.shape
            out = F.scaled_dot_product_attention(
                q.reshape(b, h // n_rep, n_rep, d), k, v, attn_mask=bias, dropout_p=dropout_p
            )
            return out.reshape(b, h, 1, d)
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=mask.is_causal)


class _HeadProjections(nn.Module):
    """The four projections shared by self- and cross-attention (names match HF Llama), split into heads."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None, head_dim: int | None,
                 d_kv_input: int, bias: bool, dropout: float) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_kv_input, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_kv_input, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)

    def _heads(self, proj: nn.Linear, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """``proj(x)`` ``(B, T, n*d)`` -> ``(B, n, T, d)``."""
        b, t, _ = x.shape
        return proj(x).view(b, t, n_heads, self.head_dim).transpose(1, 2)

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output ``(B, H, T, d)`` -> ``o_proj`` of the merged heads ``(B, T, D)``."""
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class SelfAttention(_HeadProjections):
    """Multi-head self-attention with GQA, RoPE, masks and an optional :class:`KVCache`.

    Parameter names (``q_proj``/``k_proj``/``v_proj``/``o_proj``) match HF Llama.

    Args:
        d_model: width ``D``.
        n_heads: query heads ``H``.
        n_kv_heads: key/value heads ``Hkv`` (default ``H``; must divide ``H``).
        head_dim: ``d`` (default ``D // H``).
        bias: biases on all four projections (HF ``attention_bias``).
        causal: causal masking (bottom-right aligned with a cache).
        dropout: attention-probability dropout (training only).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = False,
        causal: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, d_model, bias, dropout)
        self.causal = causal

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """Attend ``x`` ``(B, T, D)`` to itself (plus cached keys) -> ``(B, T, D)``.

        Args:
            rope: ``(cos, sin)`` each ``(B, T, d)`` from :class:`RotaryEmbedding`, or ``None`` (no RoPE).
            key_padding_mask: bool ``(B, S)`` over *all* keys (cached + new), True = keep.
            attn_mask: additive float ``(B|1, H|1, T, S)``.
            cache: keys/values of this call are appended under ``layer_idx``.
            mask: a prebuilt :class:`AttentionMask` (overrides the two masks; lets a decoder build it once).
        """
        t = x.shape[1]
        q = self._heads(self.q_proj, x, self.n_heads)
        k = self._heads(self.k_proj, x, self.n_kv_heads)
        v = self._heads(self.v_proj, x, self.n_kv_heads)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        if mask is None:
            mask = build_attention_mask(
                t, k.shape[2], causal=self.causal, key_padding_mask=key_padding_mask,
                attn_mask=attn_mask, dtype=q.dtype, device=q.device,
            )
        out = sdpa(q, k, v, mask, self.dropout if self.training else 0.0)
        return self._output(out)


class CrossAttention(_HeadProjections):
    """Multi-head attention from queries ``x`` to a memory tensor (no RoPE, never causal).

    The memory's K/V can be precomputed once with :meth:`project_memory` and
    passed as ``memory_kv``, or cached in ``KVCache.memory[layer_idx]`` by
    passing ``cache``: later calls with the same cache reuse them and ignore
    ``memory``.

    Args:
        d_model: query width ``D``.
        n_heads, n_kv_heads, head_dim: as in :class:`SelfAttention`.
        d_memory: memory width ``Dm`` (default ``D``).
        bias: biases on all projections.
        dropout: attention-probability dropout (training only).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        d_memory: int | None = None,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, d_memory or d_model, bias, dropout)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``memory`` ``(B, S, Dm)`` -> ``(k, v)`` each ``(B, Hkv, S, d)``."""
        return self._heads(self.k_proj, memory, self.n_kv_heads), self._heads(self.v_proj, memory, self.n_kv_heads)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        *,
        memory_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        """``x`` ``(B, T, D)`` attends to ``memory`` ``(B, S, Dm)`` -> ``(B, T, D)``.

        Args:
            memory_mask: bool ``(B, S)`` key padding mask over memory, True = keep.
            attn_mask: additive float ``(B|1, H|1, T, S)``.
            memory_kv: precomputed :meth:`project_memory` output (then ``memory`` may be ``None``).
            cache: if given, memory K/V are read from / stored into ``cache.memory[layer_idx]``.
        """
        if memory_kv is None and cache is not None:
            memory_kv = cache.memory.get(layer_idx)
        if memory_kv is None:
            if memory is None:
                raise ValueError("CrossAttention needs `memory` or precomputed `memory_kv`")
            memory_kv = self.project_memory(memory)
            if cache is not None:
                cache.memory[layer_idx] = memory_kv
        k, v = memory_kv
        q = self._heads(self.q_proj, x, self.n_heads)
        mask = build_attention_mask(
            x.shape[1], k.shape[2], causal=False, key_padding_mask=memory_mask, attn_mask=attn_mask,
            dtype=q.dtype, device=q.device,
        )
        out = sdpa(q, k, v, mask, self.dropout if self.training else 0.0)
        return self._output(out)
