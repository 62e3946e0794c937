"""Recipe building blocks shared by every method: data sources, the trainer wiring, checkpoint lookup, and
generation evaluation. A method recipe only builds its unit, its dataset and its collate function."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conceptlm.core import hf
from conceptlm.core.checkpoint import find_latest_checkpoint
from conceptlm.core.config import BaseRunConfig
from conceptlm.core.distributed import DistInfo
from conceptlm.core.errors import ConfigError
from conceptlm.core.trainer import Trainer, TrainResult
from conceptlm.core.unit import TrainUnit

__all__ = ["load_sources", "fit", "resolve_checkpoint", "generation_eval"]

log = logging.getLogger(__name__)


def load_sources(cfg: BaseRunConfig):
    """(train Source, eval Source or None) for the config's data section.

    With ``generate:`` training data and no ``data.eval``, the generator's disjoint test split is the eval set.
    """
    from conceptlm.data.sources import resolve_source

    d = cfg.data
    gen = {"train_size": d.generator_train_size, "test_size": d.generator_test_size, "seed": d.generator_seed}
    train_src = resolve_source(d.train, split="train", fmt=d.format, limit=d.limit_train, generator=gen)
    eval_spec = d.eval if d.eval is not None else (d.train if d.train.startswith("generate:") else None)
    eval_src = None
    if eval_spec is not None:
        eval_src = resolve_source(eval_spec, split="test", fmt=d.format, limit=d.limit_eval, generator=gen,
                                  field="data.eval")
    return train_src, eval_src


def fit(cfg: BaseRunConfig, info: DistInfo, unit: TrainUnit, *, train_ds, eval_ds, collate_fn: Callable[[list], Any],
        tokenizer, source_name: str) -> TrainResult:
    """Length-bucketed batch plan over ``train_ds`` (its ``.lengths``), eval batches, and the one loop."""
    from conceptlm.data.batching import BatchPlan
    from conceptlm.data.sources import eval_batches, step_batches

    t = cfg.train
    plan = BatchPlan(train_ds.lengths, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                     world_size=info.world_size, rank=info.rank, seed=t.seed)
    if info.is_main:
        model = unit.hf_model
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in unit.parameters() if p.requires_grad)
        log.info("model: %.2fM params (%.2fM trainable); train examples %d (%d steps/epoch, %.1f epochs); eval %s",
                 n_params / 1e6, n_train / 1e6, len(train_ds), plan.steps_per_epoch,
                 t.max_steps / plan.steps_per_epoch, len(eval_ds) if eval_ds is not None else "none")
    data_state = {"train": source_name, "n": len(train_ds), "global_batch": plan.global_batch_size, "seed": t.seed}
    evals = None
    if eval_ds is not None:
        evals = eval_batches(eval_ds, batch_size=t.eval_batch_size, rank=info.rank, world_size=info.world_size,
                             collate_fn=collate_fn)
    trainer = Trainer(unit, cfg, info, train_batches=step_batches(train_ds, plan, collate_fn), eval_batches=evals,
                      tokenizer=tokenizer, data_state=data_state)
    return trainer.fit()


def resolve_checkpoint(cfg: BaseRunConfig, checkpoint: str | None) -> Path:
    """The HF model dir of an explicit checkpoint (or model) dir, or of the run's latest checkpoint."""
    if checkpoint:
        p = Path(checkpoint)
        model_dir = p / "model" if (p / "model").is_dir() else p
        if not model_dir.is_dir():
            raise ConfigError(f"checkpoint not found: {checkpoint}", field="checkpoint")
        return model_dir
    latest = find_latest_checkpoint(cfg.run_dir)
    if latest is None:
        raise ConfigError(f"no checkpoint in {cfg.run_dir}; train first or pass --checkpoint DIR",
                          field="checkpoint")
    return latest / "model"


def generation_eval(cfg: BaseRunConfig, *, checkpoint: str | None = None, output: str | None = None,
                    split: str = "test") -> dict:
    """Greedy generation on the eval data with ``generate.scorer``; predictions JSONL in the run folder."""
    from conceptlm.core.run import prepare_run
    from conceptlm.eval.generation import evaluate_generation

    info = prepare_run(cfg)
    model_dir = resolve_checkpoint(cfg, checkpoint)
    model = hf.load_causal_lm(model_dir).to(info.device)
    tokenizer = hf.load_tokenizer(model_dir)
    _, eval_src = load_sources(cfg)
    if eval_src is None or eval_src.kind != "chat":
        raise ConfigError("evaluation needs chat data: set data.eval to a chat JSONL file", field="data.eval")
    from conceptlm.data.sources import chat_records

    g = cfg.generate
    records = chat_records(eval_src)
    records = records[: g.limit] if g.limit else records
    out = Path(output) if output else cfg.run_dir / f"predictions_{split}.jsonl"
    result = evaluate_generation(model, tokenizer, records, scorer=g.scorer, batch_size=g.batch_size,
                                 max_new_tokens=g.max_new_tokens, output=out)
    result["checkpoint"] = str(model_dir)
    return result
