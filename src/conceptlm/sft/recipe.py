"""SFT recipes: ``train`` (the one loop on an SFTUnit) and ``evaluate`` (batched greedy generation + scoring)."""

from __future__ import annotations

import functools

from conceptlm.core.recipe import fit, make_plan
from conceptlm.core.run import run_session
from conceptlm.core.trainer import TrainResult
from conceptlm.data.batching import collate
from conceptlm.data.sources import build_dataset, corpus_texts
from conceptlm.lm.build import apply_run_lora, build_base_model, build_tokenizer
from conceptlm.lm.config import LMRunConfig
from conceptlm.lm.recipe import generation_eval, load_sources, shards_of
from conceptlm.sft.unit import SFTUnit

__all__ = ["train", "evaluate"]


def train(cfg: LMRunConfig, *, command: str | None = None) -> TrainResult:
    """Train an SFT run end to end (one process or under torchrun)."""
    with run_session(cfg, command) as session:
        train_src, eval_src = load_sources(cfg)
        tokenizer = build_tokenizer(cfg, corpus_texts(train_src), shards=shards_of(train_src, eval_src))
        kw = dict(max_length=cfg.data.max_length, label_mode=cfg.data.label_mode, on_too_long=cfg.data.on_too_long)
        train_ds = build_dataset(train_src, tokenizer, **kw)
        eval_ds = build_dataset(eval_src, tokenizer, **kw) if eval_src is not None else None
        model = build_base_model(cfg, tokenizer)
        plan = make_plan(cfg, session.info, train_ds)  # too little data: an error before anything is written
        session.create_run_dir()  # inputs are valid: only now write anything
        model = apply_run_lora(cfg, model, tokenizer, save_base=session.info.is_main)
        if session.info.is_main:
            tokenizer.save_pretrained(cfg.run_dir / "tokenizer")
        return fit(cfg, session.info, SFTUnit(model), train_ds=train_ds, eval_ds=eval_ds,
                   artifacts={"tokenizer": tokenizer},
                   collate_fn=functools.partial(collate, pad_token_id=tokenizer.pad_token_id),
                   source_name=train_src.identity, plan=plan)


def evaluate(cfg: LMRunConfig, *, checkpoint: str | None = None, output: str | None = None) -> dict:
    """Greedy generation on the eval data, scored with ``generate.scorer``; predictions written to JSONL."""
    return generation_eval(cfg, checkpoint=checkpoint, output=output)
