"""LLM-JEPA recipes: ``train`` on the one loop (``jepa.objective``: the two-view objective, or Semantic Tube
Prediction on chat or plain-text data), ``evaluate`` by greedy generation (see ``analysis`` for the embedding-space
analysis)."""

from __future__ import annotations

import functools
import logging

from conceptlm.core.errors import ConfigError
from conceptlm.core.recipe import fit, make_plan
from conceptlm.core.run import run_session
from conceptlm.core.trainer import TrainResult
from conceptlm.data.sources import Source, corpus_texts
from conceptlm.data.sources import build_dataset as build_lm_dataset
from conceptlm.data.templates import pin_template_date
from conceptlm.jepa.config import JepaConfig, ViewConfig
from conceptlm.jepa.data import JepaDataset
from conceptlm.jepa.packing import collate_packed, collate_separate
from conceptlm.jepa.stp_batch import collate_stp
from conceptlm.jepa.stp_data import StpChatDataset, StpTextDataset
from conceptlm.jepa.stp_unit import StpUnit
from conceptlm.jepa.unit import JepaUnit
from conceptlm.jepa.views import add_predictor_tokens, predictor_token
from conceptlm.lm.build import apply_run_lora, build_base_model, build_tokenizer
from conceptlm.lm.recipe import generation_eval, load_exported_model, load_sources, resolve_checkpoint, shards_of

log = logging.getLogger(__name__)

__all__ = ["train", "evaluate", "view_config", "build_dataset", "build_stp_dataset"]


def view_config(cfg: JepaConfig) -> ViewConfig:
    j = cfg.jepa
    return ViewConfig(num_predictors=j.num_predictors, predictor_position=j.predictor_position,
                      text_view=j.text_view, direction=j.direction, label_mode=cfg.data.label_mode,
                      enc_index_override=j.enc_index_override, code_view=j.code_view)


def build_stp_dataset(cfg: JepaConfig, source: Source, tokenizer) -> StpChatDataset | StpTextDataset:
    """STP examples: chat records (trajectory over the user + assistant contents) or plain-text token blocks."""
    if source.kind == "chat":
        data = source.paths[0] if source.paths else source.records
        return StpChatDataset(data, tokenizer, span_scope=cfg.jepa.stp.span_scope, label_mode=cfg.data.label_mode,
                              max_length=cfg.data.max_length, on_too_long=cfg.data.on_too_long, limit=source.limit,
                              name=source.name)
    if cfg.jepa.stp.variant == "two_view":
        raise ConfigError(f"jepa.stp.variant=two_view needs chat data (a user and an assistant turn); {source.name} "
                          "is plain text (use random_span or curvature)", field="jepa.stp.variant")
    blocks = build_lm_dataset(source, tokenizer, max_length=cfg.data.max_length)
    return StpTextDataset(blocks, source=source.name)


def build_dataset(cfg: JepaConfig, source: Source, tokenizer, *, objective: str | None = None):
    """The training/eval dataset of ``jepa.objective`` (or ``objective``): :class:`JepaDataset` views for
    two_view, STP examples for stp."""
    if (objective or cfg.jepa.objective) == "stp":
        return build_stp_dataset(cfg, source, tokenizer)
    if source.kind != "chat":
        raise ConfigError(f"LLM-JEPA needs paired views (chat JSONL / generated records); {source.name} is plain text "
                          "(jepa.objective=stp trains on plain text)", field="data.train")
    data = source.paths[0] if source.paths else source.records
    return JepaDataset(data, tokenizer, view_config(cfg), max_length=cfg.data.max_length,
                       on_too_long=cfg.data.on_too_long, limit=source.limit,
                       name=source.name)


def collate_fn(cfg: JepaConfig, tokenizer, *, objective: str | None = None):
    if (objective or cfg.jepa.objective) == "stp":
        return functools.partial(collate_stp, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8)
    fn = collate_packed if cfg.jepa.mode == "packed" else collate_separate
    return functools.partial(fn, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8)


def train(cfg: JepaConfig, *, command: str | None = None) -> TrainResult:
    """Train LM + λ·JEPA (or λ·STP) end to end (one process or torchrun; full fine-tuning, LoRA, or from scratch)."""
    stp = cfg.jepa.objective == "stp"
    with run_session(cfg, command) as session:
        if (not stp and cfg.jepa.mode == "packed" and cfg.model.attn_implementation == "flex_attention"
                and session.info.device.type == "cpu"):
            raise ConfigError("flex_attention has no CPU backward in PyTorch; on CPU train packed mode with sdpa or "
                              "eager (flex_attention is the CUDA path for long sequences)",
                              field="model.attn_implementation")
        k = cfg.jepa.num_predictors
        train_src, eval_src = load_sources(cfg)
        preds = [predictor_token(i) for i in range(1, k + 1)]
        # pinned to tokenizer.template_date by build_tokenizer, saved with the tokenizer: eval renders alike
        tokenizer = build_tokenizer(cfg, corpus_texts(train_src), extra_special_tokens=preds,
                                    shards=shards_of(train_src, eval_src))
        add_predictor_tokens(tokenizer, None, k)  # a loaded tokenizer gets them here; the model is resized below
        train_ds = build_dataset(cfg, train_src, tokenizer)
        eval_ds = build_dataset(cfg, eval_src, tokenizer) if eval_src is not None else None
        model = build_base_model(cfg, tokenizer)  # sized to (or resized to) the tokenizer
        plan = make_plan(cfg, session.info, train_ds)  # too little data: an error before anything is written
        session.create_run_dir()
        model = apply_run_lora(cfg, model, tokenizer, save_base=session.info.is_main)
        if session.info.is_main:
            tokenizer.save_pretrained(cfg.run_dir / "tokenizer")
        if stp:
            unit = StpUnit(model, cfg.jepa, seed=cfg.train.seed, max_steps=cfg.train.max_steps)
        else:
            unit = JepaUnit(model, cfg.jepa, seed=cfg.train.seed)
        return fit(cfg, session.info, unit, train_ds=train_ds, eval_ds=eval_ds,
                   collate_fn=collate_fn(cfg, tokenizer), artifacts={"tokenizer": tokenizer},
                   source_name=train_src.identity, plan=plan)


def evaluate(cfg: JepaConfig, *, checkpoint: str | None = None, output: str | None = None) -> dict:
    """Greedy generation on the eval data, scored with ``generate.scorer``."""
    return generation_eval(cfg, checkpoint=checkpoint, output=output)


def analyze(cfg: JepaConfig, *, checkpoint: str | None = None, output: str | None = None) -> dict:
    """Export Enc(Text)/Enc(Code) of the eval split (train split if there is none) and analyse them."""
    from conceptlm.core.run import prepare_run
    from conceptlm.jepa.analysis import analyze_embeddings, encode_views

    info = prepare_run(cfg)
    model_dir = resolve_checkpoint(cfg, checkpoint)
    model, tokenizer = load_exported_model(model_dir)
    pin_template_date(tokenizer, cfg.tokenizer.template_date)
    n_vocab = len(tokenizer)
    add_predictor_tokens(tokenizer, model, cfg.jepa.num_predictors)  # a no-op for a model trained here
    if len(tokenizer) != n_vocab:
        log.info("%s has no predictor tokens: added %d with mean-initialised embeddings (the state a JEPA run "
                 "starts from)", model_dir, len(tokenizer) - n_vocab)
    model = model.to(info.device)
    train_src, eval_src = load_sources(cfg)
    src = eval_src or train_src
    # an STP run is analysed on the two-view embeddings of its chat data (the paper's SVD of Enc(Text) - Enc(Code))
    ds = build_dataset(cfg, src, tokenizer, objective="two_view")
    enc_text, enc_code = encode_views(model, ds, collate_fn(cfg, tokenizer, objective="two_view"),
                                      batch_size=cfg.train.eval_batch_size)
    out_dir = output or (cfg.run_dir / "analysis")
    j = cfg.jepa
    summary = analyze_embeddings(enc_text, enc_code, out_dir, label=f"({src.name})", metric=j.metric,
                                 temperature=j.temperature, pred_is_text=j.direction == "text_to_code")
    summary.pop("top_singular_values")
    summary.update({"checkpoint": str(model_dir), "split": src.name, "out_dir": str(out_dir)})
    return summary
