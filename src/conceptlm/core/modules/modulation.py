"""AdaLN-style conditioning (DiT "AdaLN-zero") and sinusoidal timestep embeddings.

A conditioning vector ``c`` of shape ``(B, C)`` (one per sequence) or
``(B, T, C)`` (one per position) is mapped to a ``(shift, scale, gate)``
triple per sub-layer; a block then computes
``h = h + gate * sublayer(norm(h) * (1 + scale) + shift)``.
The projection is zero-initialised, so every gate starts at 0 and a freshly
built block is exactly the identity on its residual stream.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Modulation", "AdaLNModulation", "modulate", "timestep_embedding", "TimestepEmbedder"]


class Modulation(NamedTuple):
    """``shift``/``scale``/``gate`` for one sub-layer, each ``(B, 1, D)`` or ``(B, T, D)``."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift``; ``x`` ``(B, T, D)``, ``shift``/``scale`` broadcastable ``(B, 1|T, D)``."""
    return x * (1 + scale) + shift


class AdaLNModulation(nn.Module):
    """Map a conditioning vector to per-sub-layer :class:`Modulation` triples.

    ``SiLU -> Linear(C, 3 * n_sublayers * D)``, weights and bias zero-initialised.

    Args:
        d_model: width ``D`` of the modulated stream.
        d_cond: width ``C`` of the conditioning vector (default ``D``).
        n_sublayers: number of modulated sub-layers (2 for attn+mlp, 3 with cross-attention).
    """

    def __init__(self, d_model: int, d_cond: int | None = None, n_sublayers: int = 2) -> None:
        super().__init__()
        self.d_model = d_model
        self.n_sublayers = n_sublayers
        self.proj = nn.Linear(d_cond or d_model, 3 * n_sublayers * d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero the projection (AdaLN-zero)."""
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, cond: torch.Tensor) -> list[Modulation]:
        """``cond`` ``(B, C)`` or ``(B, T, C)`` -> ``n_sublayers`` triples of ``(B, 1|T, D)`` tensors."""
        if cond.dim() == 2:
            cond = cond.unsqueeze(1)
        chunks = self.proj(F.silu(cond)).chunk(3 * self.n_sublayers, dim=-1)
        return [Modulation(*chunks[3 * i : 3 * i + 3]) for i in range(self.n_sublayers)]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cos first then sin.

    ``t`` ``(B,)`` (or any shape ``(...)``) -> ``(..., dim)`` fp32 with
    ``emb[..., i] = cos(t * f_i)`` and ``emb[..., half + i] = sin(t * f_i)``,
    ``f_i = max_period ** (-i / half)``, ``half = dim // 2``; an odd ``dim`` gets
    a trailing zero column. At ``t = 0`` the first half is ones and the rest zeros.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32).unsqueeze(-1) * freqs
    emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Timestep ``(B,)`` -> conditioning vector ``(B, D)``: sinusoidal features then ``Linear-SiLU-Linear``.

    Args:
        d_out: output width ``D``.
        freq_dim: sinusoidal feature width.
        max_period: see :func:`timestep_embedding`.
    """

    def __init__(self, d_out: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d_out), nn.SiLU(), nn.Linear(d_out, d_out))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` ``(B,)`` -> ``(B, D)`` in the MLP's dtype."""
        emb = timestep_embedding(t, self.freq_dim, self.max_period)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))
