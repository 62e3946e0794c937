"""Config of the ``conceptlm data`` verbs: ``conceptlm data tokenize`` (text -> token shards, :mod:`.tokenize`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from conceptlm.core.config import check

__all__ = ["TokenizeConfig"]


@dataclass(kw_only=True)
class TokenizeConfig:
    """``conceptlm data tokenize``: a text source tokenized into a token-shard folder (see
    :mod:`conceptlm.data.shards` for the layout). Keys are top-level: ``conceptlm data tokenize source=a.txt
    out=shards/a``."""

    source: str = ""
    """A ``.txt`` file or a folder of ``.txt`` files, a ``.jsonl`` file (``text_field``), a ``.parquet`` file or a
    folder of them (``text_column``), or ``hf:<name or local path>`` (read with ``datasets`` streaming)."""
    out: str = ""
    """The token-shard folder to write (resumed when it holds an unfinished one with the same settings)."""
    text_unit: Literal["file", "line", "paragraph"] = "file"
    """What one document of a ``.txt`` source is: a whole file (as ``data.train: x.txt`` reads it), a line, or a
    block of lines between blank lines."""
    text_field: str = "text"
    """Dotted path of the document's text in each ``.jsonl`` object (e.g. ``text`` or ``messages.1.content``)."""
    text_column: str = "text"
    """Column holding the text in Parquet and ``hf:`` sources (a dotted path into a row for ``hf:``)."""
    hf_split: str = "train"
    """The split of an ``hf:`` dataset to read."""
    hf_config: str | None = None
    """The configuration (subset) name of an ``hf:`` dataset."""
    limit_documents: int | None = None
    """Read at most this many documents of the source (null: all)."""
    tokenizer: str = ""
    """A Hugging Face tokenizer (local folder or named offline model); empty: train a byte-level BPE on a seeded
    sample of the training-split documents (never on validation documents)."""
    vocab_size: int = 1024
    """Vocabulary size of the trained tokenizer (``tokenizer`` empty)."""
    tokenizer_sample_docs: int = 10000
    """At most this many training-split documents (each cut to its first 128k characters) train the tokenizer;
    chosen uniformly at random (seeded by ``tokenizer_seed``) from the whole source in one streaming pass."""
    tokenizer_seed: int = 0
    docs_per_shard: int = 10000
    """Source documents per piece: piece k holds documents [k * docs_per_shard, (k + 1) * docs_per_shard) and
    writes one train and one validation shard."""
    val_fraction: float = 0.01
    """Expected fraction of documents in the ``validation`` split (by a hash of split_seed and the text)."""
    split_seed: int = 0
    workers: int = 1
    """Worker processes per rank (spawned); pieces are dealt round-robin over ranks x workers. Does not change a
    byte of the output."""
    batch_size: int = 256
    """Documents per batch encode call. Does not change the output."""
    on_change: Literal["refuse", "rebuild"] = "refuse"
    """When ``out`` holds shards made with other settings or another source: refuse naming what changed, or
    rebuild."""
    progress: bool = True

    def validate(self) -> None:
        check(bool(self.source), "source", "must name the text to tokenize")
        check(bool(self.out), "out", "must name the token-shard folder to write")
        check(bool(self.text_field) and all(self.text_field.split(".")), "text_field", "must be a dotted path")
        check(bool(self.text_column), "text_column", "must not be empty")
        check(self.limit_documents is None or self.limit_documents > 0, "limit_documents", "must be > 0 or null")
        check(self.vocab_size >= 300, "vocab_size", "must be >= 300 (256 bytes + special tokens)")
        check(self.tokenizer_sample_docs > 0, "tokenizer_sample_docs", "must be > 0")
        check(self.docs_per_shard > 0, "docs_per_shard", "must be > 0")
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        check(self.workers > 0, "workers", "must be > 0")
        check(self.batch_size > 0, "batch_size", "must be > 0")
