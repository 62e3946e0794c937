"""Token shards: a tokenized corpus on disk as flat token arrays read through memory maps (pretraining-scale text).

Layout of a token-shard folder (made by ``conceptlm data tokenize``, :mod:`conceptlm.data.tokenize`)::

    folder/artifact.json                 kind "data.token_shards", format 1 (see below)
    folder/tokenizer/                    the Hugging Face tokenizer the tokens come from (save_pretrained)
    folder/train/00000.tokens.npy        piece 0's training documents: one flat token array (uint16 when the
                                         vocabulary has <= 65536 ids, else uint32), each document followed by EOS
    folder/train/00000.ends.npy          int64 end offset (exclusive) of each document in that array
    folder/validation/00000.tokens.npy   piece 0's validation documents (may hold no document), same format
    folder/validation/00000.ends.npy
    folder/pieces/00000.json             piece 0's completion record (counts, sizes and sha256 of its 4 files)

Piece ``k`` holds the source documents ``[k * docs_per_shard, (k + 1) * docs_per_shard)``; each document goes to
``validation`` when a hash of ``(split_seed, its text)`` falls below ``val_fraction`` (:func:`is_validation`), else
to ``train``, so the split depends neither on the number of workers nor on the order of work, and equal documents
always land in the same split. A split's token stream is the concatenation of its shards in piece order.

``artifact.json`` (:mod:`conceptlm.core.artifact`): ``settings`` = docs_per_shard, val_fraction, split_seed,
dtype, the source reading and tokenizer settings; ``inputs`` = the source's content fingerprint and the tokenizer's;
``files`` = size and sha256 of every shard and tokenizer file; plus ``tokenizer_fingerprint`` (the tokenizer's
content, :func:`tokenizer_fingerprint`), ``eos_id``, ``vocab_size``, ``dtype`` and ``splits``:
``{"train": {"tokens", "documents", "shards": [{"name": "train/00000", "tokens", "documents"}, ...]}, ...}``.

Reading: :class:`TokenShards` opens one split (memory maps; nothing of the token data is read at open, each shard's
checksum is checked the first time it is touched); :class:`ShardWindows` cuts its stream into fixed windows exactly
as :class:`~conceptlm.data.text.TextDataset` cuts its in-memory stream.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from conceptlm.core.artifact import ARTIFACT_FILE, is_complete, listed_file_problem, read_manifest
from conceptlm.core.errors import DataError
from conceptlm.data.token_pieces import SPLITS, is_validation, shard_names, token_dtype

__all__ = ["KIND", "FORMAT", "SPLITS", "is_token_shards", "tokenizer_fingerprint", "token_dtype", "is_validation",
           "shard_names", "TokenShards", "ShardWindows"]

KIND = "data.token_shards"
FORMAT = 1


def is_token_shards(path: str | Path) -> bool:
    """Whether ``path`` is a folder with an ``artifact.json`` of kind ``data.token_shards``."""
    p = Path(path)
    if not (p / ARTIFACT_FILE).is_file():
        return False
    try:
        m = read_manifest(p)
    except DataError:
        return False
    return m is not None and m.get("kind") == KIND


def tokenizer_fingerprint(tokenizer) -> str:
    """The identity of a fast tokenizer by content: sha256 of its canonical backend JSON (vocabulary, merges,
    normalizer, pre-tokenizer, added tokens) and its EOS id; the same after ``save_pretrained`` and loading back."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"token shards need a fast tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    blob = json.dumps({"backend": spec, "eos": tokenizer.eos_token_id}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


class TokenShards:
    """One split of a token-shard folder, read through numpy memory maps.

    Args:
        path: the folder (see the module docstring).
        split: ``"train"`` or ``"validation"``.
        verify: check each shard file's size and sha256 against the manifest the first time the shard is read
            (a damaged shard is a one-line :class:`DataError` naming the file).

    Attributes:
        num_tokens / num_documents: of this split.
        fingerprint: the folder's artifact fingerprint (what a consumer records among its inputs).
        tokenizer_fingerprint: :func:`tokenizer_fingerprint` of the tokenizer the tokens come from.
        eos_id, vocab_size, dtype, path, split.
    """

    def __init__(self, path: str | Path, split: str = "train", *, verify: bool = True):
        self.path = Path(path)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        m = read_manifest(self.path)
        if m is None or m.get("kind") != KIND:
            raise DataError(f"not a token-shard folder (no {ARTIFACT_FILE} of kind {KIND!r})", path=self.path)
        if not is_complete(m) or "splits" not in m:
            raise DataError("token shards not finished (rerun `conceptlm data tokenize` with the same settings)",
                            path=self.path)
        if m.get("format") != FORMAT:
            raise DataError(f"token-shard format {m.get('format')} (this version reads {FORMAT})", path=self.path)
        self.split, self.verify = split, verify
        self.fingerprint: str = m["fingerprint"]
        self.tokenizer_fingerprint: str = m["tokenizer_fingerprint"]
        self.eos_id: int = int(m["eos_id"])
        self.vocab_size: int = int(m["vocab_size"])
        self.dtype: str = m["dtype"]
        info = m["splits"][split]
        self._files: dict[str, Any] = m.get("files") or {}
        # shards holding at least one token, in stream order
        self._shards = [s for s in info["shards"] if s["tokens"] > 0]
        tok_counts = np.array([s["tokens"] for s in self._shards], dtype=np.int64)
        doc_counts = np.array([s["documents"] for s in self._shards], dtype=np.int64)
        self._tok_starts = np.concatenate([[0], np.cumsum(tok_counts)]).astype(np.int64)
        self._doc_starts = np.concatenate([[0], np.cumsum(doc_counts)]).astype(np.int64)
        self.num_tokens = int(self._tok_starts[-1])
        self.num_documents = int(self._doc_starts[-1])
        if self.num_tokens != info["tokens"] or self.num_documents != info["documents"]:
            raise DataError(f"split {split!r}: the shard counts do not add up to the split's", path=self.path)
        self._tokens: dict[int, np.ndarray] = {}
        self._ends: dict[int, np.ndarray] = {}

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.path)!r}, split={self.split!r}, tokens={self.num_tokens}, "
                f"documents={self.num_documents}, shards={len(self._shards)})")

    # ------------------------------------------------------------------------------------------ shard access
    def _open(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        if j not in self._tokens:
            tok_name = self._shards[j]["name"] + ".tokens.npy"
            end_name = self._shards[j]["name"] + ".ends.npy"
            if self.verify:
                problem = listed_file_problem(self.path, self._files, [tok_name, end_name])
                if problem is not None:
                    raise DataError(problem)
            tokens = self._load(tok_name)
            ends = self._load(end_name)
            if tokens.dtype != np.dtype(self.dtype) or tokens.shape != (self._shards[j]["tokens"],) or \
                    ends.shape != (self._shards[j]["documents"],):
                raise DataError("shard shape or dtype differs from the manifest", path=self.path / tok_name)
            self._tokens[j], self._ends[j] = tokens, ends
        return self._tokens[j], self._ends[j]

    def _load(self, rel: str) -> np.ndarray:
        p = self.path / rel
        try:
            return np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"unreadable shard ({type(e).__name__}: {str(e)[:120]})", path=p) from None

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the split's stream (int64), across shard boundaries."""
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens}]")
        out = np.empty(stop - start, dtype=np.int64)
        pos = start
        j = int(np.searchsorted(self._tok_starts, start, side="right")) - 1
        while pos < stop:
            toks, _ = self._open(j)
            base = int(self._tok_starts[j])
            hi = min(stop, int(self._tok_starts[j + 1]))
            out[pos - start:hi - start] = toks[pos - base:hi - base]
            pos, j = hi, j + 1
        return out

    def document(self, i: int) -> np.ndarray:
        """The tokens of document ``i`` of the split (int64), including its trailing EOS."""
        i = int(i)
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} outside [0, {self.num_documents})")
        j = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        toks, ends = self._open(j)
        k = i - int(self._doc_starts[j])
        lo = int(ends[k - 1]) if k > 0 else 0
        return np.asarray(toks[lo:int(ends[k])], dtype=np.int64)

    def load_tokenizer(self):
        """The Hugging Face tokenizer saved in the folder (the one the tokens come from)."""
        from conceptlm.core.hf import load_tokenizer

        return load_tokenizer(self.path / "tokenizer")


class ShardWindows(Dataset):
    """Fixed windows of a :class:`TokenShards` stream: window ``i`` = tokens ``[i * T, (i + 1) * T)``; the partial
    window at the end is dropped. The same blocks as :class:`~conceptlm.data.text.TextDataset` over the same
    documents (documents joined, each followed by EOS), read lazily from the memory maps.

    Args:
        shards: the split to read.
        block_size: tokens per window (``T``).
        limit_tokens: use at most this many tokens of the stream.

    Items are ``{"input_ids": list[int] (T,), "labels": list[int] (T,)}``; ``lengths`` is ``T`` for every window.
    """

    def __init__(self, shards: TokenShards, block_size: int, *, limit_tokens: int | None = None):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if limit_tokens is not None and limit_tokens < 1:
            raise ValueError(f"limit_tokens must be positive or None, got {limit_tokens!r}")
        self.shards = shards
        self.block_size = block_size
        self.num_tokens = shards.num_tokens if limit_tokens is None else min(shards.num_tokens, limit_tokens)
        self.sources = [f"{shards.path}[{shards.split}]"]
        n = self.num_tokens // block_size
        if n == 0:
            raise DataError(f"only {self.num_tokens} tokens, fewer than one block of {block_size}",
                            path=", ".join(self.sources))
        self._n = n
        self.lengths = [block_size] * n

    @property
    def fingerprint(self) -> str:
        """The shard folder's fingerprint."""
        return self.shards.fingerprint

    def __len__(self) -> int:
        return self._n

    def window(self, index: int) -> np.ndarray:
        """Window ``index`` as an int64 array."""
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError(f"window {index} outside [0, {self._n})")
        return self.shards.tokens(index * self.block_size, (index + 1) * self.block_size)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ids = self.window(int(index)).tolist()
        return {"input_ids": ids, "labels": list(ids)}

    def as_tensor(self, index: int) -> torch.Tensor:
        """Window ``index`` as a LongTensor."""
        return torch.from_numpy(self.window(index))
