"""The ``transformers.Trainer`` path's data side: collators (two-view :class:`JepaDataCollator`; STP's lives in
:mod:`conceptlm.jepa.stp_hf`), the parsing of ``jepa_args`` and the check that a trainer's view settings match how
its batches were built (:func:`check_view_settings`). Used by :class:`conceptlm.jepa.hf_trainer.JepaTrainer`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from conceptlm.jepa.config import JepaSection, StpSection
from conceptlm.jepa.packing import (
    CODE_SEGMENT,
    TEXT_SEGMENT,
    VIEW_SETTINGS,
    PackedBatch,
    SeparateBatch,
    collate_packed,
    collate_separate,
)
from conceptlm.jepa.views import JepaExample, predictor_token

__all__ = ["BATCH_KEY", "JepaDataCollator", "check_view_settings", "jepa_section", "given_view_fields",
           "predictor_ids"]

BATCH_KEY = "jepa_batch"
"""Key of the collated :class:`SeparateBatch` / :class:`PackedBatch` (or STP ``StpBatch``) in the dict the collator
returns."""

_MODES = ("packed", "separate")

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



# ------------------------------------------------------------------------------------------------- jepa_args


def jepa_section(jepa_args: JepaSection | Mapping | None) -> JepaSection:
    if jepa_args is None:
        section = JepaSection()
    elif isinstance(jepa_args, JepaSection):
        section = jepa_args
    elif isinstance(jepa_args, Mapping):
        known = {f.name for f in dataclasses.fields(JepaSection)}
        unknown = sorted(set(jepa_args) - known)
        if unknown:
            raise ValueError(f"unknown jepa_args key(s) {unknown}; known: {sorted(known)}")
        kw = dict(jepa_args)
        if isinstance(kw.get("stp"), Mapping):
            stp_known = {f.name for f in dataclasses.fields(StpSection)}
            bad = sorted(set(kw["stp"]) - stp_known)
            if bad:
                raise ValueError(f"unknown jepa_args['stp'] key(s) {bad}; known: {sorted(stp_known)}")
            kw["stp"] = StpSection(**kw["stp"])
        section = JepaSection(**kw)
    else:
        raise TypeError(f"jepa_args must be a conceptlm.jepa.config.JepaSection, a dict of its fields or None, got "
                        f"{type(jepa_args).__name__}")
    section.validate()
    return section


_VIEW_FIELDS = (*VIEW_SETTINGS, "direction")


def given_view_fields(jepa_args: JepaSection | Mapping | None) -> tuple[str, ...]:
    """The view fields the caller set: every one of a JepaSection, the keys of a dict, none for None."""
    if isinstance(jepa_args, JepaSection):
        return _VIEW_FIELDS
    if isinstance(jepa_args, Mapping):
        return tuple(f for f in _VIEW_FIELDS if f in jepa_args)
    return ()


def predictor_ids(tokenizer: Any) -> list[int]:
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
