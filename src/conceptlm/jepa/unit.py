"""The LLM-JEPA training unit for the one loop (arXiv 2509.14252, eq. 3).

Parts returned to the trainer: ``lm`` = summed next-token CE over LM targets (normalised by the global target
count) and ``jepa`` = summed per-example distance d(Pred(Enc(Text_i)), Enc(Code_i)) (normalised by the global
example count). Weights: γ and λ. With λ = 0 the JEPA views are never built or run, so the unit computes exactly
the SFT loss.

With ``jepa.anti_collapse=vicreg`` two more parts: ``vicreg_var`` and ``vicreg_cov`` = B · (the VICReg term of
Enc(Text) + that of Enc(Code)) per micro-batch of B ≥ 2 examples, counted B, weighted ``vicreg_var_weight`` and
``vicreg_cov_weight`` (the global value is the B-weighted mean of per-micro-batch statistics). With ``none`` the
parts, weights and loss are exactly the paper objective's.

Evaluation metrics (whenever the JEPA views run in evaluation, i.e. λ > 0): the collapse statistics of
:func:`conceptlm.jepa.collapse.batch_stats` — the JEPA distance on mismatched pairs (``jepa_mismatch``, next to the
matched ``jepa`` part), matched/mismatched cosine, and the per-dimension variance and effective rank of Enc(Text)
and Enc(Code) — as ``(value · B, B)`` pairs, so the logged value is the B-weighted mean over eval batches and ranks.
"""

from __future__ import annotations

import torch

from conceptlm.core.rng import derived_generator
from conceptlm.core.unit import THROUGHPUT_KEY
from conceptlm.jepa.collapse import BATCH_STAT_NAMES, batch_stats
from conceptlm.jepa.config import JepaSection
from conceptlm.jepa.forward import run_jepa_batch
from conceptlm.jepa.losses import jepa_distance, vicreg_covariance, vicreg_variance
from conceptlm.lm.unit import HFModelUnit

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
        if cfg.anti_collapse == "vicreg":
            self.loss_weights.update(vicreg_var=cfg.vicreg_var_weight, vicreg_cov=cfg.vicreg_cov_weight)
        self.metric_names = BATCH_STAT_NAMES
        self._step_active = True

    def begin_step(self, step: int) -> None:
        self._step_active = jepa_step_active(self.seed, step, self.cfg.jepa_ratio)

    @property
    def jepa_active(self) -> bool:
        """JEPA views are run: λ > 0 and (evaluation, or a training step kept by the dropout draw)."""
        return self.cfg.lam > 0 and (self._step_active or not self.training)

    @property
    def vicreg(self) -> bool:
        return self.cfg.anti_collapse == "vicreg"

    def counts(self, batch) -> dict[str, int]:
        n_jepa = batch.num_examples if self.jepa_active else 0
        c = {"lm": batch.num_lm_targets, "jepa": n_jepa, THROUGHPUT_KEY: batch.lm.real_tokens}
        if self.vicreg:
            n_reg = n_jepa if n_jepa >= 2 else 0  # batch statistics need two examples
            c.update(vicreg_var=n_reg, vicreg_cov=n_reg)
        return c

    def _distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return jepa_distance(pred, target, self.cfg.metric, temperature=self.cfg.temperature,
                             gather_negatives=self.cfg.gather_negatives)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        out = run_jepa_batch(self.model, batch, jepa_active=self.jepa_active)
        parts = {"lm": out.lm_loss_sum}
        if out.jepa_active:
            parts["jepa"] = self._distance(out.pred, out.target).sum()
            b = out.enc_text.shape[0]
            if self.vicreg and b >= 2:
                g = self.cfg.vicreg_gamma
                parts["vicreg_var"] = b * (vicreg_variance(out.enc_text, gamma=g)
                                           + vicreg_variance(out.enc_code, gamma=g))
                parts["vicreg_cov"] = b * (vicreg_covariance(out.enc_text) + vicreg_covariance(out.enc_code))
            if not self.training:
                parts.update(batch_stats(out.pred, out.target, out.enc_text, out.enc_code, self._distance))
        return parts
