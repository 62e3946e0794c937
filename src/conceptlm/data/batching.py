"""Dynamic padding (``collate``) and padding statistics. Which examples a step gets is
:class:`conceptlm.core.sampling.BatchPlan`'s business."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["collate", "padding_stats"]


def collate(examples: Sequence[dict], *, pad_token_id: int, padding_side: str = "right",
            pad_to_multiple_of: int | None = 8) -> dict[str, torch.Tensor]:
    """Pad a list of examples to the longest one (rounded up to ``pad_to_multiple_of``).

    Args:
        examples: dicts with ``input_ids`` and ``labels`` (lists of equal length).
        pad_token_id: id written into padded ``input_ids`` slots.
        padding_side: ``"right"`` (training) or ``"left"`` (generation).
        pad_to_multiple_of: round the padded length up to a multiple of this (``None`` = no rounding).

    Returns:
        ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long with 1 on real tokens, ``labels`` (B, T) long
        with -100 on padding.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; give the tokenizer a pad token")
    if not examples:
        raise ValueError("cannot collate an empty batch")
    for i, ex in enumerate(examples):
        if len(ex["input_ids"]) != len(ex["labels"]):
            raise ValueError(f"example {i}: input_ids has {len(ex['input_ids'])} tokens, labels {len(ex['labels'])}")
    longest = max(len(ex["input_ids"]) for ex in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    b = len(examples)
    input_ids = torch.full((b, longest), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((b, longest), dtype=torch.long)
    labels = torch.full((b, longest), -100, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        cols = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        input_ids[i, cols] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[i, cols] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[i, cols] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def padding_stats(micro_batches, *, pad_to_multiple_of: int | None = None) -> dict:
    """Padding cost of a list of micro-batches.

    Args:
        micro_batches: each either a list of sequence lengths or a collated batch (a dict with ``attention_mask``
            (B, T)).
        pad_to_multiple_of: rounding of the padded length, for micro-batches given as lengths.

    Returns:
        ``{"real_tokens", "total_slots", "pad_tokens", "padding_ratio"}``; ratio = pad_tokens / total_slots.
    """
    real = total = 0
    for mb in micro_batches:
        if isinstance(mb, dict):
            mask = mb["attention_mask"]
            real += int(mask.sum())
            total += mask.numel()
            continue
        lens = [int(n) for n in mb]
        if not lens:
            continue
        longest = max(lens)
        if pad_to_multiple_of:
            longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        real += sum(lens)
        total += longest * len(lens)
    return {"real_tokens": real, "total_slots": total, "pad_tokens": total - real,
            "padding_ratio": (total - real) / total if total else 0.0}
