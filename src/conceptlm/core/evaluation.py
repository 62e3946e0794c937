"""Evaluation of a unit over eval batches: the one path the trainer's periodic evaluation and the recipes share.

:func:`evaluate_unit` runs a :class:`~conceptlm.core.unit.TrainUnit` in eval mode over batches and returns the
``(sum, count)`` accumulations of its loss parts and metrics (:class:`EvalSums`), reduced over ranks;
:meth:`EvalSums.means` turns them into the logged values (every part and metric as ``sum / count``, plus the
weighted total as ``loss``). Per batch ``j``:

1. ``unit.step_rng = rng(j)`` (the trainer keys it by the eval batch index: ``step = EVAL_STEP``, so every evaluation
   draws the same numbers);
2. ``b = unit.prepare(to_device(batch))``, then, when loss parts are evaluated, ``unit.counts(b)`` and
   ``module(b)`` (``module``: the unit itself, or the FSDP-wrapped unit);
3. ``unit.eval_metrics(b)``: the unit's evaluation-only metrics (it computes what it needs from the batch itself).

A loss part with no items in a batch contributes nothing (its value may be nan); that is decided on the device, so
evaluation does not sync with the host per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from conceptlm.core.distributed import all_reduce_sum
from conceptlm.core.rng import StepRandomness
from conceptlm.core.step_sums import SumAccumulator, autocast_context, count_vector, to_device
from conceptlm.core.unit import TrainUnit

__all__ = ["EvalSums", "evaluate_unit"]


@dataclass
class EvalSums:
    """Sums over the eval set (all ranks): ``parts[k]`` = sum of loss part ``k`` over its ``counts[k]`` items,
    ``metrics[m] = (sum, count)``."""

    parts: dict[str, float]
    counts: dict[str, float]
    metrics: dict[str, tuple[float, float]]

    def means(self, loss_weights: dict[str, float]) -> dict[str, float]:
        """``{"loss": sum_k w_k mean_k, part: mean, ..., metric: mean, ...}`` (entries without items left out)."""
        res = {k: s / self.counts[k] for k, s in self.parts.items() if self.counts[k] > 0}
        if res:
            res = {"loss": sum(loss_weights[k] * v for k, v in res.items()), **res}
        res.update({m: s / c for m, (s, c) in self.metrics.items() if c > 0})
        return res


@torch.no_grad()
def evaluate_unit(unit: TrainUnit, batches: Iterable[Any], *, device: torch.device, precision: str = "fp32",
                  parts: list[str] | None = None, metric_names: list[str] | None = None,
                  module: torch.nn.Module | None = None,
                  rng: Callable[[int], StepRandomness] | None = None) -> EvalSums:
    """Run ``unit`` over ``batches`` in eval mode (module docstring) and return the sums.

    Args:
        unit: the plain unit (its ``prepare`` / ``counts`` / ``eval_metrics`` are called).
        batches: this rank's eval batches (the same number on every rank).
        device: where batches go.
        precision: ``train.precision`` (bf16 autocast as in training).
        parts: loss parts to evaluate (default: ``sorted(unit.loss_weights)``); ``[]`` = metrics only (no
            ``counts`` / forward pass).
        metric_names: metrics reported (default: ``sorted(unit.metric_names)``).
        module: what the forward pass calls (default ``unit``; under FSDP the sharded module).
        rng: ``j -> StepRandomness`` set as ``unit.step_rng`` before batch ``j`` (None: ``step_rng`` stays None).
    """
    parts = sorted(unit.loss_weights) if parts is None else list(parts)
    metric_names = sorted(getattr(unit, "metric_names", ())) if metric_names is None else list(metric_names)
    module = unit if module is None else module
    owner = type(unit).__name__
    acc = SumAccumulator(parts, metric_names, device)
    counts = torch.zeros(len(parts), dtype=torch.float64, device=device)
    was_training = module.training
    module.eval()
    try:
        for j, b in enumerate(batches):
            unit.step_rng = rng(j) if rng is not None else None
            b = to_device(b, device)
            with autocast_context(precision, device):
                b = unit.prepare(b)
                if parts:
                    c = count_vector(unit.counts(b), parts, device)
                    out = module(b)
                extra = unit.eval_metrics(b)
            if parts:
                present = torch.tensor([k in out for k in parts], device=device)
                live = (c > 0) & present
                acc.add({k: (torch.where(live[parts.index(k)], v.detach().double(), 0.0) if k in parts else v)
                         for k, v in out.items()}, owner)
                counts += torch.where(live, c, 0.0)
            acc.add(extra, owner)
    finally:
        unit.step_rng = None
        module.train(was_training)
    counts = counts.cpu()
    all_reduce_sum(counts)
    sums = acc.reduce()
    return EvalSums(parts={k: sums[k] for k in parts}, counts={k: counts[i].item() for i, k in enumerate(parts)},
                    metrics={m: sums[m] for m in metric_names})
