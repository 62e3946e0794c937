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
        check(self.enc_index_override is None or self.enc_index_override < 0, "enc_index_override",
              "must be a negative integer (-1 = last token) or null")


@dataclass(kw_only=True)
class JepaConfig(LMRunConfig):
    jepa: JepaSection = field(default_factory=JepaSection)
