"""The contract between a method and the one training loop.

A method supplies a :class:`TrainUnit`: an ``nn.Module`` whose ``forward(batch)`` returns, for each named loss part,
the SUM of that part over its items (tokens for an LM loss, examples for an embedding loss), and whose
``counts(batch)`` says how many items each part sums over — computed from the batch alone, before any forward.

The trainer adds the counts over all micro-batches of an optimizer step and over all ranks, and back-propagates
``sum_k weight_k * part_k / global_count_k``. The gradient is therefore that of the global mean of every part, no
matter how the global batch is split into micro-batches and ranks (micro 8 x accum 1 == micro 2 x accum 4 ==
2 ranks x micro 4).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["TrainUnit", "TOKENS_KEY"]

TOKENS_KEY = "tokens"
"""Optional key of ``counts``: real tokens processed (for throughput); not a loss part."""


class TrainUnit(nn.Module):
    """Base class of method units. Subclasses set ``loss_weights`` and implement ``counts`` and ``forward``."""

    loss_weights: dict[str, float]

    def counts(self, batch: Any) -> dict[str, int]:
        """Items each loss part sums over in ``batch`` (plus optionally ``tokens``). No forward pass."""
        raise NotImplementedError

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Return ``{part: sum over its items}`` as scalar tensors carrying gradients."""
        raise NotImplementedError

    def begin_step(self, step: int) -> None:
        """Called once at the start of every optimizer step (e.g. to draw a seeded per-step decision)."""

    @property
    def hf_model(self) -> nn.Module:
        """The Hugging Face model this unit trains (saved with ``save_pretrained`` in checkpoints)."""
        return self.model  # type: ignore[attr-defined]
