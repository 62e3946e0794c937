"""Learning-rate schedules: linear warmup, then cosine / linear decay to ``min_lr_ratio`` or constant."""

from __future__ import annotations

import math

import torch

__all__ = ["lr_multiplier", "build_scheduler"]


def lr_multiplier(step: int, *, kind: str, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier for optimizer step ``step`` (0-based: the multiplier used by the step-th update).

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first update already has a non-zero LR).
    Decay over the remaining ``D = max_steps - warmup_steps`` updates with progress ``p = (step - warmup_steps) / D``
    (0 at the first decay update, ``(D - 1) / D`` at the last one, as in Hugging Face's schedulers):
    cosine ``r + (1 - r) * (1 + cos(pi p)) / 2``; linear ``1 - (1 - r) p``; constant ``1``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    p = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if kind == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * p
    raise ValueError(f"unknown schedule kind {kind!r} (cosine, linear, constant)")


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, warmup_steps: int, max_steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_multiplier`; its state_dict saves/resumes with the step count."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(s, kind=kind, warmup_steps=warmup_steps, max_steps=max_steps,
                                min_lr_ratio=min_lr_ratio),
    )
