"""Cosine noise schedule (Nichol & Dhariwal 2021; reference ``squaredcos_cap_v2``): the LCM default (spec §6)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from conceptlm.lcm.diffusion.schedule import betas_from_alpha_bar

__all__ = ["cosine_betas"]


def cosine_betas(T: int, s: float = 0.008) -> Tensor:
    """Betas discretising ``ᾱ(u) = f(u)/f(0)``, ``f(u) = cos²((u + s)/(1 + s)·π/2)``, capped at 0.999 (the cap
    sets the last step, where f(1) = 0). float64 ``(T,)``."""
    if s < 0:
        raise ValueError(f"cosine offset s must be >= 0, got {s}")

    def f(u: Tensor) -> Tensor:
        return torch.cos((u + s) / (1.0 + s) * (math.pi / 2)) ** 2

    return betas_from_alpha_bar(f, T)
