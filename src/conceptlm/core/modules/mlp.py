"""Feed-forward sub-layers.

All MLPs map ``(..., D)`` -> ``(..., D)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLU", "GeluMLP", "build_mlp"]


class SwiGLU(nn.Module):
    """Gated SiLU MLP (Llama): ``down(silu(gate(x)) * up(x))``.

    Parameter names (``gate_proj``/``up_proj``/``down_proj``) match HF ``LlamaMLP``.

    Args:
        d_model: input/output width ``D``.
        d_ff: hidden width ``F``.
        bias: add biases to all three projections.
    """

    def __init__(self, d_model: int, d_ff: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` -> ``(..., D)``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """Plain two-layer MLP: ``fc2(gelu(fc1(x)))``.

    Args:
        d_model: input/output width ``D``.
        d_ff: hidden width ``F``.
        bias: add biases to both projections.
        approximate: ``"none"`` or ``"tanh"`` (passed to ``F.gelu``).
    """

    def __init__(self, d_model: int, d_ff: int, bias: bool = True, approximate: str = "none") -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` -> ``(..., D)``."""
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def build_mlp(kind: str, d_model: int, d_ff: int, bias: bool = False) -> nn.Module:
    """Build an MLP by name: ``"swiglu"`` -> :class:`SwiGLU`, ``"gelu"`` -> :class:`GeluMLP`."""
    if kind == "swiglu":
        return SwiGLU(d_model, d_ff, bias=bias)
    if kind == "gelu":
        return GeluMLP(d_model, d_ff, bias=bias)
    if kind == "gelu_tanh":
        return GeluMLP(d_model, d_ff, bias=bias, approximate="tanh")
    raise ValueError(f"unknown mlp kind {kind!r} (expected 'swiglu', 'gelu' or 'gelu_tanh')")
