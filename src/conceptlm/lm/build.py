"""Build the tokenizer and Hugging Face model a run config asks for (local directories or tiny from-config models)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from conceptlm.core import hf
from conceptlm.core.errors import ConfigError
from conceptlm.core.tokenizer import train_bpe_tokenizer
from conceptlm.data.templates import pin_template_date
from conceptlm.lm.config import LMRunConfig

__all__ = ["build_tokenizer", "build_model", "build_base_model", "apply_run_lora"]

log = logging.getLogger(__name__)


def build_tokenizer(cfg: LMRunConfig, corpus: Iterable[str], *, extra_special_tokens: Sequence[str] = (),
                    shards: Sequence = ()):
    """``tokenizer.path`` > ``model.path`` > a byte-level BPE trained on ``corpus`` (saved with the run).

    The tokenizer's chat template sees ``tokenizer.template_date`` (:func:`~conceptlm.data.templates.pin_template_date`;
    kept by ``save_pretrained``), so every tokenizer built from a config renders the same tokens on any day.

    ``shards``: the :class:`~conceptlm.data.shards.TokenShards` the run reads. Their tokenizer is the run's when
    neither ``tokenizer.path`` nor ``model.path`` is set; else the one those name must be the one the shards were
    made with (same :func:`~conceptlm.data.shards.tokenizer_fingerprint`), or the run is refused with one line.
    """
    path = cfg.tokenizer.path or cfg.model.path
    if shards and not path:
        tok = shards[0].load_tokenizer()
        _check_shard_tokenizer(tok, shards, str(shards[0].path / "tokenizer"), "data.eval")
        hf.ensure_pad_token(tok)
    elif path:
        tok = hf.load_tokenizer(path)
        _check_shard_tokenizer(tok, shards, path, "tokenizer.path" if cfg.tokenizer.path else "model.path")
        if tok.chat_template is None:
            log.warning("%s has no chat template; chat data needs one", path)
        hf.ensure_pad_token(tok)
    else:
        tok = train_bpe_tokenizer(corpus, vocab_size=cfg.tokenizer.vocab_size,
                                  extra_special_tokens=list(extra_special_tokens))
    pin_template_date(tok, cfg.tokenizer.template_date)
    return tok


def _check_shard_tokenizer(tok, shards: Sequence, where: str, field: str) -> None:
    """ConfigError (on ``field``) unless every shard folder was made with ``tok`` (loaded from ``where``)."""
    if not shards:
        return
    from conceptlm.data.shards import tokenizer_fingerprint

    fp = tokenizer_fingerprint(tok)
    for s in shards:
        if s.tokenizer_fingerprint != fp:
            raise ConfigError(f"{s.path} was tokenized with another tokenizer than {where} (fingerprint "
                              f"{s.tokenizer_fingerprint[:12]} vs {fp[:12]}); unset tokenizer.path and model.path to "
                              f"use the shards' own, or tokenize again with tokenizer={where}", field=field)


def build_model(cfg: LMRunConfig, tokenizer, *, save_base: bool = True):
    """Load ``model.path`` or build a tiny ``model.arch`` sized to the tokenizer; seeded by ``train.seed``;
    LoRA applied when ``model.lora.enabled`` (= :func:`build_base_model` then :func:`apply_run_lora`)."""
    return apply_run_lora(cfg, build_base_model(cfg, tokenizer), tokenizer, save_base=save_base)


def build_base_model(cfg: LMRunConfig, tokenizer):
    """The model before LoRA: ``model.path`` or a tiny from-config ``model.arch``; checks that ``data.max_length``
    fits its context. Writes nothing, so recipes call it before creating the run folder."""
    m = cfg.model
    if m.path:
        model = hf.load_causal_lm(m.path, attn_implementation=m.attn_implementation)
        hf.ensure_pad_token(tokenizer, model)
        if hf.context_length(model) < cfg.data.max_length:
            raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the model context "
                              f"{hf.context_length(model)}", field="data.max_length")
        return model
    if m.max_position_embeddings < cfg.data.max_length:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds model.max_position_embeddings="
                          f"{m.max_position_embeddings}", field="data.max_length")
    return hf.build_tiny_model(
        m.arch, len(tokenizer), hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        attn_implementation=m.attn_implementation, seed=cfg.train.seed)


def apply_run_lora(cfg: LMRunConfig, model, tokenizer, *, save_base: bool = True):
    """Wrap ``model`` in a LoRA adapter when ``model.lora.enabled`` (else return it).

    A LoRA adapter must name its base model: for a from-config base, the (frozen) base weights are saved once to
    ``<run_dir>/base_model`` (with ``save_base``, on rank 0, once the run folder exists) and the adapter points there.
    """
    m = cfg.model
    if not m.lora.enabled:
        return model
    if not m.path:
        base_dir = (cfg.run_dir / "base_model").resolve()
        if save_base:
            hf.save_model(model, base_dir, tokenizer=tokenizer)
        model.config._name_or_path = model.name_or_path = str(base_dir)
    return hf.apply_lora(model, r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout,
                         target_modules=m.lora.target_modules)
