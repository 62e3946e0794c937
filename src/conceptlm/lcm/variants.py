"""One place that maps ``lcm.model`` to its training unit (each unit holds its model as ``unit.model``).

Every unit takes ``(cfg: LCMSection, *, round_trip=None)``, trains on :func:`~conceptlm.lcm.unit.collate_documents`
batches, reports :data:`~conceptlm.lcm.unit.TEACHER_FORCED_METRICS` and has ``teacher_forced(batch)`` (normalized
predictions aligned with their targets); every model is a :class:`~conceptlm.lcm.model.NormalizedModel` that
:func:`~conceptlm.lcm.generate.generate` can continue.
"""

from __future__ import annotations

import importlib

from conceptlm.core.unit import TrainUnit
from conceptlm.lcm.config import LCMSection

__all__ = ["UNITS", "unit_class", "build_unit"]

UNITS = {
    "base": "conceptlm.lcm.unit:BaseLCMUnit",
    "two_tower": "conceptlm.lcm.two_tower:TwoTowerUnit",
    "one_tower": "conceptlm.lcm.one_tower:OneTowerUnit",
    "quant_d": "conceptlm.lcm.quant_lcm:QuantLCMUnit",
    "quant_c": "conceptlm.lcm.quant_lcm:QuantLCMUnit",
}


def unit_class(model: str) -> type[TrainUnit]:
    """The unit class of ``lcm.model`` (imported on first use)."""
    if model not in UNITS:
        raise ValueError(f"unknown lcm.model {model!r}; one of {', '.join(UNITS)}")
    module, name = UNITS[model].split(":")
    return getattr(importlib.import_module(module), name)


def build_unit(cfg: LCMSection, *, round_trip=None) -> TrainUnit:
    """A fresh unit for ``cfg.model``."""
    return unit_class(cfg.model)(cfg, round_trip=round_trip)
