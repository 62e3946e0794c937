"""Semantic Tube Prediction outside the conceptlm CLI: a plain loss function, the collator, and the pieces
:class:`conceptlm.jepa.hf_trainer.JepaTrainer` uses for ``jepa_args={"objective": "stp", ...}``.

Spans are drawn exactly as ``conceptlm jepa train`` draws them (keyed by ``(seed, optimizer step, example index)``,
:func:`conceptlm.jepa.stp_batch.with_stp_targets`), so the two paths compute the same loss for the same data order.
The linear predictor (``jepa.stp.linear_predictor``) is attached to the model as the submodule ``stp_predictor``
(as the reference attaches ``linear_predictor``): the Trainer's optimizer, DDP and ``save_pretrained`` see it; a
model loaded back with ``from_pretrained`` ignores the extra weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from conceptlm.core.rng import StepRandomness
from conceptlm.jepa.config import JepaSection
from conceptlm.jepa.hf_collate import BATCH_KEY
from conceptlm.jepa.stp_batch import StpBatch, collate_stp, with_stp_targets
from conceptlm.jepa.stp_data import StpExample
from conceptlm.jepa.stp_unit import make_stp_predictor, run_stp_batch, stp_terms

__all__ = ["StpDataCollator", "attach_stp_predictor", "stp_parts", "stp_counts", "stp_loss"]

PREDICTOR_ATTR = "stp_predictor"


def _as_stp_example(feature: Any, i: int) -> StpExample:
    if isinstance(feature, StpExample):
        return feature
    if isinstance(feature, Mapping) and {"lm_ids", "lm_labels", "pieces"} <= set(feature):
        return StpExample(tuple(int(x) for x in feature["lm_ids"]), tuple(int(x) for x in feature["lm_labels"]),
                          tuple((int(a), int(b)) for a, b in feature["pieces"]),
                          None if feature.get("index") is None else int(feature["index"]))
    raise TypeError(f"batch feature {i} is a {type(feature).__name__}, expected an StpExample (from "
                    "conceptlm.jepa.stp_data) or a dict with its fields")


@dataclasses.dataclass
class StpDataCollator:
    """Collate :class:`~conceptlm.jepa.stp_data.StpExample` items into ``{"jepa_batch": StpBatch}``."""

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("pad_token_id is None; give the tokenizer a pad token "
                             "(conceptlm.core.hf.ensure_pad_token)")

    def __call__(self, features: Sequence[Any]) -> dict[str, StpBatch]:
        examples = [_as_stp_example(f, i) for i, f in enumerate(features)]
        return {BATCH_KEY: collate_stp(examples, pad_token_id=int(self.pad_token_id), padding_side=self.padding_side,
                                       pad_to_multiple_of=self.pad_to_multiple_of)}


def attach_stp_predictor(model: nn.Module, cfg: JepaSection, seed: int) -> nn.Module | None:
    """Give ``model`` its ``stp_predictor`` when ``cfg`` asks for one (kept if already there, e.g. on resume);
    returns it (None when not used)."""
    if not (cfg.objective == "stp" and cfg.lam > 0 and cfg.stp.linear_predictor and cfg.stp.variant != "curvature"):
        return None
    existing = getattr(model, PREDICTOR_ATTR, None)
    if isinstance(existing, nn.Linear):
        return existing
    pred = make_stp_predictor(model, seed)
    try:
        pred = pred.to(next(model.parameters()).device)
    except StopIteration:
        pass
    setattr(model, PREDICTOR_ATTR, pred)
    return pred


def stp_parts(inner: nn.Module, batch: StpBatch, cfg: JepaSection, *, active: bool) -> dict[str, torch.Tensor]:
    """``{"lm_sum", "n_lm"}`` and, when active, ``"jepa_sum"`` = the STP sum of one batch WITH targets (the
    Trainer's name for its embedding term)."""
    out = run_stp_batch(inner, batch, active=active, layer=cfg.stp.layer)
    parts = {"lm_sum": out.lm_loss_sum, "n_lm": out.n_lm_targets}
    if out.trajectory is not None:
        terms = stp_terms(out.trajectory, batch, metric=cfg.metric, predictor=getattr(inner, PREDICTOR_ATTR, None))
        parts["jepa_sum"] = terms["stp"]
    return parts


def stp_counts(batches: Sequence[StpBatch], cfg: JepaSection, rng: StepRandomness) -> torch.Tensor:
    """(2,) float64 ``[LM targets, STP count]`` of the micro-batches of one step (spans drawn with ``rng``)."""
    n_lm = sum(b.num_lm_targets for b in batches)
    n_stp = sum(float(with_stp_targets(b, cfg.stp, rng).stp_count()) for b in batches)
    return torch.tensor([n_lm, n_stp], dtype=torch.float64)


def stp_loss(model: nn.Module, batch: StpBatch, cfg: JepaSection | None = None, *, step: int = 0, seed: int = 0,
             active: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """STP objective of one batch for any training loop: ``γ · mean LM CE + λ · Σ w·d / Σ w`` (module docstrings of
    :mod:`conceptlm.jepa.stp` and :mod:`conceptlm.jepa.stp_unit`).

    Args:
        model: HF causal LM or PeftModel (with ``stp_predictor`` if ``linear_predictor``:
            :func:`attach_stp_predictor`).
        batch: from :func:`~conceptlm.jepa.stp_batch.collate_stp` (or :class:`StpDataCollator`), on the device.
        cfg: the ``jepa`` section (``objective`` is taken as stp); None = defaults (λ = 0.02).
        step, seed: key the span draws (use the optimizer step and your run seed).
        active: False = NTP only.

    Returns:
        ``(loss, {"lm": mean LM CE, "stp": the STP term})`` (parts detached; ``stp`` 0 when off).
    """
    cfg = cfg or JepaSection(objective="stp")
    active = active and cfg.lam > 0
    if active:
        batch = with_stp_targets(batch, cfg.stp, StepRandomness(seed=seed, step=step))
    from conceptlm.jepa.hf_trainer import _call_through  # runs through a DDP/FSDP wrapper

    parts = _call_through(model, lambda m: stp_parts(m, batch, cfg, active=active))
    lm = parts["lm_sum"] / parts["n_lm"].clamp(min=1)
    loss = cfg.gamma * lm
    stp = torch.zeros((), device=lm.device)
    if "jepa_sum" in parts:
        stp = parts["jepa_sum"] / batch.stp_count().clamp(min=1e-12).float()
        loss = loss + cfg.lam * stp
    return loss, {"lm": lm.detach(), "stp": stp.detach()}
