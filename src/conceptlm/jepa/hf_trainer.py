"""LLM-JEPA outside the conceptlm CLI: a plain loss function and a Hugging Face ``Trainer`` subclass.

* :func:`jepa_loss` — L = γ·L_LM + λ·mean_i d(Pred(Enc(Text_i)), Enc(Code_i)) (arXiv 2509.14252, eq. 3) of one
  collated batch, for any hand-written training loop.
* :class:`JepaDataCollator` + :class:`JepaTrainer` — drop-in pieces for a ``transformers.Trainer`` pipeline.

Gradient-accumulation normalisation in :class:`JepaTrainer` (the reference's ``RepresentationTrainer.compute_loss``
ignores ``num_items_in_batch``, so under transformers 4.55 its JEPA loss is not divided by the accumulation steps).
Before the micro-batches of an optimizer step run, the Trainer calls ``_get_num_items_in_batch`` on all of them; ours
returns ``num_items_in_batch`` = N, the number of shifted LM targets of the whole accumulated batch, and records E,
its number of examples (both summed over ranks when ``average_tokens_across_devices`` is on, the transformers
default). Every micro-batch m then back-propagates

    loss_m = s · (γ · Σ_{t∈m} CE_t / N  +  λ · Σ_{i∈m} d_i / E),   s = processes (1 when not averaging),

and the returned loss is flagged as already scaled (``loss_is_scaled_for_ga = True``) so that ``training_step`` does
not divide it by the accumulation steps again (``model_accepts_loss_kwargs``, which transformers otherwise uses for
that decision and for whether to count at all, plays no role for JEPA batches). DDP averages gradients over ranks
(hence s), so the step gradient is
exactly ∇(γ · token-mean CE + λ · example-mean d) over the global batch: batch 8 × GA 1 == batch 2 × GA 4 ==
2 ranks × batch 2 × GA 2 (to rounding). The InfoNCE metric is the exception: its negatives are the other examples of
the same micro-batch (of all ranks' micro-batches with ``gather_negatives``), so its value depends on the split.
When ``num_items_in_batch`` is None (a caller that bypasses ``get_batch_samples``), the micro-batch means are used
and ``training_step`` divides by the accumulation steps, as transformers does for such losses.

JEPA-loss dropout (``jepa_ratio``) is drawn once per optimizer step from
:func:`conceptlm.jepa.unit.jepa_step_active` (``args.seed``, ``state.global_step``): the same decision on every
rank and micro-batch of the step, identical to the conceptlm CLI with the same seed. Evaluation always runs the
JEPA term (λ > 0).

Semantic Tube Prediction (``jepa_args={"objective": "stp", ...}``): the datasets hold
:class:`~conceptlm.jepa.stp_data.StpExample` items (``StpChatDataset`` / ``StpTextDataset``), the default collator is
:class:`~conceptlm.jepa.stp_hf.StpDataCollator`, and the same normalisation applies with E = Σ of the span weights of
the accumulated batch (drawn per ``(args.seed, state.global_step, example index)``, as ``conceptlm jepa train``
draws them); the term is logged as ``stp``. See :mod:`conceptlm.jepa.stp_hf`.

The JEPA forward needs the model's submodules (decoder stack, LM head), not its ``forward``. To keep DDP/FSDP
gradient synchronisation and parameter gathering intact, the computation is run THROUGH the outermost wrapper:
the innermost model's ``forward`` is replaced for the duration of one call by a function that runs the JEPA batch,
and the wrapper is called with no arguments (see :func:`_call_through`). Mixed precision comes from
``accelerator.autocast()`` around that call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import transformers
from torch import nn

from conceptlm.core.rng import EVAL_STEP, StepRandomness
from conceptlm.jepa.config import JepaSection
from conceptlm.jepa.forward import run_jepa_batch
from conceptlm.jepa.hf_collate import (
    BATCH_KEY,
    JepaDataCollator,
    check_view_settings,
    given_view_fields,
    jepa_section,
    predictor_ids,
)
from conceptlm.jepa.losses import jepa_distance, vicreg_covariance, vicreg_variance
from conceptlm.jepa.packing import PackedBatch, SeparateBatch
from conceptlm.jepa.stp_batch import StpBatch, with_stp_targets
from conceptlm.jepa.stp_hf import StpDataCollator, attach_stp_predictor, stp_counts, stp_parts
from conceptlm.jepa.stp_unit import lam_at
from conceptlm.jepa.unit import jepa_step_active

__all__ = ["jepa_loss", "JepaTrainer"]

_WRAPPERS = ("FullyShardedDataParallel", "DeepSpeedEngine")  # containers whose forward calls self.module(...)


# ------------------------------------------------------------------------------------------- forward plumbing


def _innermost(model: nn.Module) -> nn.Module:
    """Strip DDP / FSDP(1) / DeepSpeed containers (``.module``) to reach the HF model or PeftModel."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    inner = model
    while True:
        if isinstance(inner, DataParallel) and not isinstance(inner, DistributedDataParallel):
            raise ValueError("torch.nn.DataParallel is not supported for LLM-JEPA; launch one process per GPU with "
                             "torchrun (DDP) instead")
        if isinstance(inner, DistributedDataParallel) or type(inner).__name__ in _WRAPPERS:
            inner = inner.module
            continue
        return inner


def _call_through(model: nn.Module, fn: Callable[[nn.Module], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Run ``fn(inner_model)`` as the forward of ``model`` (whatever wraps the inner model).

    The inner model's ``forward`` is temporarily an instance attribute that ignores its arguments and returns
    ``fn(inner)``; ``model()`` is then called, so DDP's reducer bookkeeping, FSDP's unsharding and module hooks run
    as for an ordinary forward. The previous ``forward`` (e.g. accelerate's autocast wrapper) is restored after.

    Args:
        model: HF causal LM / PeftModel, possibly wrapped in DDP or FSDP.
        fn: computation on the inner model; must return a dict of tensors.

    Returns:
        What ``fn`` returned (passed through the wrapper's forward).
    """
    inner = _innermost(model)
    missing = object()
    previous = inner.__dict__.get("forward", missing)

    def forward(*_args, **_kwargs):
        return fn(inner)

    inner.forward = forward
    try:
        return model()
    finally:
        if previous is missing:
            del inner.forward
        else:
            inner.forward = previous


def _jepa_parts(inner: nn.Module, batch: SeparateBatch | PackedBatch, *, active: bool, metric: str,
                temperature: float, gather_negatives: bool, vicreg_gamma: float | None = None
                ) -> dict[str, torch.Tensor]:
    """Summed LM CE, its target count and (when active) the summed JEPA distance of one batch; with
    ``vicreg_gamma`` and at least 2 examples also ``var_sum`` / ``cov_sum`` = B · (the VICReg variance / covariance
    term of Enc(Text) + that of Enc(Code)), as :class:`~conceptlm.jepa.unit.JepaUnit` computes them."""
    out = run_jepa_batch(inner, batch, jepa_active=active)
    parts = {"lm_sum": out.lm_loss_sum, "n_lm": out.n_lm_targets}
    if out.jepa_active:
        d = jepa_distance(out.pred, out.target, metric, temperature=temperature, gather_negatives=gather_negatives)
        parts["jepa_sum"] = d.sum()
        b = out.enc_text.shape[0]
        if vicreg_gamma is not None and b >= 2:
            parts["var_sum"] = b * (vicreg_variance(out.enc_text, gamma=vicreg_gamma)
                                    + vicreg_variance(out.enc_code, gamma=vicreg_gamma))
            parts["cov_sum"] = b * (vicreg_covariance(out.enc_text) + vicreg_covariance(out.enc_code))
    return parts


def _check_batch(batch: Any, *, stp: bool = False) -> None:
    if stp:
        if not isinstance(batch, StpBatch):
            raise TypeError("jepa_args.objective='stp' needs StpBatch batches (StpDataCollator over StpExample "
                            f"items), got {type(batch).__name__}")
        return
    if not isinstance(batch, (SeparateBatch, PackedBatch)):
        raise TypeError(f"expected a SeparateBatch or PackedBatch (conceptlm.jepa.packing.collate_separate / "
                        f"collate_packed), got {type(batch).__name__}")


def jepa_loss(model: nn.Module, batch: SeparateBatch | PackedBatch, *, lam: float = 1.0, gamma: float = 1.0,
              metric: str = "cosine", temperature: float = 0.07, jepa_active: bool = True,
              gather_negatives: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LLM-JEPA loss of one batch: L = γ · (mean LM token CE) + λ · mean_i d(Pred(Enc(Text_i)), Enc(Code_i)).

    The LM term is the summed next-token cross-entropy over the batch's (shifted) LM targets divided by their
    number; the JEPA term is the mean over the batch's examples of
    :func:`conceptlm.jepa.losses.jepa_distance`. With ``lam=0`` or ``jepa_active=False`` the views are not run and
    the loss is exactly the SFT loss γ · L_LM. The model may be wrapped in DDP/FSDP (the computation runs through
    the wrapper's forward, so gradients are synchronised). For gradient accumulation over micro-batches of unequal
    token counts, weight each micro-batch yourself (or use :class:`JepaTrainer`, which does).

    Example::

        from conceptlm.jepa.config import ViewConfig
        from conceptlm.jepa.views import add_predictor_tokens, build_views
        from conceptlm.jepa.packing import collate_packed
        from conceptlm.jepa.hf_trainer import jepa_loss

        add_predictor_tokens(tokenizer, model, k=1)               # <|predictor_1|>, resizes the embeddings
        cfg = ViewConfig(num_predictors=1)
        examples = [ex for r in records for ex in build_views(r, tokenizer, cfg)]
        batch = collate_packed(examples[:8], pad_token_id=tokenizer.pad_token_id).to(model.device)
        loss, parts = jepa_loss(model, batch, lam=1.0)            # parts = {"lm": ..., "jepa": ...}
        loss.backward(); optimizer.step(); optimizer.zero_grad()

    Args:
        model: HF causal LM or PeftModel (with the predictor tokens in its vocabulary), possibly DDP/FSDP-wrapped.
        batch: :class:`~conceptlm.jepa.packing.SeparateBatch` or :class:`~conceptlm.jepa.packing.PackedBatch` of
            B examples, on the model's device.
        lam: λ ≥ 0, weight of the JEPA term.
        gamma: γ ≥ 0, weight of the LM term.
        metric: ``cosine`` | ``l2`` | ``mse`` | ``infonce`` (see :func:`~conceptlm.jepa.losses.jepa_distance`).
        temperature: InfoNCE τ.
        jepa_active: False = skip the JEPA views (a dropped step): plain LM forward only.
        gather_negatives: InfoNCE only, negatives from every rank (needs an initialised process group).

    Returns:
        ``(loss, {"lm": L_LM, "jepa": mean distance})``: ``loss`` a scalar fp32 tensor with gradient; the parts are
        detached scalars (``jepa`` is 0 when the views were not run).
    """
    _check_batch(batch)
    active = bool(jepa_active) and lam > 0
    parts = _call_through(model, lambda m: _jepa_parts(m, batch, active=active, metric=metric,
                                                       temperature=temperature, gather_negatives=gather_negatives))
    lm = parts["lm_sum"] / parts["n_lm"].clamp(min=1)
    jepa = parts["jepa_sum"] / batch.num_examples if "jepa_sum" in parts else torch.zeros((), device=lm.device)
    loss = gamma * lm + lam * jepa if "jepa_sum" in parts else gamma * lm
    return loss, {"lm": lm.detach(), "jepa": jepa.detach()}


# ------------------------------------------------------------------------------------------------------ trainer

class JepaTrainer(transformers.Trainer):
    """``transformers.Trainer`` that optimises the LLM-JEPA objective (normalisation: see the module docstring).

    The datasets hold :class:`~conceptlm.jepa.views.JepaExample` items (a list,
    :class:`conceptlm.jepa.data.JepaDataset`, or a torch/HF dataset of them); the collator defaults to
    :class:`JepaDataCollator` in ``jepa_args.mode`` with the pad id of ``processing_class``.
    ``TrainingArguments(remove_unused_columns=False)`` is required. View settings given in ``jepa_args``
    (``num_predictors``, ``predictor_position``, ``text_view``, ``code_view``, ``direction``: every one of a
    :class:`~conceptlm.jepa.config.JepaSection`, the keys present in a dict) must match how the examples were built
    (:func:`check_view_settings` runs on every batch; a contradiction is a ``ValueError``, never silently ignored:
    the views are built before the trainer sees them). At every logging step the logs get ``lm``
    (mean LM CE over the steps since the last log), ``jepa`` (mean distance over the steps that ran the JEPA term)
    and ``jepa_steps`` (the fraction of those steps). Evaluation reports ``eval_loss`` = the JEPA objective.

    With ``jepa_args={"objective": "stp", ...}`` (Semantic Tube Prediction; nested options as ``{"stp": {...}}``)
    the items are :class:`~conceptlm.jepa.stp_data.StpExample` (``StpChatDataset`` / ``StpTextDataset``), the
    default collator is :class:`~conceptlm.jepa.stp_hf.StpDataCollator`, the term is logged as ``stp``, and with
    ``stp.linear_predictor`` the model gets an ``stp_predictor`` submodule before the optimizer is built.

    Args:
        model: HF causal LM or PeftModel (predictor tokens already added: ``add_predictor_tokens``).
        args: ``transformers.TrainingArguments`` with ``remove_unused_columns=False``.
        jepa_args: :class:`~conceptlm.jepa.config.JepaSection` (λ, γ, metric, temperature, gather_negatives,
            mode, jepa_ratio; its view fields are checked against the batches) or a dict of its fields; None =
            defaults (no view check).
        data_collator: optional; a :class:`JepaDataCollator` must use ``jepa_args.mode``.
        **kwargs: the usual ``Trainer`` arguments (train_dataset, eval_dataset, processing_class, callbacks, ...).
    """

    def __init__(self, model: nn.Module | None = None, args: transformers.TrainingArguments | None = None, *,
                 jepa_args: JepaSection | Mapping | None = None, data_collator: Callable | None = None,
                 **kwargs: Any):
        self.jepa_args = jepa_section(jepa_args)
        self._stp = self.jepa_args.objective == "stp"
        self._view_fields = given_view_fields(jepa_args)
        self._predictor_ids = predictor_ids(kwargs.get("processing_class"))
        if args is None or args.remove_unused_columns:
            raise ValueError("JepaTrainer needs TrainingArguments(remove_unused_columns=False): the batches are "
                             "JEPA views, not model.forward arguments, and must not be filtered by column name")
        if data_collator is None:
            tok = kwargs.get("processing_class")
            pad = getattr(tok, "pad_token_id", None)
            if pad is None:
                raise ValueError("JepaTrainer: pass data_collator=JepaDataCollator(pad_token_id, mode=...) or a "
                                 "processing_class (tokenizer) with a pad token")
            data_collator = StpDataCollator(pad) if self._stp else JepaDataCollator(pad, mode=self.jepa_args.mode)
        elif isinstance(data_collator, JepaDataCollator) and self._stp:
            raise ValueError("jepa_args.objective='stp' needs StpDataCollator (JepaDataCollator builds two-view "
                             "batches)")
        elif isinstance(data_collator, JepaDataCollator) and data_collator.mode != self.jepa_args.mode:
            raise ValueError(f"data_collator.mode={data_collator.mode!r} differs from jepa_args.mode="
                             f"{self.jepa_args.mode!r}")
        if model is not None:
            attach_stp_predictor(_innermost(model), self.jepa_args, args.seed)  # before the optimizer exists
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(f"{self.args.n_gpu} GPUs in one process (DataParallel) are not supported; launch one "
                             "process per GPU with torchrun")
        self._jepa_counts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._steps_seen: dict[int, bool] = {}
        self._reset_parts()

    def _reset_parts(self) -> None:
        # (lm, jepa, vicreg_var, vicreg_cov) sums
        self._acc_parts = torch.zeros(4, dtype=torch.float32, device=self.args.device)

    # ---- counting -------------------------------------------------------------------------------------------

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        """LM targets N of the accumulated JEPA batch (over ranks when averaging); records its examples E too."""
        if not batch_samples or not all(isinstance(b, Mapping) and BATCH_KEY in b for b in batch_samples):
            return super()._get_num_items_in_batch(batch_samples, device)
        if self._stp:
            return self._stp_num_items([b[BATCH_KEY] for b in batch_samples], device)
        counts = torch.tensor([[sum(b[BATCH_KEY].num_lm_targets for b in batch_samples),
                                sum(b[BATCH_KEY].num_examples for b in batch_samples),
                                sum(b[BATCH_KEY].num_examples for b in batch_samples
                                    if b[BATCH_KEY].num_examples >= 2)]], dtype=torch.long, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts)
        counts = counts.sum(0)
        n_lm, n_ex, n_reg = counts[0], counts[1], counts[2]
        self._jepa_counts = (n_lm, n_ex, n_reg)
        return n_lm

    def _stp_rng(self) -> StepRandomness:
        """The span draws of this optimizer step (``EVAL_STEP`` in evaluation), as ``conceptlm jepa train``."""
        step = self.state.global_step if self.model.training else EVAL_STEP
        return StepRandomness(seed=self.args.seed, step=step)

    def _stp_num_items(self, batches: list, device: torch.device) -> torch.Tensor:
        """LM targets N of the accumulated STP batch; records E = its Σ span weights (over ranks when averaging)."""
        for b in batches:
            _check_batch(b, stp=True)
        counts = stp_counts(batches, self.jepa_args, self._stp_rng())[None].to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts)
        counts = counts.sum(0)
        n_lm = counts[0].round().long()
        self._jepa_counts = (n_lm, counts[1].float(), torch.zeros((), device=device))
        return n_lm

    def _loss_scale(self) -> int:
        """× number of processes when counts are global (DDP averages gradients over ranks), as transformers does."""
        return self.accelerator.num_processes if self.args.average_tokens_across_devices else 1

    def _lam(self) -> float:
        """λ of the current step (the STP warm-up ramps it over ``state.max_steps``)."""
        return lam_at(self.jepa_args, self.state.global_step, self.state.max_steps)

    def _jepa_active(self, model: nn.Module) -> bool:
        if self.jepa_args.lam <= 0:
            return False
        if not model.training:
            return True
        return jepa_step_active(self.args.seed, self.state.global_step, self.jepa_args.jepa_ratio)

    # ---- loss -----------------------------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """γ · Σ CE / N + λ · Σ d / E (× processes); micro-batch means when ``num_items_in_batch`` is None. With
        ``jepa_args.anti_collapse="vicreg"`` also + w_var · Σ B·var / E₂ + w_cov · Σ B·cov / E₂ (E₂: examples of the
        micro-batches holding at least 2; the statistics are per micro-batch, as in ``conceptlm jepa train``).

        Args:
            model: the (possibly wrapped) model.
            inputs: ``{"jepa_batch": PackedBatch | SeparateBatch}`` from :class:`JepaDataCollator` (``StpBatch`` from
                :class:`~conceptlm.jepa.stp_hf.StpDataCollator` for STP).
            return_outputs: also return ``{"lm": Σ CE / N, "jepa": Σ d / E}`` (detached; this micro-batch's share of
                the step's means, the means themselves without accumulation).
            num_items_in_batch: N from :meth:`_get_num_items_in_batch` (LM targets of the accumulated batch).

        Returns:
            The scalar loss, or ``(loss, parts)``.
        """
        if not isinstance(inputs, Mapping) or BATCH_KEY not in inputs:
            keys = list(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(f"JepaTrainer expects batches {{'{BATCH_KEY}': ...}} from JepaDataCollator, got {keys}")
        batch = inputs[BATCH_KEY]
        _check_batch(batch, stp=self._stp)
        cfg = self.jepa_args
        active = self._jepa_active(model)
        if self._stp:
            batch = batch.to(self.args.device)
            if active:
                batch = with_stp_targets(batch, cfg.stp, self._stp_rng())
            with self.accelerator.autocast():
                parts = _call_through(model, lambda m: stp_parts(m, batch, cfg, active=active))
        else:
            check_view_settings(self.jepa_args, batch, self._view_fields, self._predictor_ids)
            batch = batch.to(self.args.device)
            gamma = cfg.vicreg_gamma if cfg.anti_collapse == "vicreg" else None
            with self.accelerator.autocast():
                parts = _call_through(model, lambda m: _jepa_parts(m, batch, active=active, metric=cfg.metric,
                                                                   temperature=cfg.temperature,
                                                                   gather_negatives=cfg.gather_negatives,
                                                                   vicreg_gamma=gamma))
        if num_items_in_batch is None:
            n_ex = batch.stp_count().float().clamp(min=1e-12) if (self._stp and active) else batch.num_examples
            n_lm, scale = parts["n_lm"].clamp(min=1), 1
            n_reg = max(batch.num_examples, 1)
            self.loss_is_scaled_for_ga = False
        else:
            if self._jepa_counts is None or num_items_in_batch is not self._jepa_counts[0]:
                raise ValueError("num_items_in_batch was not computed by JepaTrainer._get_num_items_in_batch; the "
                                 "JEPA term needs the example count of the accumulated batch too")
            n_lm = self._jepa_counts[0].clamp(min=1)
            n_ex = self._jepa_counts[1].clamp(min=1e-12 if self._stp else 1)  # STP: Σ weights (may be < 1)
            n_reg = self._jepa_counts[2].clamp(min=1)
            scale = self._loss_scale()
            self.loss_is_scaled_for_ga = True
        lm = parts["lm_sum"] / n_lm
        loss = cfg.gamma * lm
        jepa = torch.zeros((), device=lm.device)
        if "jepa_sum" in parts:
            jepa = parts["jepa_sum"] / n_ex
            loss = loss + self._lam() * jepa
        var = cov = torch.zeros((), device=lm.device)
        if "var_sum" in parts:
            var, cov = parts["var_sum"] / n_reg, parts["cov_sum"] / n_reg
            loss = loss + cfg.vicreg_var_weight * var + cfg.vicreg_cov_weight * cov
        loss = loss * scale
        if model.training:
            self._steps_seen[self.state.global_step] = "jepa_sum" in parts
            step_parts = torch.stack([lm.detach(), jepa.detach(), var.detach(), cov.detach()]).float()
            self._acc_parts += step_parts.to(self._acc_parts.device) * scale
        if return_outputs:
            return loss, {"lm": lm.detach(), "jepa": jepa.detach()}
        return loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Evaluation: the JEPA objective of the batch (always with the JEPA term); no logits or labels."""
        if not (isinstance(inputs, Mapping) and BATCH_KEY in inputs):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        n = self._get_num_items_in_batch([inputs], self.args.device)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs, num_items_in_batch=n)
        return loss.detach(), None, None

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """6 · (real tokens of all views) · non-embedding parameters (a forward+backward estimate)."""
        batch = inputs.get(BATCH_KEY) if isinstance(inputs, Mapping) else None
        if batch is None or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        return 6 * batch.real_tokens * self.model.num_parameters(exclude_embeddings=True)

    # ---- logging --------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``lm``, ``jepa`` (and ``vicreg_var`` / ``vicreg_cov``) and ``jepa_steps`` to training logs (means
        since the previous log)."""
        if "loss" in logs:
            done = sorted(s for s in self._steps_seen if s < self.state.global_step)
            if done:
                n_active = sum(self._steps_seen.pop(s) for s in done)
                both = self._acc_parts[None]
                if self.args.world_size > 1:
                    both = self.accelerator.gather(both)
                lm_sum, jepa_sum, var_sum, cov_sum = both.mean(0).tolist()
                logs["lm"] = lm_sum / len(done)
                if n_active:
                    logs["stp" if self._stp else "jepa"] = jepa_sum / n_active
                    if self.jepa_args.anti_collapse == "vicreg":
                        logs["vicreg_var"], logs["vicreg_cov"] = var_sum / n_active, cov_sum / n_active
                logs["jepa_steps"] = n_active / len(done)
                self._reset_parts()
        super().log(logs, start_time)
