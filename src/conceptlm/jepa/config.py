"""LLM-JEPA config: the shared sections plus ``jepa`` (arXiv 2509.14252, eq. 3: L = γ·L_LM + λ·d(Pred(Enc(Text)),
Enc(Code)))."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from conceptlm.lm.config import LMRunConfig
from conceptlm.core.errors import ConfigError

__all__ = ["JepaSection", "JepaConfig"]


@dataclass(kw_only=True)
class JepaSection:
    lam: float = 1.0
    """λ, weight of the JEPA term (0 = plain SFT, bit for bit)."""
    gamma: float = 1.0
    """γ, weight of the LM term."""
    metric: Literal["cosine", "l2", "mse", "infonce"] = "cosine"
    temperature: float = 0.07
    """InfoNCE temperature τ."""
    gather_negatives: bool = False
    """InfoNCE: use the other ranks' Code embeddings as extra negatives (all_gather with gradient)."""
    num_predictors: int = 1
    """k ≥ 0 predictor tokens <|predictor_i|> on the predicting view (tied weights: the LM itself predicts)."""
    predictor_position: Literal["after", "before"] = "after"
    text_view: Literal["context", "user_only"] = "context"
    """``context``: the user turn with its system prompt exactly as in the LM sequence (packed mode then shares the
    LM tokens and costs only k extra tokens); ``user_only``: the user turn alone (the reference code)."""
    direction: Literal["text_to_code", "code_to_text"] = "text_to_code"
    code_view: Literal["with_system", "alone"] = "with_system"
    """``with_system``: for chat templates that give every conversation a system turn (SmolLM2, Qwen2.5,
    Llama-3.1), the Code view carries the LM sequence's own system turn instead of the template's default (shared
    with the LM tokens in packed mode); other templates render the assistant turn alone. ``alone``: always the
    assistant turn alone (the reference code)."""
    mode: Literal["packed", "separate"] = "packed"
    """``packed``: one forward per example with a tree attention mask; ``separate``: LM, Text and Code as
    independent sequences. Identical results."""
    jepa_ratio: float = 1.0
    """Probability that an optimizer step uses the JEPA loss (paper: 1 − LD). Drawn per step from a generator
    seeded by (train.seed, step): reproducible, identical on every rank. Skipped steps run the LM forward only."""
    anti_collapse: Literal["none", "vicreg"] = "none"
    """A regularizer against representation collapse of Enc (not in the paper; ``none`` = the paper's objective,
    bit for bit). ``vicreg`` adds, per micro-batch of B ≥ 2 examples, VICReg's variance hinge and covariance penalty
    (arXiv 2105.04906) on BOTH Enc(Text) (with the predictors) and Enc(Code):

        L += vicreg_var_weight · [v(Enc(Text)) + v(Enc(Code))] + vicreg_cov_weight · [c(Enc(Text)) + c(Enc(Code))]

    with v = mean over dimensions of max(0, vicreg_gamma − std over the batch) and c = (1/D)·Σ of squared off-diagonal
    batch covariances. What it changes vs the paper: the JEPA term stays the paper's d(Pred(Enc(Text)), Enc(Code))
    (the invariance term), but Enc is now also pushed to spread every dimension across examples and to decorrelate
    dimensions, so a constant Enc no longer minimises the loss. Enc is the LM head's input, so the regularizer also
    acts on the LM's last hidden state at those positions. The statistics are per micro-batch (not gathered over
    ranks or accumulation steps), so their value depends on ``train.micro_batch_size``; the logged parts
    ``vicreg_var`` / ``vicreg_cov`` are the B-weighted means of the per-batch values. Steps without the JEPA term
    (``jepa_ratio``) skip it too."""
    vicreg_var_weight: float = 1.0
    """Weight of the variance hinge (VICReg's μ/λ = 25/25)."""
    vicreg_cov_weight: float = 0.04
    """Weight of the covariance penalty (VICReg's ν/λ = 1/25)."""
    vicreg_gamma: float = 1.0
    """Target standard deviation γ of every Enc dimension across the batch."""
    enc_index_override: int | None = None
    """Read Enc at ``len(view) + override`` (a negative int, the reference's ``--last_token``) instead of the
    view's last content/predictor token derived from the tokenization."""

    def validate(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(msg, field=f"jepa.{name}")

        check(self.lam >= 0, "lam", "must be >= 0")
        check(self.gamma >= 0, "gamma", "must be >= 0")
        check(self.lam > 0 or self.gamma > 0, "gamma", "lam and gamma cannot both be 0")
        check(self.temperature > 0, "temperature", "must be > 0")
        check(0 <= self.num_predictors <= 64, "num_predictors", "must be in [0, 64]")
        check(0.0 <= self.jepa_ratio <= 1.0, "jepa_ratio", "must be in [0, 1]")
        check(self.anti_collapse in ("none", "vicreg"), "anti_collapse", "must be none or vicreg")
        check(self.vicreg_var_weight >= 0, "vicreg_var_weight", "must be >= 0")
        check(self.vicreg_cov_weight >= 0, "vicreg_cov_weight", "must be >= 0")
        check(self.vicreg_gamma > 0, "vicreg_gamma", "must be > 0")
        check(self.anti_collapse == "none" or self.lam > 0, "anti_collapse",
              "needs jepa.lam > 0 (with lam = 0 the JEPA views are not run)")
        check(self.enc_index_override is None or self.enc_index_override < 0, "enc_index_override",
              "must be a negative integer (-1 = last token) or null")


@dataclass(kw_only=True)
class JepaConfig(LMRunConfig):
    jepa: JepaSection = field(default_factory=JepaSection)
