"""STP batches: collation of :class:`~conceptlm.jepa.stp_data.StpExample` items and the per-step span draw.

:func:`collate_stp` pads the LM sequences (exactly like the NTP arm) and keeps each example's trajectory pieces and
dataset index. :func:`with_stp_targets` then turns the pieces into the tensors the loss needs for one step:

* ``random_span``: ``spans_per_example`` spans per example, each drawn from a generator keyed by
  ``(train.seed, step, example index)`` (:meth:`conceptlm.core.rng.StepRandomness.example_generator`): the same
  span whatever the rank, micro-batch or accumulation split, on resume, and in ``JepaTrainer``; a different one
  every step. Coefficient rows ``coef`` (B, 2R, T) (rest, span per draw) and length weights ``weight`` (B, R);
* ``two_view``: the first and last piece's displacement rows (no randomness);
* ``curvature``: the increment pairs ``pairs`` (B, T).

Examples whose trajectory is too short (N < 2, or one piece for ``two_view``, or no increment pair) get weight 0
and drop out of both the STP sum and its count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from conceptlm.core.rng import StepRandomness
from conceptlm.jepa.config import StpSection
from conceptlm.jepa.packing import PaddedSequences, pad_sequences
from conceptlm.jepa.stp import (
    check_pieces,
    curvature_pairs,
    draw_span,
    length_weight,
    piece_coefficients,
    span_entries,
    trajectory_length,
)
from conceptlm.jepa.stp_data import StpExample

__all__ = ["SPAN_PURPOSE", "StpBatch", "collate_stp", "with_stp_targets"]

SPAN_PURPOSE = "stp-span"
"""The :mod:`conceptlm.core.rng` purpose of the span draws."""


@dataclass
class StpBatch:
    """A collated STP batch (LM rows + trajectories), optionally with one step's targets.

    Attributes:
        lm: the padded LM sequences (:class:`~conceptlm.jepa.packing.PaddedSequences`).
        pieces: per example, its pieces in padded-row coordinates.
        example_ids: (B,) long dataset indices (key of the span draws).
        coef: (B, S, T) float32 displacement coefficients (S = 2R: rest, span per draw; 2 for two_view) or None.
        weight: (B, R) float32 weights (0 = no valid span) or None.
        pairs: (B, T) bool increment pairs (curvature) or None.
        variant: the variant the targets were drawn for (None before :func:`with_stp_targets`).
    """

    lm: PaddedSequences
    pieces: tuple[tuple[tuple[int, int], ...], ...]
    example_ids: torch.Tensor
    coef: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    pairs: torch.Tensor | None = None
    variant: str | None = None

    def to(self, device: torch.device | str) -> StpBatch:
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v.to(device) if isinstance(v, (torch.Tensor, PaddedSequences)) else v
        return StpBatch(**values)

    @property
    def num_examples(self) -> int:
        return self.lm.input_ids.shape[0]

    @property
    def num_lm_targets(self) -> int:
        return self.lm.num_targets

    @property
    def slots(self) -> int:
        return self.lm.slots

    @property
    def real_tokens(self) -> int:
        return self.lm.real_tokens

    def stp_count(self) -> torch.Tensor:
        """What the STP sum is divided by: Σ weights (random_span, two_view) or the number of examples with an
        increment pair (curvature); a 0-d float64 tensor on the batch's device."""
        if self.variant is None:
            raise ValueError("the batch has no STP targets yet (with_stp_targets)")
        if self.variant == "curvature":
            return (self.pairs.sum(-1) > 0).sum().double()
        return self.weight.double().sum()


def collate_stp(examples: Sequence[StpExample], *, pad_token_id: int, padding_side: str = "right",
                pad_to_multiple_of: int | None = None) -> StpBatch:
    """Pad B examples into an :class:`StpBatch` (no targets yet).

    The LM rows are padded by :func:`~conceptlm.jepa.packing.pad_sequences` exactly as the two-view objective's LM
    rows (so λ = 0 is the same computation); left padding shifts the pieces with their row. An example without an
    ``index`` is keyed by its position in the batch.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    for i, ex in enumerate(examples):
        if not isinstance(ex, StpExample):
            raise TypeError(f"batch item {i} is a {type(ex).__name__}, expected an StpExample "
                            "(conceptlm.jepa.stp_data)")
    lm = pad_sequences([ex.lm_ids for ex in examples], pad_token_id=pad_token_id, padding_side=padding_side,
                       labels=[ex.lm_labels for ex in examples], pad_to_multiple_of=pad_to_multiple_of)
    t = lm.input_ids.shape[1]
    shift = [t - len(ex.lm_ids) if padding_side == "left" else 0 for ex in examples]
    pieces = tuple(tuple((a + d, b + d) for a, b in ex.pieces) for ex, d in zip(examples, shift))
    ids = torch.tensor([i if ex.index is None else ex.index for i, ex in enumerate(examples)], dtype=torch.long)
    return StpBatch(lm=lm, pieces=pieces, example_ids=ids)


def with_stp_targets(batch: StpBatch, cfg: StpSection, rng: StepRandomness) -> StpBatch:
    """The batch with one step's STP targets (see the module docstring); tensors on the batch's device.

    Args:
        batch: from :func:`collate_stp` (any device).
        cfg: the ``jepa.stp`` section.
        rng: the step's randomness (``EVAL_STEP`` during evaluation: the same spans at every evaluation).
    """
    b, t = batch.lm.input_ids.shape
    device = batch.lm.input_ids.device
    if cfg.variant == "curvature":
        pairs = torch.stack([curvature_pairs(p, t) for p in batch.pieces])
        return replace(batch, pairs=pairs.to(device), variant=cfg.variant)
    if cfg.variant == "two_view":
        coef = torch.zeros(b, 2, t)
        weight = torch.zeros(b, 1)
        for i, p in enumerate(batch.pieces):
            if len(p) >= 2:
                coef[i] = piece_coefficients(p, t)
                weight[i, 0] = 1.0
        return replace(batch, coef=coef.to(device), weight=weight.to(device), variant=cfg.variant)
    r = cfg.spans_per_example
    weight = [[0.0] * r for _ in range(b)]
    index: list[tuple[int, int, int]] = []
    values: list[float] = []
    for i, (p, key) in enumerate(zip(batch.pieces, batch.example_ids.tolist())):
        n = trajectory_length(p)
        if n < 2:
            continue
        check_pieces(p, t)
        g = rng.example_generator(SPAN_PURPOSE, key)
        for j in range(r):
            s, e = draw_span(n, g, draw=cfg.span_draw, zero_start=cfg.span_zero_start,
                             max_length=cfg.span_max_length)
            for row, pos, value in span_entries(p, s, e):  # = span_coefficients(p, s, e, t), one scatter below
                index.append((i, 2 * j + row, pos))
                values.append(value)
            weight[i][j] = length_weight(n, e - s, cfg.length_weight)
    coef = torch.zeros(b, 2 * r, t)
    if index:
        idx = torch.tensor(index, dtype=torch.long).T
        coef.index_put_((idx[0], idx[1], idx[2]), torch.tensor(values), accumulate=True)
    return replace(batch, coef=coef.to(device), weight=torch.tensor(weight).to(device), variant=cfg.variant)
