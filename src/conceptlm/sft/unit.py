"""The SFT unit: summed next-token cross-entropy over target tokens."""

from __future__ import annotations

import torch

from conceptlm.core.hf import causal_lm_loss_sum
from conceptlm.core.unit import THROUGHPUT_KEY
from conceptlm.lm.unit import HFModelUnit

__all__ = ["SFTUnit"]


class SFTUnit(HFModelUnit):
    """``forward(batch) -> {"lm": sum of CE over shifted targets}``; ``counts -> {"lm": #targets, "tokens"}``.

    The trainer divides by the global target count, so the loss is the token-weighted mean over the whole global
    batch (the same as Hugging Face's ``num_items_in_batch`` normalisation).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.loss_weights = {"lm": 1.0}

    def counts(self, batch: dict) -> dict[str, int]:
        return {"lm": int((batch["labels"][:, 1:] != -100).sum()), THROUGHPUT_KEY: int(batch["attention_mask"].sum())}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        loss_sum, _ = causal_lm_loss_sum(self.model, batch["input_ids"], batch["labels"],
                                         attention_mask=batch["attention_mask"])
        return {"lm": loss_sum}
