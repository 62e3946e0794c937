"""The token-LM recipe kit (SFT, LLM-JEPA, CoCoMix): data sources from the config's ``data`` section, checkpoint
lookup of the HF export, and generation evaluation. Training goes through :func:`conceptlm.core.recipe.fit`."""

from __future__ import annotations

import logging
from pathlib import Path

from conceptlm.core import hf
from conceptlm.core.checkpoint import MANIFEST, find_latest_checkpoint, verify_checkpoint
from conceptlm.core.errors import CheckpointError, ConfigError
from conceptlm.data.sources import chat_records, resolve_source
from conceptlm.lm.config import LMRunConfig

__all__ = ["load_sources", "shards_of", "resolve_checkpoint", "load_exported_model", "generation_eval"]

log = logging.getLogger(__name__)


def load_sources(cfg: LMRunConfig):
    """(train Source, eval Source or None) for the config's data section.

    With ``generate:`` training data and no ``data.eval``, the generator's disjoint test split is the eval set.
    """
    d = cfg.data
    gen = {"train_size": d.generator_train_size, "test_size": d.generator_test_size, "seed": d.generator_seed}
    train_src = resolve_source(d.train, split="train", fmt=d.format, limit=d.limit_train, generator=gen)
    eval_spec = d.eval if d.eval is not None else (d.train if d.train.startswith("generate:") else None)
    eval_src = None
    if eval_spec is not None:
        eval_src = resolve_source(eval_spec, split="test", fmt=d.format, limit=d.limit_eval, generator=gen,
                                  field="data.eval")
    return train_src, eval_src


def shards_of(*sources) -> list:
    """The token-shard splits among ``sources`` (None entries allowed): what the run's tokenizer must match."""
    return [s.shards for s in sources if s is not None and s.shards is not None]


def resolve_checkpoint(cfg: LMRunConfig, checkpoint: str | None) -> Path:
    """The HF model dir to evaluate: the run's latest checkpoint, or ``checkpoint``: a checkpoint folder
    (``runs/<name>/checkpoints/step_N``), an HF model folder, a ``.gguf`` file or a named offline model
    (``smollm2-135m``; converted once and cached, as for ``model.path``), e.g. to score a pretrained model before
    fine-tuning it."""
    if checkpoint:
        from conceptlm.core.gguf import resolve_model_path

        p = resolve_model_path(checkpoint)
        if (p / MANIFEST).is_file():
            problem = verify_checkpoint(p)
            if problem is not None:
                raise CheckpointError(f"{p}: damaged checkpoint ({problem})")
        model_dir = p / "model" if (p / "model").is_dir() else p
        if not model_dir.is_dir():
            raise ConfigError(f"checkpoint not found: {checkpoint}", field="checkpoint")
        if not ((model_dir / "config.json").is_file() or (model_dir / "adapter_config.json").is_file()):
            raise ConfigError(f"{model_dir} holds no Hugging Face model (config.json / adapter_config.json); pass a "
                              "checkpoint folder (runs/<name>/checkpoints/step_N) or a model folder",
                              field="checkpoint")
        return model_dir
    latest = find_latest_checkpoint(cfg.run_dir)
    if latest is None:
        raise ConfigError(f"no checkpoint in {cfg.run_dir}; train first or pass --checkpoint DIR",
                          field="checkpoint")
    return latest / "model"


def load_exported_model(model_dir: Path):
    """(model, tokenizer) of a checkpoint's HF export, with one clear error for foreign or corrupt files."""
    try:
        return hf.load_causal_lm(model_dir), hf.load_tokenizer(model_dir)
    except (ConfigError, CheckpointError):
        raise
    except Exception as e:  # noqa: BLE001 - transformers/safetensors raise many types for a bad file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{model_dir}: cannot load the model ({type(e).__name__}: {msg[:200]})") from None


def generation_eval(cfg: LMRunConfig, *, checkpoint: str | None = None, output: str | None = None,
                    split: str = "test") -> dict:
    """Greedy generation on the eval data with ``generate.scorer``; predictions JSONL in the run folder."""
    from conceptlm.core.run import prepare_run
    from conceptlm.eval.generation import evaluate_generation
    from conceptlm.eval.scorers import scorer_warning

    info = prepare_run(cfg)
    model_dir = resolve_checkpoint(cfg, checkpoint)
    model, tokenizer = load_exported_model(model_dir)
    model = model.to(info.device)
    _, eval_src = load_sources(cfg)
    if eval_src is None or eval_src.kind != "chat":
        raise ConfigError("evaluation needs chat data: set data.eval to a chat JSONL file", field="data.eval")
    g = cfg.generate
    records = chat_records(eval_src)
    records = records[: g.limit] if g.limit else records
    out = Path(output) if output else cfg.run_dir / f"predictions_{split}.jsonl"
    d = cfg.data
    warning = scorer_warning(d.eval if d.eval is not None else d.train, g.scorer)
    if warning:  # a forgotten generate.scorer must not score silently the wrong way
        log.warning("%s", warning)
    result = evaluate_generation(model, tokenizer, records, scorer=g.scorer, batch_size=g.batch_size,
                                 max_new_tokens=g.max_new_tokens, output=out)
    result["checkpoint"] = str(model_dir)
    if warning:
        result["scorer_warning"] = warning
    return result
