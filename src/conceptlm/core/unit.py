"""The contract between a method and the one training loop.

A method supplies a :class:`TrainUnit`: any ``nn.Module`` whose ``forward(batch)`` returns, for each named loss part,
the SUM of that part over its items (tokens for an LM loss, examples for an embedding loss), and whose
``counts(batch)`` says how many items each part sums over.

The trainer adds the counts over all micro-batches of an optimizer step and over all ranks, and back-propagates
``sum_k weight_k * part_k / global_count_k``. The gradient is therefore that of the global mean of every part, no
matter how the global batch is split into micro-batches and ranks (micro 8 x accum 1 == micro 2 x accum 4 ==
2 ranks x micro 4).

Beyond the loss parts a unit may:

- report **metrics**: entries of ``forward``'s output whose key is not a loss part, as ``(sum, count)`` pairs
  (e.g. ``{"fvu": (sse, n_rows)}``), and extra evaluation-only metrics from :meth:`TrainUnit.eval_metrics`; they are
  reduced over micro-batches and ranks like the loss parts and logged as ``sum / count``;
- **prepare** a batch on the device before ``counts`` (e.g. labels computed by a frozen teacher);
- hold **frozen modules that are not checkpointed** (:meth:`TrainUnit.frozen_modules`, e.g. a teacher rebuilt from
  its own path on resume), choose its **FSDP units** (:meth:`TrainUnit.fsdp_units`) and provide an **export**
  (e.g. a Hugging Face ``save_pretrained`` folder, :meth:`TrainUnit.export`);
- draw **randomness** from ``self.step_rng`` (a :class:`~conceptlm.core.rng.StepRandomness` the trainer sets before
  every micro-batch and evaluation batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from conceptlm.core.rng import StepRandomness

__all__ = ["TrainUnit", "THROUGHPUT_KEY", "homogeneous_stacks"]

THROUGHPUT_KEY = "tokens"
"""Optional key of ``counts``: items processed (for throughput, logged as ``{throughput_unit}_per_s``); never a
loss part or metric name."""


class TrainUnit(nn.Module):
    """Base class of method units. Subclasses set ``loss_weights`` and implement ``counts`` and ``forward``.

    Attributes:
        loss_weights: ``{part: weight}``; the optimised loss is ``sum_k weight_k * mean_k``.
        throughput_unit: what ``counts()[THROUGHPUT_KEY]`` counts (tokens, sentences, windows, ...).
        step_rng: set by the trainer before each forward (``None`` outside the trainer).
    """

    loss_weights: dict[str, float]
    throughput_unit: str = "tokens"
    step_rng: StepRandomness | None = None

    def counts(self, batch: Any) -> dict[str, int | torch.Tensor]:
        """Items each loss part sums over in ``batch`` (plus optionally ``THROUGHPUT_KEY``).

        Called on the output of :meth:`prepare` (on the device); ints or 0-d tensors.
        """
        raise NotImplementedError

    def forward(self, batch: Any) -> dict[str, Any]:
        """``{part: sum over its items}`` (scalar tensors with gradients) plus ``{metric: (sum, count)}``."""
        raise NotImplementedError

    def prepare(self, batch: Any) -> Any:
        """Run per micro-batch on the device before ``counts`` (default: identity). No gradients are recorded."""
        return batch

    def eval_metrics(self, batch: Any) -> dict[str, tuple[Any, Any]]:
        """Evaluation-only ``{metric: (sum, count)}`` for one eval batch (default: none)."""
        return {}

    def begin_step(self, step: int) -> None:
        """Called once at the start of every optimizer step (e.g. to draw a seeded per-step decision)."""

    # ----------------------------------------------------------------------------------------- structure
    def frozen_modules(self) -> list[str]:
        """Names (as in ``named_modules``) of frozen sub-modules that are neither trained nor checkpointed."""
        return []

    def fsdp_units(self) -> list[nn.Module]:
        """Sub-modules FSDP shards one by one: by default every layer of every homogeneous stack with trainable
        parameters (the root is sharded last)."""
        skip = tuple(n + "." for n in self.frozen_modules())
        return [layer for name, stack in homogeneous_stacks(self) if not (name + ".").startswith(skip)
                for layer in stack if any(p.requires_grad for p in layer.parameters())]

    def export(self, directory: Path, state_dict: dict[str, torch.Tensor], artifacts: dict[str, Any]) -> bool:
        """Write an interoperable copy of the model (e.g. ``save_pretrained``) into ``directory``.

        Args:
            state_dict: the unit's full state dict (gathered on CPU, also under FSDP).
            artifacts: the run's artefacts (e.g. ``{"tokenizer": tok}``).

        Returns:
            Whether anything was written (the default writes nothing).
        """
        return False


def homogeneous_stacks(module: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every ``nn.ModuleList`` (with parameters) whose entries share one type, outermost first; a stack nested in a
    layer of an earlier stack is not listed again."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, m in module.named_modules():
        if not (isinstance(m, nn.ModuleList) and len(m) > 0 and all(type(x) is type(m[0]) for x in m)):
            continue
        if not any(p.numel() for p in m[0].parameters()):
            continue
        if any(name.startswith(prev + ".") for prev, _ in found):
            continue
        found.append((name, m))
    return found
