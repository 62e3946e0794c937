"""Quadratic noise schedule (reference ``scaled_linear`` with exponent 2; the paper's Quadratic-1/-2, spec §6)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["quadratic_betas"]


def quadratic_betas(T: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas evenly spaced in sqrt space, squared: ``β_i = (sqrt(β_start) + i/(T−1)·(sqrt(β_end) −
    sqrt(β_start)))²``, ``i = 0..T−1``. float64 ``(T,)``."""
    if T < 2:
        raise ValueError(f"need T >= 2 steps, got {T}")
    if not (0 < beta_start < 1 and 0 < beta_end < 1):
        raise ValueError(f"beta_start and beta_end must be in (0, 1), got {beta_start}, {beta_end}")
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
