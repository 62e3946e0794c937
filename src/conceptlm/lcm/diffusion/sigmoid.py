"""The LCM paper's sigmoid noise schedule (spec §6): log-SNR ≈ ``δ − γ·logit(u)``, centred on δ with scale γ."""

from __future__ import annotations

import torch
from torch import Tensor

from conceptlm.lcm.diffusion.schedule import betas_from_alpha_bar

__all__ = ["sigmoid_betas"]

_EPS = 1e-32


def sigmoid_betas(T: int, scale: float, shift: float) -> Tensor:
    """Betas discretising ``ᾱ(u) = f(u)/f(0)``, ``f(u) = sigmoid(shift − scale·logit(u))`` with ``u`` clamped to
    ``[1e-32, 1 − 1e-32]`` as in the reference (in float64 the upper bound is 1, so f(1) = 0 and the last beta is
    the 0.999 cap). ``scale`` = γ (reference ``sigmoid_schedule_alpha``), ``shift`` = δ (``sigmoid_schedule_beta``).
    float64 ``(T,)``."""
    if scale <= 0:
        raise ValueError(f"sigmoid scale must be > 0, got {scale}")

    def f(u: Tensor) -> Tensor:
        return torch.sigmoid(shift - scale * torch.logit(u.clamp(_EPS, 1.0 - _EPS)))

    return betas_from_alpha_bar(f, T)
