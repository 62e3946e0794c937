"""Linear noise schedule (Ho et al. 2020; reference ``linear``)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_betas"]


def linear_betas(T: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas evenly spaced from ``beta_start`` to ``beta_end`` (both included). float64 ``(T,)``."""
    if T < 2:
        raise ValueError(f"need T >= 2 steps, got {T}")
    if not (0 < beta_start < 1 and 0 < beta_end < 1):
        raise ValueError(f"beta_start and beta_end must be in (0, 1), got {beta_start}, {beta_end}")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
