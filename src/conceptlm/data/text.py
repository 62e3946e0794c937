"""Token streams: plain text documents tokenized, joined by EOS and cut into fixed-size blocks for pretraining."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from conceptlm.core.errors import DataError
from conceptlm.data.token_pieces import CHUNK_CHARS, SURROGATE, read_text_file, split_chunks

__all__ = ["read_text_file", "TextDataset"]

# Long documents are tokenized in pieces of about this many characters, cut after a newline.
_CHUNK_CHARS = CHUNK_CHARS
# A UTF-16 surrogate code point in a str cannot be encoded as UTF-8 (files are decoded strictly and never hold one;
# in-memory documents may).
_SURROGATE = SURROGATE


def _check_encodable(text: str, name: str, index: int | None) -> None:
    """DataError naming the document (``index``) or the line inside it if ``text`` holds a lone surrogate (such a
    string cannot be encoded as UTF-8, so no tokenizer can encode it)."""
    m = _SURROGATE.search(text)
    if m is None:
        return
    line = index if index is not None else text.count("\n", 0, m.start()) + 1
    raise DataError(f"lone surrogate U+{ord(m.group()):04X} cannot be encoded (not valid Unicode text)", path=name,
                    line=line, field="text" if index is not None else None)


def _chunks(text: str) -> list[str]:
    """Split ``text`` into pieces of at most ``_CHUNK_CHARS`` characters, each ending after a newline when possible,
    else before a space, else anywhere (:func:`conceptlm.data.token_pieces.split_chunks`)."""
    return split_chunks(text, _CHUNK_CHARS)


class TextDataset(Dataset):
    """Fixed-size blocks of a token stream for causal LM pretraining.

    Each document (a file, or a string with :meth:`from_texts`) is tokenized without special tokens and followed
    by the EOS token; the documents are concatenated into one stream and cut into blocks of ``block_size`` tokens
    (the last partial block is dropped). Every token is a target (``labels == input_ids``). Documents longer than
    64k characters are tokenized in pieces cut after newlines (else before spaces).

    Args:
        paths: one path or a list of paths of UTF-8 text files.
        tokenizer: a Hugging Face tokenizer with an EOS token.
        block_size: tokens per example.
        limit_tokens: use at most this many tokens of the stream.

    Attributes:
        lengths: ``block_size`` for every block.
        num_tokens: tokens in the stream before cutting into blocks.

    Items are ``{"input_ids": list[int] (block_size,), "labels": list[int] (block_size,)}``.
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], tokenizer, *, block_size: int,
                 limit_tokens: int | None = None):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        paths = list(paths)
        if not paths:
            raise ValueError("TextDataset needs at least one file")
        self.sources = [str(p) for p in paths]
        self._build(((str(p), read_text_file(p)) for p in paths), tokenizer, block_size, limit_tokens)

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer, *, block_size: int,
                   limit_tokens: int | None = None, name: str = "<texts>") -> TextDataset:
        """Build from in-memory documents (e.g. the ``text`` column of a Hugging Face dataset), one per string."""
        self = cls.__new__(cls)
        self.sources = [name]
        self._build(((name, t) for t in texts), tokenizer, block_size, limit_tokens, numbered=True)
        return self

    def _build(self, docs: Iterable[tuple[str, str]], tokenizer, block_size: int, limit_tokens: int | None,
               numbered: bool = False):
        """``numbered``: errors name the 1-based document index as the line (in-memory documents), else the line
        inside the document (files)."""
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if limit_tokens is not None and limit_tokens < 1:
            raise ValueError(f"limit_tokens must be positive or None, got {limit_tokens!r}")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no EOS token; TextDataset separates documents with EOS")
        stream: list[int] = []
        for index, (name, text) in enumerate(docs, start=1):
            if not isinstance(text, str):
                raise DataError(f"expected a string document, got {type(text).__name__}", path=name,
                                line=index if numbered else None, field="text" if numbered else None)
            _check_encodable(text, name, index if numbered else None)
            if not text.strip():
                continue
            pieces = tokenizer(_chunks(text), add_special_tokens=False)["input_ids"]
            for piece in pieces:
                stream.extend(piece)
            stream.append(eos)
            if limit_tokens is not None and len(stream) >= limit_tokens:
                break
        if limit_tokens is not None:
            stream = stream[:limit_tokens]
        self.num_tokens = len(stream)
        self.block_size = block_size
        n_blocks = len(stream) // block_size
        if n_blocks == 0:
            raise DataError(f"only {len(stream)} tokens, fewer than one block of {block_size}",
                            path=", ".join(self.sources))
        self._blocks = torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
        self.lengths = [block_size] * n_blocks

    def __len__(self) -> int:
        return self._blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ids = self._blocks[index].tolist()
        return {"input_ids": ids, "labels": list(ids)}
