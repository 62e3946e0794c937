"""LLM-JEPA outside the conceptlm CLI: a plain loss function and a Hugging Face ``Trainer`` subclass.

* :func:`jepa_loss` — L = γ·L_LM + λ·mean_i d(Pred(Enc(Text_i)), Enc(Code_i)) (arXiv 2509.14252, eq. 3) of one
  collated batch, for any hand-written training loop.
* :class:`JepaDataCollator` + :class:`JepaTrainer` — drop-in pieces for a ``transformers.Trainer`` pipeline.

Gradient-accumulation normalisation in :class:`JepaTrainer` (fixes spec §0 item 2, where the reference's JEPA loss is
not divided by the accumulation steps). Before the micro-batches of an optimizer step run, the Trainer calls
``_get_num_items_in_batch`` on all of them; ours returns ``num_items_in_batch`` = N, the number of shifted LM targets
of the whole accumulated batch, and records E, its number of examples (both summed over ranks when
``average_tokens_across_devices`` is on, the transformers default). Every micro-batch m then back-propagates

    loss_m = s · (γ · Σ_{t∈m} CE_t / N  +  λ · Σ_{i∈m} d_i / E),   s = processes (1 when not averaging),

and the returned loss is flagged as already scaled (``loss_is_scaled_for_ga = True``) so that ``training_step`` does
not divide it by the accumulation steps again (``model_accepts_loss_kwargs``, which transformers otherwise uses for
that decision and for whether to count at all, plays no role for JEPA batches). DDP averages gradients over ranks (hence s), so the step gradient is
exactly ∇(γ · token-mean CE + λ · example-mean d) over the global batch: batch 8 × GA 1 == batch 2 × GA 4 ==
2 ranks × batch 2 × GA 2 (to rounding). The InfoNCE metric is the exception: its negatives are the other examples of
the same micro-batch (of all ranks' micro-batches with ``gather_negatives``), so its value depends on the split.
When ``num_items_in_batch`` is None (a caller that bypasses ``get_batch_samples``), the micro-batch means are used
and ``training_step`` divides by the accumulation steps, as transformers does for such losses.

JEPA-loss dropout (``jepa_ratio``) is drawn once per optimizer step from
:func:`conceptlm.jepa.unit.jepa_step_active` (``args.seed``, ``state.global_step``): the same decision on every
rank and micro-batch of the step, identical to the conceptlm CLI with the same seed. Evaluation always runs the
JEPA term (λ > 0).

The JEPA forward needs the model's submodules (decoder stack, LM head), not its ``forward``. To keep DDP/FSDP
gradient synchronisation and parameter gathering intact, the computation is run THROUGH the outermost wrapper:
the innermost model's ``forward`` is replaced for the duration of one call by a function that runs the JEPA batch,
and the wrapper is called with no arguments (see :func:`_call_through`). Mixed precision comes from
``accelerator.autocast()`` around that call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import transformers
from torch import nn

from conceptlm.jepa.config import JepaSection
from conceptlm.jepa.forward import run_jepa_batch
from conceptlm.jepa.losses import jepa_distance, vicreg_covariance, vicreg_variance
from conceptlm.jepa.packing import (
    CODE_SEGMENT,
    TEXT_SEGMENT,
    VIEW_SETTINGS,
    PackedBatch,
    SeparateBatch,
    collate_packed,
    collate_separate,
)
from conceptlm.jepa.unit import jepa_step_active
from conceptlm.jepa.views import JepaExample, predictor_token

__all__ = ["BATCH_KEY", "jepa_loss", "JepaDataCollator", "JepaTrainer", "check_view_settings"]

BATCH_KEY = "jepa_batch"
"""Key of the collated :class:`SeparateBatch` / :class:`PackedBatch` in the dict the collator returns."""

_MODES = ("packed", "separate")
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


def _check_batch(batch: Any) -> None:
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

        from conceptlm.jepa.views import ViewConfig, add_predictor_tokens, build_views
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


# ----------------------------------------------------------------------------------------------------- collator

_EXAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(JepaExample))
_REQUIRED_FIELDS = tuple(f.name for f in dataclasses.fields(JepaExample) if f.default is dataclasses.MISSING)


def _as_example(feature: Any, i: int) -> JepaExample:
    if isinstance(feature, JepaExample):
        return feature
    if isinstance(feature, Mapping):
        missing = [k for k in _REQUIRED_FIELDS if k not in feature]
        if missing:
            raise ValueError(f"batch feature {i} lacks JepaExample field(s) {missing}; build the dataset with "
                             "conceptlm.jepa.views.build_views (or conceptlm.jepa.data.JepaDataset)")
        kw = {k: feature[k] for k in _EXAMPLE_FIELDS if k in feature}
        for k in ("lm_ids", "lm_labels", "text_ids", "code_ids"):
            kw[k] = tuple(int(x) for x in kw[k])
        for k in ("text_enc", "code_enc", "text_prefix_len", "code_prefix_len"):
            if k in kw:
                kw[k] = int(kw[k])
        return JepaExample(**kw)
    raise TypeError(f"batch feature {i} is a {type(feature).__name__}, expected a JepaExample (from "
                    "conceptlm.jepa.views.build_views) or a dict with its fields")


@dataclasses.dataclass
class JepaDataCollator:
    """Collate :class:`~conceptlm.jepa.views.JepaExample` items into ``{"jepa_batch": batch}`` for the HF Trainer.

    The batch is a :class:`~conceptlm.jepa.packing.PackedBatch` (``mode="packed"``) or
    :class:`~conceptlm.jepa.packing.SeparateBatch` (``mode="separate"``) of CPU tensors; :class:`JepaTrainer`
    moves it to the device. Items may also be dicts with the JepaExample fields (rows of a ``datasets.Dataset``).

    Attributes:
        pad_token_id: id written into padded slots.
        mode: ``packed`` (one row per example, tree attention mask) or ``separate`` (three padded batches).
        padding_side: ``right`` or ``left``.
        pad_to_multiple_of: optional rounding of padded lengths.
    """

    pad_token_id: int
    mode: str = "packed"
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {self.mode!r}")
        if self.pad_token_id is None:
            raise ValueError("pad_token_id is None; give the tokenizer a pad token "
                             "(conceptlm.core.hf.ensure_pad_token)")

    def __call__(self, features: Sequence[Any]) -> dict[str, SeparateBatch | PackedBatch]:
        """Collate B items. Returns ``{"jepa_batch": PackedBatch | SeparateBatch}``."""
        examples = [_as_example(f, i) for i, f in enumerate(features)]
        collate = collate_packed if self.mode == "packed" else collate_separate
        return {BATCH_KEY: collate(examples, pad_token_id=int(self.pad_token_id), padding_side=self.padding_side,
                                   pad_to_multiple_of=self.pad_to_multiple_of)}


# ------------------------------------------------------------------------------------------------------ trainer


def _jepa_section(jepa_args: JepaSection | Mapping | None) -> JepaSection:
    if jepa_args is None:
        section = JepaSection()
    elif isinstance(jepa_args, JepaSection):
        section = jepa_args
    elif isinstance(jepa_args, Mapping):
        known = {f.name for f in dataclasses.fields(JepaSection)}
        unknown = sorted(set(jepa_args) - known)
        if unknown:
            raise ValueError(f"unknown jepa_args key(s) {unknown}; known: {sorted(known)}")
        section = JepaSection(**jepa_args)
    else:
        raise TypeError(f"jepa_args must be a conceptlm.jepa.config.JepaSection, a dict of its fields or None, got "
                        f"{type(jepa_args).__name__}")
    section.validate()
    return section


_VIEW_FIELDS = (*VIEW_SETTINGS, "direction")


def _given_view_fields(jepa_args: JepaSection | Mapping | None) -> tuple[str, ...]:
    """The view fields the caller set: every one of a JepaSection, the keys of a dict, none for None."""
    if isinstance(jepa_args, JepaSection):
        return _VIEW_FIELDS
    if isinstance(jepa_args, Mapping):
        return tuple(f for f in _VIEW_FIELDS if f in jepa_args)
    return ()


def _predictor_ids(tokenizer: Any) -> list[int]:
    """Ids of the ``<|predictor_i|>`` tokens in ``tokenizer``'s vocabulary (empty without a tokenizer)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return [vocab[predictor_token(i)] for i in range(1, 65) if predictor_token(i) in vocab]


def _predictors_per_row(batch: SeparateBatch | PackedBatch, ids: list[int]) -> torch.Tensor:
    """(B,) number of predictor tokens in each example's predicting view (up to its Enc token in packed mode)."""
    ids_t = torch.tensor(ids, dtype=torch.long, device=batch.lm.input_ids.device)
    if isinstance(batch, PackedBatch):
        segment = TEXT_SEGMENT if batch.pred_is_text else CODE_SEGMENT
        hits = torch.isin(batch.input_ids, ids_t) & (batch.segment_ids == segment)
    else:
        view = batch.text if batch.pred_is_text else batch.code
        hits = torch.isin(view.input_ids, ids_t) & view.attention_mask.bool()
    return hits.sum(1)


def check_view_settings(section: JepaSection, batch: SeparateBatch | PackedBatch,
                        fields: Sequence[str] = _VIEW_FIELDS, predictor_ids: Sequence[int] = ()) -> None:
    """Raise when view settings of ``section`` contradict how the examples of ``batch`` were built.

    Compared: ``direction`` (the batch's ``pred_is_text``) and the ``num_predictors`` / ``predictor_position`` /
    ``text_view`` / ``code_view`` the examples recorded (``batch.view_settings``). For examples that recorded
    nothing (dict rows written by an earlier version, hand-built examples), ``num_predictors`` is checked by
    counting the predictor tokens of each predicting view when ``predictor_ids`` are given.

    Args:
        section: the trainer's ``jepa_args``.
        batch: a collated batch.
        fields: the view fields to compare (those the caller set).
        predictor_ids: ids of ``<|predictor_1|>`` … in the tokenizer's vocabulary.

    Raises:
        ValueError: naming each contradicting field with both values.
    """
    wrong = []
    if "direction" in fields:
        built = "text_to_code" if batch.pred_is_text else "code_to_text"
        if built != section.direction:
            wrong.append(f"direction={section.direction!r} but the batch was built with {built!r}")
    for name in VIEW_SETTINGS:
        if name in fields and name in batch.view_settings and batch.view_settings[name] != getattr(section, name):
            wrong.append(f"{name}={getattr(section, name)!r} but the batch was built with "
                         f"{batch.view_settings[name]!r}")
    if "num_predictors" in fields and "num_predictors" not in batch.view_settings and predictor_ids:
        counts = sorted(set(_predictors_per_row(batch, list(predictor_ids)).tolist()))
        if counts != [section.num_predictors]:
            wrong.append(f"num_predictors={section.num_predictors} but the predicting views of the batch hold "
                         f"{'/'.join(str(c) for c in counts)} predictor token(s)")
    if wrong:
        raise ValueError("jepa_args contradict the data: " + "; ".join(wrong) + ". Build the views with the same "
                         "settings (ViewConfig(num_predictors=..., predictor_position=..., text_view=..., "
                         "direction=..., code_view=...)) as jepa_args")


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
        self.jepa_args = _jepa_section(jepa_args)
        self._view_fields = _given_view_fields(jepa_args)
        self._predictor_ids = _predictor_ids(kwargs.get("processing_class"))
        if args is None or args.remove_unused_columns:
            raise ValueError("JepaTrainer needs TrainingArguments(remove_unused_columns=False): the batches are "
                             "JEPA views, not model.forward arguments, and must not be filtered by column name")
        if data_collator is None:
            tok = kwargs.get("processing_class")
            pad = getattr(tok, "pad_token_id", None)
            if pad is None:
                raise ValueError("JepaTrainer: pass data_collator=JepaDataCollator(pad_token_id, mode=...) or a "
                                 "processing_class (tokenizer) with a pad token")
            data_collator = JepaDataCollator(pad, mode=self.jepa_args.mode)
        elif isinstance(data_collator, JepaDataCollator) and data_collator.mode != self.jepa_args.mode:
            raise ValueError(f"data_collator.mode={data_collator.mode!r} differs from jepa_args.mode="
                             f"{self.jepa_args.mode!r}")
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

    def _loss_scale(self) -> int:
        """× number of processes when counts are global (DDP averages gradients over ranks), as transformers does."""
        return self.accelerator.num_processes if self.args.average_tokens_across_devices else 1

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
            inputs: ``{"jepa_batch": PackedBatch | SeparateBatch}`` from :class:`JepaDataCollator`.
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
        _check_batch(batch)
        check_view_settings(self.jepa_args, batch, self._view_fields, self._predictor_ids)
        batch = batch.to(self.args.device)
        cfg = self.jepa_args
        active = self._jepa_active(model)
        gamma = cfg.vicreg_gamma if cfg.anti_collapse == "vicreg" else None
        with self.accelerator.autocast():
            parts = _call_through(model, lambda m: _jepa_parts(m, batch, active=active, metric=cfg.metric,
                                                               temperature=cfg.temperature,
                                                               gather_negatives=cfg.gather_negatives,
                                                               vicreg_gamma=gamma))
        if num_items_in_batch is None:
            n_lm, n_ex, scale = parts["n_lm"].clamp(min=1), batch.num_examples, 1
            n_reg = max(batch.num_examples, 1)
            self.loss_is_scaled_for_ga = False
        else:
            if self._jepa_counts is None or num_items_in_batch is not self._jepa_counts[0]:
                raise ValueError("num_items_in_batch was not computed by JepaTrainer._get_num_items_in_batch; the "
                                 "JEPA term needs the example count of the accumulated batch too")
            n_lm, n_ex = self._jepa_counts[0].clamp(min=1), self._jepa_counts[1].clamp(min=1)
            n_reg = self._jepa_counts[2].clamp(min=1)
            scale = self._loss_scale()
            self.loss_is_scaled_for_ga = True
        lm = parts["lm_sum"] / n_lm
        loss = cfg.gamma * lm
        jepa = torch.zeros((), device=lm.device)
        if "jepa_sum" in parts:
            jepa = parts["jepa_sum"] / n_ex
            loss = loss + cfg.lam * jepa
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
                    logs["jepa"] = jepa_sum / n_active
                    if self.jepa_args.anti_collapse == "vicreg":
                        logs["vicreg_var"], logs["vicreg_cov"] = var_sum / n_active, cov_sum / n_active
                logs["jepa_steps"] = n_active / len(done)
                self._reset_parts()
        super().log(logs, start_time)
