"""Training timesteps and per-position loss weights of the diffusion LCMs (LCM paper §2.3.2; the reference's step
sampler).

- Timesteps: uniform over ``0..T−1`` (the recipes), or ``beta``: step ``k−1`` with probability ∝ the Beta(a, b)
  density at ``k/T``, ``k = 1..T`` (a = 0.8 < 1 favours small, low-noise steps).
- Weights: ``none`` (all ones) or ``clamp_snr``: ``γ_t = clamp(SNR_t, min_snr, max_snr)`` (paper Eq. 17), rescaled so
  the weights of the valid positions sum to their number (the loss keeps its scale against ω = 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from conceptlm.lcm.diffusion.schedule import NoiseSchedule

__all__ = ["step_probabilities", "sample_timesteps", "loss_weights", "STEP_SAMPLINGS", "WEIGHTINGS"]

STEP_SAMPLINGS = ("uniform", "beta")
WEIGHTINGS = ("none", "clamp_snr")


def step_probabilities(T: int, kind: str = "uniform", a: float = 0.8, b: float = 1.0) -> Tensor:
    """Probability of each training step ``0..T−1``: float64 ``(T,)`` summing to 1. ``beta``: ∝
    ``u^(a−1)·(1 − u)^(b−1) / B(a, b)`` at ``u = k/T`` for step ``k − 1``."""
    if T < 1:
        raise ValueError(f"need T >= 1, got {T}")
    if kind == "uniform":
        return torch.full((T,), 1.0 / T, dtype=torch.float64)
    if kind != "beta":
        raise ValueError(f"unknown step sampling {kind!r}; choose one of {STEP_SAMPLINGS}")
    if not (a > 0 and b > 0):
        raise ValueError(f"Beta parameters must be > 0, got a={a}, b={b}")
    if b < 1:
        raise ValueError(f"Beta(a, b) with b = {b} < 1 has an infinite density at u = 1 (the last step)")
    u = torch.arange(1, T + 1, dtype=torch.float64) / T
    beta_fn = math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    density = u.pow(a - 1) * (1.0 - u).pow(b - 1) / beta_fn  # 0^0 = 1 at u = 1 when b = 1
    return density / density.sum()


def sample_timesteps(shape: Sequence[int] | torch.Size, T: int, generator: torch.Generator | None = None,
                     kind: str = "uniform", a: float = 0.8, b: float = 1.0,
                     device: torch.device | str | None = None) -> Tensor:
    """Independent training timesteps: LongTensor of ``shape`` with values in ``0..T−1``, drawn with ``generator``
    (on its device) from :func:`step_probabilities`, then moved to ``device`` when given."""
    shape = tuple(int(s) for s in shape)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if kind == "uniform":
        if T < 1:
            raise ValueError(f"need T >= 1, got {T}")
        out = torch.randint(0, T, shape, generator=generator, device=gen_device)
    else:
        probs = step_probabilities(T, kind, a, b).to(device=gen_device, dtype=torch.float32)
        n = math.prod(shape)
        if n == 0:
            out = torch.zeros(shape, dtype=torch.long, device=gen_device)
        else:
            out = torch.multinomial(probs, n, replacement=True, generator=generator).reshape(shape)
    return out if device is None else out.to(device)


def loss_weights(schedule: NoiseSchedule, t: Tensor, valid: Tensor, kind: str = "none", min_snr: float = 0.0,
                 max_snr: float = 5.0) -> Tensor:
    """Per-position loss weights: float32 of ``t``'s shape (...) on its device.

    ``none``: ones. ``clamp_snr``: ``γ = clamp(SNR_t, min_snr, max_snr)`` at the ``valid`` (mask of ``t``'s shape,
    nonzero = valid) positions, 0 elsewhere, times ``valid.sum() / Σγ`` so the valid weights sum to the number of
    valid positions.
    If every valid γ is 0 (e.g. all drawn steps are the pure-noise step and ``min_snr = 0``), all weights are 0.
    The reference sums over every position, padding included; here padding neither counts nor takes weight.
    """
    if kind == "none":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if kind != "clamp_snr":
        raise ValueError(f"unknown loss weighting {kind!r}; choose one of {WEIGHTINGS}")
    if valid.shape != t.shape:
        raise ValueError(f"valid must be a mask of t's shape {tuple(t.shape)}, got {tuple(valid.shape)}")
    if not 0 <= min_snr <= max_snr:
        raise ValueError(f"need 0 <= min_snr <= max_snr, got {min_snr}, {max_snr}")
    valid = valid.to(device=t.device, dtype=torch.bool)  # nonzero = valid
    gamma = schedule.snr(t).clamp(min=min_snr, max=max_snr) * valid
    total = gamma.sum()
    n = valid.sum()
    return torch.where(total > 0, gamma * (n / total.clamp_min(torch.finfo(torch.float32).tiny)),
                       torch.zeros_like(gamma))
