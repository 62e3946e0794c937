"""Config sections of the token-LM methods (SFT, LLM-JEPA, CoCoMix): a Hugging Face model, a tokenizer, chat/text
data and generation. :class:`LMRunConfig` = the trainer's :class:`~conceptlm.core.config.RunConfig` + these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from conceptlm.core.config import RunConfig, check

__all__ = ["ModelSection", "LoraSection", "TokenizerSection", "DataSection", "GenerateSection", "LMRunConfig",
           "SCORER_NAMES"]

SCORER_NAMES = ("exact", "regex", "gsm8k", "sql", "nq", "label")


@dataclass(kw_only=True)
class LoraSection:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    """``None`` picks the attention projections of the model's family (see ``core.hf.lora_target_modules``)."""

    def validate(self) -> None:
        check(self.r > 0, "model.lora.r", "must be > 0")
        check(0.0 <= self.dropout < 1.0, "model.lora.dropout", "must be in [0, 1)")


@dataclass(kw_only=True)
class ModelSection:
    path: str | None = None
    """A local Hugging Face model directory. When unset, a tiny model of ``arch`` is built from config."""
    arch: Literal["llama", "qwen2", "gpt2", "gemma2", "olmo2"] = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int = 256
    attn_implementation: str | None = None
    """``sdpa`` / ``eager``; ``None`` = the family's default (Gemma2 needs eager)."""
    lora: LoraSection = field(default_factory=LoraSection)

    def validate(self) -> None:
        check(self.hidden_size > 0, "model.hidden_size", "must be > 0")
        check(self.num_layers > 0, "model.num_layers", "must be > 0")
        check(self.num_heads > 0, "model.num_heads", "must be > 0")
        check(self.num_kv_heads is None or self.num_kv_heads > 0, "model.num_kv_heads", "must be > 0")
        check(self.hidden_size % self.num_heads == 0, "model.num_heads",
              f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        self.lora.validate()


@dataclass(kw_only=True)
class TokenizerSection:
    path: str | None = None
    """A local tokenizer directory; when unset (and ``model.path`` is unset) a byte-level BPE is trained on the
    training data and saved with the run."""
    vocab_size: int = 1024
    template_date: str = "26 Jul 2024"
    """The date chat templates that read the clock see (Llama-3's "Today Date"), "26 Jul 2024" or "2024-07-26":
    pinned so that token ids, and the caches built from them, do not change with the day a run starts."""

    def validate(self) -> None:
        check(self.vocab_size >= 300, "tokenizer.vocab_size", "must be >= 300 (256 bytes + special tokens)")
        check(_is_template_date(self.template_date), "tokenizer.template_date",
              f"{self.template_date!r} is not a date like '26 Jul 2024' or '2024-07-26'")


def _is_template_date(value: str) -> bool:
    from conceptlm.data.templates import parse_template_date

    try:
        parse_template_date(value)
    except ValueError:
        return False
    return True


@dataclass(kw_only=True)
class DataSection:
    train: str = "generate:nlrx"
    """Training data: a ``.jsonl`` chat file, a ``.txt`` file, ``hf:<name or path>`` (Hugging Face datasets),
    ``generate:nlrx`` (the built-in English-description -> regex generator), or a token-shard folder made by
    ``conceptlm data tokenize`` (its ``train`` split, read through memory maps; the run uses the folder's tokenizer)."""
    eval: str | None = None
    """Held-out data in the same forms; with ``generate:nlrx`` a disjoint generated test split is used; a token-shard
    folder gives its ``validation`` split."""
    format: Literal["auto", "chat", "text"] = "auto"
    label_mode: Literal["assistant", "all"] = "assistant"
    """Which tokens are LM targets for chat data: assistant turns + end-of-turn, or every token."""
    max_length: int = 256
    on_too_long: Literal["error", "skip", "truncate"] = "error"
    limit_train: int | None = None
    limit_eval: int | None = None
    generator_train_size: int = 4000
    generator_test_size: int = 500
    generator_seed: int = 0

    def validate(self) -> None:
        check(self.max_length >= 8, "data.max_length", "must be >= 8")
        check(bool(self.train), "data.train", "must name the training data")


@dataclass(kw_only=True)
class GenerateSection:
    max_new_tokens: int = 64
    batch_size: int = 32
    scorer: Literal["exact", "regex", "gsm8k", "sql", "nq", "label"] = "exact"
    """Scorer from ``conceptlm.eval.scorers.SCORERS`` (a test keeps the two lists equal)."""
    limit: int | None = None

    def validate(self) -> None:
        check(self.max_new_tokens > 0 and self.batch_size > 0, "generate", "max_new_tokens/batch_size must be > 0")


@dataclass(kw_only=True)
class LMRunConfig(RunConfig):
    """Run sections + model/tokenizer/data/generate. Token-LM methods subclass and add their own section."""

    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
