"""Normalisation layers.

All layers take ``x`` of shape ``(..., D)`` and return the same shape and dtype.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm", "build_norm"]


class RMSNorm(nn.Module):
    """Root-mean-square norm, numerically identical to HF ``LlamaRMSNorm``.

    ``y = weight * (x / sqrt(mean(x**2, -1) + eps))``; the statistic and the
    normalisation are computed in fp32, the result is cast back to the input
    dtype *before* the (possibly low-precision) weight multiply, like HF Llama.

    Args:
        dim: size ``D`` of the last dimension.
        eps: added to the mean square.
        elementwise_affine: learn a per-channel ``weight`` (initialised to 1).
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., D)`` -> ``(..., D)`` (same dtype)."""
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = h.to(dtype)
        return h if self.weight is None else self.weight * h

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def build_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """Build a norm by name: ``"rms"`` -> :class:`RMSNorm`, ``"layer"`` -> ``nn.LayerNorm``."""
    if kind in ("rms", "rmsnorm"):
        return RMSNorm(dim, eps)
    if kind in ("layer", "layernorm"):
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm kind {kind!r} (expected 'rms' or 'layer')")
