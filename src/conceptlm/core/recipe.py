"""The trainer wiring every method's ``train`` recipe shares: a batch plan over any dataset, eval batches, the
parameter log line and the one loop. A method recipe only builds its unit, its datasets and its collate function."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from conceptlm.core.config import RunConfig
from conceptlm.core.distributed import DistInfo
from conceptlm.core.sampling import BatchPlan, eval_batches, step_batches
from conceptlm.core.trainer import Trainer, TrainResult
from conceptlm.core.unit import TrainUnit

__all__ = ["fit", "make_plan", "parameter_summary"]

log = logging.getLogger(__name__)


def parameter_summary(unit: TrainUnit) -> dict[str, int]:
    """Parameter counts: ``total`` (unique tensors), ``trainable``, and ``frozen`` (in ``unit.frozen_modules()``,
    not trained and not checkpointed)."""
    named = dict(unit.named_modules())
    frozen = {id(p) for n in unit.frozen_modules() for p in named[n].parameters()}
    params = list(unit.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "frozen": sum(p.numel() for p in params if id(p) in frozen)}


def make_plan(cfg: RunConfig, info: DistInfo, train_ds) -> BatchPlan:
    """The batch plan of a run over ``train_ds`` (bucketed by its ``.lengths`` when it has them).

    Raises ``ConfigError`` when the data cannot fill one global batch: recipes call it before creating the run
    folder, so that error leaves nothing behind.
    """
    t = cfg.train
    lengths = getattr(train_ds, "lengths", None)
    lengths = list(lengths) if lengths is not None else [1] * len(train_ds)
    return BatchPlan(lengths, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                     world_size=info.world_size, rank=info.rank, seed=t.seed)


def fit(cfg: RunConfig, info: DistInfo, unit: TrainUnit, *, train_ds, eval_ds=None,
        collate_fn: Callable[[list], Any], source_name: str, artifacts: dict[str, Any] | None = None,
        on_eval: Callable[[int], dict[str, float]] | None = None, plan: BatchPlan | None = None) -> TrainResult:
    """Length-bucketed batch plan over ``train_ds`` (by its ``.lengths`` when it has them), eval batches, the loop.

    Args:
        train_ds / eval_ds: datasets with ``__len__`` and ``__getitem__`` (eval optional).
        collate_fn: list of dataset items -> batch.
        source_name: names the training data in the checkpoint's data state (checked on resume).
        artifacts: saved with every checkpoint (see :class:`~conceptlm.core.trainer.Trainer`).
        plan: from :func:`make_plan` (built here when not given).
    """
    t = cfg.train
    plan = plan if plan is not None else make_plan(cfg, info, train_ds)
    if info.is_main:
        p = parameter_summary(unit)
        frozen = f", {p['frozen'] / 1e6:.2f}M frozen" if p["frozen"] else ""
        log.info("unit %s: %.2fM params (%.2fM trainable%s); train examples %d (%d steps/epoch, %.1f epochs); "
                 "eval %s", type(unit).__name__, p["total"] / 1e6, p["trainable"] / 1e6, frozen, len(train_ds),
                 plan.steps_per_epoch, t.max_steps / plan.steps_per_epoch,
                 len(eval_ds) if eval_ds is not None else "none")
    data_state = {"train": source_name, "n": len(train_ds), "global_batch": plan.global_batch_size, "seed": t.seed}
    evals = None
    if eval_ds is not None:
        evals = eval_batches(eval_ds, batch_size=t.eval_batch_size, rank=info.rank, world_size=info.world_size,
                             collate_fn=collate_fn)
    trainer = Trainer(unit, cfg, info, train_batches=step_batches(train_ds, plan, collate_fn), eval_batches=evals,
                      artifacts=artifacts, data_state=data_state, on_eval=on_eval)
    return trainer.fit()
