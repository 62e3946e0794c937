"""The LCM variants, one module each (model + training unit + next-sentence predictor), and the one place that maps
``lcm.model`` to its training unit (each unit holds its model as ``unit.model``).

- :mod:`~conceptlm.lcm.variants.base`: Base-LCM (MSE regression);
- :mod:`~conceptlm.lcm.variants.two_tower`: Two-Tower diffusion LCM (contextualizer + denoiser);
- :mod:`~conceptlm.lcm.variants.one_tower`: One-Tower diffusion LCM (one interleaved transformer);
- :mod:`~conceptlm.lcm.variants.quant`: Quant-LCM-D / -C over residual codes (:mod:`conceptlm.lcm.rvq`);
- :mod:`~conceptlm.lcm.variants.likelihood`: the Base-LCM trained by the next sentence's token likelihood through a
  frozen decoder (SONAR-LLM).

Every unit takes ``(cfg: LCMSection, *, round_trip=None, model=None)`` (``model``: an existing model to wrap, e.g.
loaded from a checkpoint), trains on :func:`~conceptlm.lcm.sequence.collate_documents` batches, reports
:data:`~conceptlm.lcm.sequence.TEACHER_FORCED_METRICS` (``eval_metrics(batch)``, predictions computed from the
batch) and has ``teacher_forced(batch)`` (normalized predictions aligned with their targets); every model is a
:class:`~conceptlm.lcm.sequence.NormalizedModel` with ``predictor(options)``, so
:func:`~conceptlm.lcm.generate.generate` can continue it. The unit modules are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from conceptlm.lcm.config import LCMSection

if TYPE_CHECKING:
    from conceptlm.core.unit import TrainUnit

__all__ = ["UNITS", "unit_class", "build_unit"]

UNITS = {
    "base": "conceptlm.lcm.variants.base:BaseLCMUnit",
    "two_tower": "conceptlm.lcm.variants.two_tower:TwoTowerUnit",
    "one_tower": "conceptlm.lcm.variants.one_tower:OneTowerUnit",
    "quant_d": "conceptlm.lcm.variants.quant:QuantLCMUnit",
    "quant_c": "conceptlm.lcm.variants.quant:QuantLCMUnit",
    "likelihood": "conceptlm.lcm.variants.likelihood:LikelihoodLCMUnit",
}


def unit_class(model: str) -> type[TrainUnit]:
    """The unit class of ``lcm.model`` (imported on first use)."""
    if model not in UNITS:
        raise ValueError(f"unknown lcm.model {model!r}; one of {', '.join(UNITS)}")
    module, name = UNITS[model].split(":")
    return getattr(importlib.import_module(module), name)


def build_unit(cfg: LCMSection, *, round_trip=None, model=None) -> TrainUnit:
    """A unit for ``cfg.model``: around ``model`` when given (e.g. a loaded checkpoint's), else a fresh one."""
    return unit_class(cfg.model)(cfg, round_trip=round_trip, model=model)
