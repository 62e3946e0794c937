"""The LLM-JEPA training unit for the one loop (arXiv 2509.14252, eq. 3).

Parts returned to the trainer: ``lm`` = summed next-token CE over LM targets (normalised by the global target
count) and ``jepa`` = summed per-example distance d(Pred(Enc(Text_i)), Enc(Code_i)) (normalised by the global
example count). Weights: γ and λ. With λ = 0 the JEPA views are never built or run, so the unit computes exactly
the SFT loss.
"""

from __future__ import annotations

import torch

from conceptlm.core.rng import derived_generator
from conceptlm.core.unit import TOKENS_KEY
from conceptlm.lm.unit import HFModelUnit
from conceptlm.jepa.config import JepaSection
from conceptlm.jepa.forward import run_jepa_batch
from conceptlm.jepa.losses import jepa_distance

__all__ = ["JepaUnit", "jepa_step_active"]


def jepa_step_active(seed: int, step: int, ratio: float) -> bool:
    """Whether optimizer step ``step`` uses the JEPA loss (JEPA-loss dropout with keep probability ``ratio``).

    A dedicated generator seeded from (seed, step): independent of every other RNG stream, identical on all ranks,
    and a resumed run draws exactly what the uninterrupted one drew.
    """
    if ratio >= 1.0:
        return True
    if ratio <= 0.0:
        return False
    g = derived_generator("jepa-ratio", seed, step)
    return bool(torch.rand((), generator=g).item() < ratio)


class JepaUnit(HFModelUnit):
    """LM loss + λ·JEPA loss on SeparateBatch / PackedBatch batches.

    Args:
        model: HF causal LM (or PeftModel) with the predictor tokens in its vocabulary.
        cfg: the ``jepa`` config section.
        seed: ``train.seed`` (for the per-step JEPA-loss dropout draw).
    """

    def __init__(self, model: torch.nn.Module, cfg: JepaSection, *, seed: int = 0):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.seed = seed
        self.loss_weights = {"lm": cfg.gamma, "jepa": cfg.lam}
        self._step_active = True

    def begin_step(self, step: int) -> None:
        self._step_active = jepa_step_active(self.seed, step, self.cfg.jepa_ratio)

    @property
    def jepa_active(self) -> bool:
        """JEPA views are run: λ > 0 and (evaluation, or a training step kept by the dropout draw)."""
        return self.cfg.lam > 0 and (self._step_active or not self.training)

    def counts(self, batch) -> dict[str, int]:
        return {"lm": batch.num_lm_targets, "jepa": batch.num_examples if self.jepa_active else 0,
                TOKENS_KEY: batch.lm.real_tokens}

    def forward(self, batch) -> dict[str, torch.Tensor]:
        out = run_jepa_batch(self.model, batch, jepa_active=self.jepa_active)
        parts = {"lm": out.lm_loss_sum}
        if out.jepa_active:
            d = jepa_distance(out.pred, out.target, self.cfg.metric, temperature=self.cfg.temperature,
                              gather_negatives=self.cfg.gather_negatives)
            parts["jepa"] = d.sum()
        return parts
