"""SFT recipes: ``train`` (the one loop on an SFTUnit) and ``evaluate`` (batched greedy generation + scoring)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from conceptlm.core import hf
from conceptlm.core.build import build_model, build_tokenizer
from conceptlm.core.checkpoint import find_latest_checkpoint
from conceptlm.core.config import BaseRunConfig
from conceptlm.core.distributed import cleanup_distributed
from conceptlm.core.errors import ConfigError
from conceptlm.core.run import create_run_dir, prepare_run
from conceptlm.core.trainer import Trainer, TrainResult
from conceptlm.data.batching import BatchPlan, collate
from conceptlm.data.sources import build_dataset, corpus_texts, eval_batches, resolve_source, step_batches
from conceptlm.sft.unit import SFTUnit

__all__ = ["train", "evaluate", "load_sources"]

log = logging.getLogger(__name__)


def load_sources(cfg: BaseRunConfig):
    """(train Source, eval Source or None) for the config's data section."""
    d = cfg.data
    gen = {"train_size": d.generator_train_size, "test_size": d.generator_test_size, "seed": d.generator_seed}
    train_src = resolve_source(d.train, split="train", fmt=d.format, limit=d.limit_train, generator=gen)
    eval_spec = d.eval if d.eval is not None else (d.train if d.train.startswith("generate:") else None)
    eval_src = None
    if eval_spec is not None:
        eval_src = resolve_source(eval_spec, split="test", fmt=d.format, limit=d.limit_eval, generator=gen,
                                  field="data.eval")
    return train_src, eval_src


def train(cfg: BaseRunConfig, *, command: str | None = None) -> TrainResult:
    """Train an SFT run end to end (works under torchrun). Returns the trainer's result."""
    info = prepare_run(cfg)
    try:
        train_src, eval_src = load_sources(cfg)
        tokenizer = build_tokenizer(cfg, corpus_texts(train_src))
        kw = dict(max_length=cfg.data.max_length, label_mode=cfg.data.label_mode,
                  on_too_long=cfg.data.on_too_long)
        train_ds = build_dataset(train_src, tokenizer, **kw)
        eval_ds = build_dataset(eval_src, tokenizer, **kw) if eval_src is not None else None
        create_run_dir(cfg, info, command=command)  # inputs are valid: only now write anything
        model = build_model(cfg, tokenizer, save_base=info.is_main)
        if info.is_main:
            tokenizer.save_pretrained(cfg.run_dir / "tokenizer")
        t = cfg.train
        plan = BatchPlan(train_ds.lengths, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                         world_size=info.world_size, rank=info.rank, seed=t.seed)
        coll = functools.partial(collate, pad_token_id=tokenizer.pad_token_id)
        unit = SFTUnit(model)
        if info.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log.info("model: %.2fM params (%.2fM trainable); train examples %d (%d steps/epoch); eval %s",
                     n_params / 1e6, n_train / 1e6, len(train_ds), plan.steps_per_epoch,
                     len(eval_ds) if eval_ds is not None else "none")
        data_state = {"train": train_src.name, "n": len(train_ds), "global_batch": plan.global_batch_size,
                      "seed": t.seed}
        trainer = Trainer(
            unit, cfg, info, train_batches=step_batches(train_ds, plan, coll),
            eval_batches=eval_batches(eval_ds, batch_size=t.eval_batch_size, rank=info.rank,
                                      world_size=info.world_size, collate_fn=coll) if eval_ds is not None else None,
            tokenizer=tokenizer, data_state=data_state)
        return trainer.fit()
    finally:
        cleanup_distributed()


def resolve_checkpoint(cfg: BaseRunConfig, checkpoint: str | None) -> Path:
    """An explicit checkpoint dir, or the latest checkpoint of ``cfg``'s run folder."""
    if checkpoint:
        p = Path(checkpoint)
        model_dir = p / "model" if (p / "model").is_dir() else p
        if not model_dir.is_dir():
            raise ConfigError(f"checkpoint not found: {checkpoint}", field="checkpoint")
        return model_dir
    latest = find_latest_checkpoint(cfg.run_dir)
    if latest is None:
        raise ConfigError(f"no checkpoint in {cfg.run_dir}; train first or pass checkpoint=DIR", field="checkpoint")
    return latest / "model"


def evaluate(cfg: BaseRunConfig, *, checkpoint: str | None = None, split: str = "test",
             output: str | None = None) -> dict:
    """Greedy generation on the eval data with the configured scorer; predictions written to JSONL."""
    from conceptlm.eval.generation import evaluate_generation

    prepare_run(cfg)
    model_dir = resolve_checkpoint(cfg, checkpoint)
    model = hf.load_causal_lm(model_dir)
    tokenizer = hf.load_tokenizer(model_dir)
    _, eval_src = load_sources(cfg)
    if eval_src is None or eval_src.kind != "chat":
        raise ConfigError("evaluation needs chat data: set data.eval to a chat JSONL file", field="data.eval")
    g = cfg.generate
    records = eval_src.records[: g.limit] if g.limit else eval_src.records
    out = Path(output) if output else cfg.run_dir / f"predictions_{split}.jsonl"
    result = evaluate_generation(model, tokenizer, records, scorer=g.scorer, batch_size=g.batch_size,
                                 max_new_tokens=g.max_new_tokens, output=out)
    result["checkpoint"] = str(model_dir)
    return result
