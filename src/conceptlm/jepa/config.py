"""LLM-JEPA config: the shared sections plus ``jepa`` (arXiv 2509.14252, eq. 3: L = γ·L_LM + λ·d(Pred(Enc(Text)),
Enc(Code))), whose ``objective`` picks the two-view objective or Semantic Tube Prediction (arXiv 2602.22617; options
in ``jepa.stp``, see :mod:`conceptlm.jepa.stp`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from conceptlm.core.errors import ConfigError
from conceptlm.lm.config import LMRunConfig

__all__ = ["JepaSection", "StpSection", "JepaConfig", "ViewConfig", "OBJECTIVES", "DEFAULT_LAM", "PREDICTOR_POSITIONS",
           "TEXT_VIEWS", "CODE_VIEWS", "DIRECTIONS"]

OBJECTIVES = ("two_view", "stp")
DEFAULT_LAM = {"two_view": 1.0, "stp": 0.02}
"""λ when ``jepa.lam`` is not set: the LLM-JEPA paper's 1.0; for STP the reference driver's 0.02 (``run_stp.py``;
``stp.py``'s argparse default is 0.1)."""
PREDICTOR_POSITIONS = ("after", "before")
TEXT_VIEWS = ("context", "user_only")
CODE_VIEWS = ("with_system", "alone")
DIRECTIONS = ("text_to_code", "code_to_text")


@dataclass(kw_only=True)
class StpSection:
    """Semantic Tube Prediction options (``jepa.objective: stp``); defaults are the reference's (``stp.py``).

    The trajectory of an example is the sequence of its last-layer hidden states over ``span_scope``'s token
    pieces; a span [s, t) of it is drawn per example and step, and the displacement over the span is predicted from
    the displacement over the rest (see :func:`conceptlm.jepa.stp.stp_distance`).
    """

    variant: Literal["random_span", "two_view", "curvature"] = "random_span"
    """``random_span``: STP (reference ``--linear=random_span``); ``two_view``: the displacement over the user turn
    predicts the one over the assistant turn (the paper's "Two View" ablation, reference ``--linear=e2e``);
    ``curvature``: mean angle between consecutive hidden-state increments (the "Curvature" ablation,
    ``--linear=curvature``)."""
    span_scope: Literal["content", "e2e", "all", "all_e2e"] = "content"
    """Chat data: ``content`` = the last user content + the last assistant content, the template tokens between them
    skipped (reference default); ``e2e`` = one piece from the user content to the assistant content's end, template
    tokens included (``--random_span_e2e``); ``all`` = from the sequence start through the user content, then the
    assistant content (``--random_span_all``); ``all_e2e`` = both. Plain text: every scope is the whole block."""
    span_draw: Literal["start_end", "uniform", "two_points"] = "start_end"
    """``start_end``: s uniform, then t uniform in (s, N] (reference default); ``uniform``: every span [s, t) equally
    likely (``--random_span_uniform``); ``two_points``: s, t = sorted pair of uniform draws
    (``--random_span_draw_both``). The whole trajectory [0, N) is never a span."""
    span_zero_start: bool = False
    """Spans always start at 0 (``--random_span_zero``)."""
    span_max_length: int | None = None
    """Longest span in tokens (``--random_span_max_length``; None = unbounded)."""
    spans_per_example: int = 1
    """Spans drawn per example and step (``--random_span_times``)."""
    length_weight: Literal["none", "cosine_like", "jaccard_like"] = "none"
    """Weight of a span of length ℓ in a trajectory of N (``--length_adjustment``): ``cosine_like`` =
    2ℓ(N−ℓ)/(ℓ² + (N−ℓ)²), ``jaccard_like`` = 1 − |N − 2ℓ|/N; the loss is the weighted mean."""
    linear_predictor: bool = False
    """A trainable linear map P (D × D, no bias, Xavier-uniform init) applied to the rest displacement
    (``--linear_predictor``); off = identity."""
    layer: int = -1
    """Hidden states the trajectory is read from: -1 = the final normed state (the LM head's input, reference
    default ``--random_span_layer -1``), 0 = the embeddings, i = after decoder layer i (Hugging Face's
    ``hidden_states[i]``)."""
    lam_warmup: bool = False
    """λ grows linearly from ``min_lam`` at step 0 to ``jepa.lam`` at the last step (``--lbd_warmup``)."""
    min_lam: float = 0.0
    """Start of the λ warm-up (``--min_lbd``)."""

    def validate(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(msg, field=f"jepa.stp.{name}")

        check(self.span_max_length is None or self.span_max_length >= 1, "span_max_length", "must be >= 1 or null")
        check(self.spans_per_example >= 1, "spans_per_example", "must be >= 1")
        check(self.min_lam >= 0, "min_lam", "must be >= 0")
        check(self.variant != "two_view" or self.span_scope in ("content", "all"), "span_scope",
              "variant two_view needs two pieces (user, assistant): use content or all")


@dataclass(kw_only=True)
class JepaSection:
    objective: Literal["two_view", "stp"] = "two_view"
    """``two_view``: LLM-JEPA, d(Pred(Enc(Text)), Enc(Code)) between two views of a chat record (arXiv
    2509.14252); ``stp``: Semantic Tube Prediction (arXiv 2602.22617), one forward pass on any data (chat JSONL or
    plain text), options in ``jepa.stp``."""
    lam: float | None = None
    """λ, weight of the JEPA / STP term (0 = plain SFT, bit for bit); unset = ``DEFAULT_LAM[objective]`` (1.0 for
    two_view, 0.02 for stp)."""
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
    stp: StpSection = field(default_factory=StpSection)
    """Semantic Tube Prediction options (used with ``objective: stp``)."""

    def __post_init__(self) -> None:
        if self.lam is None and self.objective in DEFAULT_LAM:
            self.lam = DEFAULT_LAM[self.objective]

    def validate(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(msg, field=f"jepa.{name}")

        check(self.objective in OBJECTIVES, "objective", "must be two_view or stp")
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
        stp = self.objective == "stp"
        check(not stp or self.metric in ("cosine", "l2", "mse"), "metric",
              "stp compares one displacement pair per span: use cosine, l2 or mse (infonce is two_view only)")
        check(not stp or self.anti_collapse == "none", "anti_collapse", "vicreg applies to two_view only")
        check(not (stp and self.stp.lam_warmup) or self.stp.min_lam <= self.lam, "stp.min_lam",
              "must be <= jepa.lam (the warm-up ends at jepa.lam)")
        self.stp.validate()


@dataclass(kw_only=True)
class JepaConfig(LMRunConfig):
    jepa: JepaSection = field(default_factory=JepaSection)


@dataclass(frozen=True)
class ViewConfig:
    """How to build the views (:func:`conceptlm.jepa.views.build_views`); the ``jepa`` section of a config maps
    onto this (:func:`conceptlm.jepa.recipe.view_config`).

    Attributes:
        num_predictors: k ≥ 0 predictor tokens appended to (or prepended to) the predicting view's content.
        predictor_position: ``after`` (``content<|predictor_k|>…<|predictor_1|>``, Enc = last predictor) or
            ``before`` (``<|predictor_1|>…<|predictor_k|>content``, Enc = last content token).
        text_view: ``context`` (the LM sequence's own context: system prompt and earlier turns, then the user turn)
            or ``user_only`` (the user turn rendered alone, as the reference code does).
        direction: ``text_to_code`` (Pred(Enc(Text)) ≈ Enc(Code); predictors go on Text) or ``code_to_text``
            (predictors go on Code and it predicts Enc(Text)).
        code_view: ``with_system`` (for templates that give every conversation a system turn, the Code view
            carries the LM sequence's system turn, shared in packed mode; see :mod:`conceptlm.jepa.views`) or ``alone``
            (the assistant turn rendered alone, the reference code).
        label_mode: LM targets, passed to ``tokenize_chat``: ``assistant`` or ``all``.
        enc_index_override: if set (a negative int), Enc of both views is read at ``len(view) + override``
            (the reference's ``--last_token``) instead of the derived content index.
    """

    num_predictors: int = 0
    predictor_position: str = "after"
    text_view: str = "context"
    direction: str = "text_to_code"
    label_mode: str = "assistant"
    code_view: str = "with_system"
    enc_index_override: int | None = None

    def __post_init__(self) -> None:
        from conceptlm.data.chat import LABEL_MODES  # here, not at the top: this module stays free of torch

        if not isinstance(self.num_predictors, int) or self.num_predictors < 0:
            raise ValueError(f"num_predictors must be an integer >= 0, got {self.num_predictors!r}")
        for name, value, allowed in (("predictor_position", self.predictor_position, PREDICTOR_POSITIONS),
                                     ("text_view", self.text_view, TEXT_VIEWS),
                                     ("direction", self.direction, DIRECTIONS),
                                     ("code_view", self.code_view, CODE_VIEWS),
                                     ("label_mode", self.label_mode, LABEL_MODES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        o = self.enc_index_override
        if o is not None and (not isinstance(o, int) or o >= 0):
            raise ValueError(f"enc_index_override must be a negative integer (-1 = last token) or None, got {o!r}")
