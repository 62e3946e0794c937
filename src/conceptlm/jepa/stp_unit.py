"""The Semantic Tube Prediction unit for the one loop, and the STP forward shared with ``JepaTrainer``.

One forward pass per batch: the LM rows run once; the LM loss is read from the final hidden states exactly as
SFT computes it (:func:`conceptlm.core.hf.causal_lm_loss_sum`'s steps), and the STP term from the hidden states of
``jepa.stp.layer`` (:mod:`conceptlm.jepa.stp`). Parts returned to the trainer:

* ``lm``: summed next-token CE over the LM targets (divided by the global target count), weight γ;
* ``stp``: Σ_i w_i · d(P(rest_i), span_i) over the step's spans (``random_span``, ``two_view``; divided by the
  global Σ w_i) or Σ_i κ_i over examples (``curvature``; divided by their number), weight λ (or the λ warm-up of
  ``jepa.stp.lam_warmup``).

With λ = 0 no STP target is drawn and the forward is :func:`~conceptlm.core.hf.causal_lm_loss_sum` on the LM rows:
exactly the NTP step. ``jepa_ratio`` < 1 skips the STP term on the steps its seeded draw drops (the forward is
then the NTP one as well).

Evaluation metrics (STP on, variants ``random_span`` / ``two_view``): the collapse statistics of
:func:`conceptlm.jepa.collapse.batch_stats` on the (rest, span) displacement pairs of the eval batch, as
``(value · M, M)`` over its M spans: ``stp_mismatch`` (the STP distance with the spans rolled by one, i.e. paired
with another example's rest) next to the matched ``stp`` part, ``cos_matched`` / ``cos_mismatched``, and the
per-dimension variance and effective rank of the rest and span displacements (``rest_var``, ``span_var``,
``rest_erank``, ``span_erank``). ``stp_mismatch ≈ stp`` means the displacements point one common way for every
example (the tube is satisfied by collapse of the trajectory directions, not by each example's own geometry).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from conceptlm.core.hf import backbone, causal_lm_loss_sum, hidden_states, logits_at
from conceptlm.core.rng import EVAL_STEP, StepRandomness, derived_generator
from conceptlm.core.unit import THROUGHPUT_KEY
from conceptlm.data.chat import IGNORE_INDEX
from conceptlm.jepa.collapse import batch_stats
from conceptlm.jepa.config import JepaSection
from conceptlm.jepa.losses import jepa_distance
from conceptlm.jepa.stp import displacements, stp_distance, trajectory_curvature
from conceptlm.jepa.stp_batch import StpBatch, with_stp_targets
from conceptlm.jepa.unit import jepa_step_active
from conceptlm.lm.unit import HFModelUnit

__all__ = ["STP_STAT_NAMES", "StpForwardOutput", "run_stp_batch", "stp_terms", "make_stp_predictor", "lam_at",
           "StpUnit"]

_RENAME = {"jepa_mismatch": "stp_mismatch", "cos_matched": "cos_matched", "cos_mismatched": "cos_mismatched",
           "enc_text_var": "rest_var", "enc_code_var": "span_var", "enc_text_erank": "rest_erank",
           "enc_code_erank": "span_erank"}
STP_STAT_NAMES: tuple[str, ...] = tuple(_RENAME.values())
"""Evaluation metrics of :class:`StpUnit` (``random_span`` / ``two_view``)."""


@dataclass
class StpForwardOutput:
    """LM loss sum (fp32 scalar), its target count (int64 scalar) and the trajectory hidden states (B, T, D), or
    None when the STP term is off."""

    lm_loss_sum: torch.Tensor
    n_lm_targets: torch.Tensor
    trajectory: torch.Tensor | None


def run_stp_batch(model, batch: StpBatch, *, active: bool = True, layer: int = -1) -> StpForwardOutput:
    """One forward of the LM rows of ``batch``.

    Args:
        model: HF causal LM or PeftModel.
        batch: :class:`~conceptlm.jepa.stp_batch.StpBatch` on the model's device.
        active: False = the NTP forward only (:func:`~conceptlm.core.hf.causal_lm_loss_sum`).
        layer: which hidden states form the trajectory: -1 = the final normed state (the LM head's input);
            else Hugging Face's ``hidden_states[layer]`` (0 = embeddings).

    Returns:
        :class:`StpForwardOutput`.
    """
    lm = batch.lm
    if not active:
        loss, n = causal_lm_loss_sum(model, lm.input_ids, lm.labels, lm.attention_mask, lm.position_ids)
        return StpForwardOutput(loss, n, None)
    if layer == -1:
        hid = traj = hidden_states(model, lm.input_ids, lm.attention_mask, lm.position_ids)
    else:
        out = backbone(model)(input_ids=lm.input_ids, attention_mask=lm.attention_mask,
                              position_ids=lm.position_ids, use_cache=False, output_hidden_states=True)
        n_states = len(out.hidden_states)
        if not -n_states <= layer < n_states:
            raise ValueError(f"jepa.stp.layer={layer}, but the model has {n_states} hidden states (embeddings + "
                             f"{n_states - 1} layers)")
        hid, traj = out.last_hidden_state, out.hidden_states[layer]
    # the LM loss exactly as causal_lm_loss_sum computes it from the same hidden states (same ops, same bits)
    targets = lm.labels[:, 1:].to(hid.device)
    keep = targets != IGNORE_INDEX
    logits = logits_at(model, hid[:, :-1][keep])
    if logits.dtype != torch.float64:
        logits = logits.float()
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    return StpForwardOutput(loss, keep.sum(), traj)


def stp_terms(trajectory: torch.Tensor, batch: StpBatch, *, metric: str = "cosine",
              predictor: torch.nn.Module | None = None, stats: bool = False) -> dict:
    """The STP part of one batch (its sum; the trainer divides by :meth:`StpBatch.stp_count` summed globally).

    Args:
        trajectory: (B, T, D) hidden states from :func:`run_stp_batch`.
        batch: the batch with targets (:func:`~conceptlm.jepa.stp_batch.with_stp_targets`).
        metric: ``cosine`` | ``l2`` | ``mse``.
        predictor: P (a bias-free linear map) or None.
        stats: also return the collapse statistics (``STP_STAT_NAMES``) as ``(value · M, M)`` pairs.

    Returns:
        ``{"stp": fp32 scalar sum}`` (+ statistics).
    """
    if batch.variant == "curvature":
        angles, count = trajectory_curvature(trajectory, batch.pairs)
        has = count > 0
        return {"stp": (angles[has] / count[has]).sum()}
    disp = displacements(trajectory, batch.coef)                       # (B, 2R, D)
    rest, span = disp[:, 0::2].reshape(-1, disp.shape[-1]), disp[:, 1::2].reshape(-1, disp.shape[-1])
    w = batch.weight.reshape(-1).float()
    valid = w > 0
    rest, span, w = rest[valid], span[valid], w[valid]
    d = stp_distance(rest, span, metric, predictor=predictor)
    parts = {"stp": (w * d).sum()}
    if stats and rest.shape[0] >= 2:
        with torch.no_grad():
            pred = rest if predictor is None else F.linear(rest, predictor.weight.float())
            raw = batch_stats(pred, span, rest, span, lambda p, t: jepa_distance(p, t, metric))
        parts.update({_RENAME[k]: v for k, v in raw.items()})
    return parts


def make_stp_predictor(model, seed: int) -> torch.nn.Linear:
    """P: ``nn.Linear(D, D, bias=False)`` with Xavier-uniform weights (gain 1, as the reference), drawn from a
    generator seeded by ``(seed, "stp-predictor")`` (independent of the global RNG: λ = 0 runs stay NTP bit for bit)."""
    cfg = getattr(model, "config", None)
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "model_dim", None)
    if not d:
        raise ValueError(f"cannot tell the hidden size of {type(model).__name__} for the STP linear predictor")
    lin = torch.nn.Linear(d, d, bias=False)
    with torch.no_grad():
        torch.nn.init.xavier_uniform_(lin.weight, gain=1.0, generator=derived_generator("stp-predictor", seed))
    return lin


def lam_at(cfg: JepaSection, step: int, max_steps: int | None) -> float:
    """λ of optimizer step ``step``: ``jepa.lam``, or with ``stp.lam_warmup`` the linear ramp
    ``min_lam + (lam − min_lam) · step / (max_steps − 1)`` (the reference's ``--lbd_warmup``), capped at λ."""
    s = cfg.stp
    if cfg.objective != "stp" or not s.lam_warmup or not max_steps or max_steps < 2:
        return cfg.lam
    frac = min(max(step, 0) / (max_steps - 1), 1.0)
    return s.min_lam + (cfg.lam - s.min_lam) * frac


class StpUnit(HFModelUnit):
    """LM loss + λ·STP loss on :class:`~conceptlm.jepa.stp_batch.StpBatch` batches (see the module docstring).

    Args:
        model: HF causal LM (or PeftModel).
        cfg: the ``jepa`` section (``objective: stp``).
        seed: ``train.seed`` (span draws, loss dropout, predictor init).
        max_steps: ``train.max_steps`` (for the λ warm-up).
    """

    def __init__(self, model: torch.nn.Module, cfg: JepaSection, *, seed: int = 0, max_steps: int | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.seed = seed
        self.max_steps = max_steps
        self.loss_weights = {"lm": cfg.gamma, "stp": lam_at(cfg, 0, max_steps)}
        self.metric_names = STP_STAT_NAMES
        self._step_active = True
        if cfg.lam > 0 and cfg.stp.linear_predictor and cfg.stp.variant != "curvature":
            self.stp_predictor = make_stp_predictor(model, seed)
        else:
            self.stp_predictor = None

    def begin_step(self, step: int) -> None:
        self._step_active = jepa_step_active(self.seed, step, self.cfg.jepa_ratio)
        self.loss_weights["stp"] = lam_at(self.cfg, step, self.max_steps)

    @property
    def stp_active(self) -> bool:
        """The STP term runs: λ > 0 and (evaluation, or a training step kept by the dropout draw)."""
        return self.cfg.lam > 0 and (self._step_active or not self.training)

    def prepare(self, batch: StpBatch) -> StpBatch:
        if not self.stp_active:
            return batch
        rng = self.step_rng or StepRandomness(seed=self.seed, step=EVAL_STEP)
        return with_stp_targets(batch, self.cfg.stp, rng)

    def counts(self, batch: StpBatch) -> dict:
        n_stp = batch.stp_count() if (self.stp_active and batch.variant is not None) else 0
        return {"lm": batch.num_lm_targets, "stp": n_stp, THROUGHPUT_KEY: batch.real_tokens}

    def forward(self, batch: StpBatch) -> dict:
        active = self.stp_active
        if active and batch.variant is None:
            batch = self.prepare(batch)  # called outside the trainer (tests, scripts)
        out = run_stp_batch(self.model, batch, active=active, layer=self.cfg.stp.layer)
        parts = {"lm": out.lm_loss_sum}
        if out.trajectory is not None:
            parts.update(stp_terms(out.trajectory, batch, metric=self.cfg.metric, predictor=self.stp_predictor,
                                   stats=not self.training))
        return parts
