"""Rotary position embeddings (RoPE), HF-Llama convention.

The head dimension is split in two halves ``[x1, x2]`` and rotated as
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``; the
frequency of channel ``i`` (and ``i + d/2``) is ``theta ** (-2i / d)``. Weights
copied from an HF Llama checkpoint therefore give identical results.

Positions are explicit integers of shape ``(B, T)`` so that left padding and
packed sequences (positions restarting inside a row) work.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "rotate_half", "apply_rotary"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(..., d)`` -> ``(..., d)``: ``[x1, x2] -> [-x2, x1]`` (halves of the last dim)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, H, T, d)`` with ``cos``/``sin`` of shape ``(B, T, d)``."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Compute RoPE ``cos``/``sin`` tables for explicit positions.

    Args:
        head_dim: per-head dimension ``d`` (must be even).
        theta: RoPE base (10000 for Llama-2, 500000 for Llama-3, ...).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions``: integer ``(B, T)`` -> ``(cos, sin)``, each ``(B, T, d)`` in ``dtype``.

        The angles are computed in fp32 regardless of ``dtype``.
        """
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
