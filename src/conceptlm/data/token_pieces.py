"""The light half of token shards: what a ``data tokenize`` worker process runs (streaming the source, encoding
with the ``tokenizers`` backend, writing a piece's shards and its completion record) and the pure helpers of the
layout (:mod:`conceptlm.data.shards`). It imports neither torch nor transformers, so spawned workers start fast."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from conceptlm.core.artifact import file_listing, listed_file_problem
from conceptlm.core.errors import ConfigError, DataError
from conceptlm.core.io import atomic_write_bytes, atomic_write_text

__all__ = ["SPLITS", "CHUNK_CHARS", "SURROGATE", "split_chunks", "read_text_file", "token_dtype", "is_validation",
           "shard_names", "SourceReader", "check_text", "encode_documents", "piece_done", "write_piece", "work"]

SPLITS = ("train", "validation")
CHUNK_CHARS = 1 << 16
"""Long documents are tokenized in pieces of about this many characters, cut after a newline."""
SURROGATE = re.compile("[\ud800-\udfff]")
"""A UTF-16 surrogate code point in a str cannot be encoded as UTF-8."""


def split_chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Split ``text`` into pieces of at most ``size`` characters, each ending after a newline when possible,
    else before a space, else anywhere."""
    out, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            if cut <= start:  # no newline: cut before a space instead of inside a word
                cut = text.rfind(" ", start + 1, end) - 1
            if cut > start:
                end = cut + 1
        out.append(text[start:end])
        start = end
    return out


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file strictly.

    Raises:
        DataError: the file is missing, or has bytes that are not UTF-8 (names the 1-based line and the byte
            offset within it).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise DataError(f"not valid UTF-8 (bad byte at offset {col} of the line)", path=path, line=line) from None
    return text.removeprefix("\ufeff")


def token_dtype(vocab_size: int) -> str:
    """``uint16`` when every id fits (``vocab_size <= 65536``), else ``uint32``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def is_validation(text: str, split_seed: int, val_fraction: float) -> bool:
    """Whether a document goes to the validation split: the first 8 bytes of blake2b(split_seed, text), read as a
    fraction of 2**64, below ``val_fraction``. A function of the document alone (not of its position or worker)."""
    if val_fraction <= 0.0:
        return False
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                        key=int(split_seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") < val_fraction * 2.0 ** 64


def shard_names(split: str, piece: int) -> tuple[str, str]:
    """The (tokens, ends) file names of piece ``piece`` of ``split``, relative to the folder."""
    return f"{split}/{piece:05d}.tokens.npy", f"{split}/{piece:05d}.ends.npy"


# ------------------------------------------------------------------------------------------------ source reading
class SourceReader:
    """The documents of a ``source`` setting, streamed in order with their index and location.

    :meth:`records` yields ``(index, text, path, line)`` for the documents whose index ``keep`` accepts (the others
    are skipped without being decoded where the format allows it); afterwards :attr:`count` is the number of
    documents in the source (after ``limit_documents``).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.spec = cfg.source
        self.count: int | None = None
        if self.spec.startswith("hf:"):
            self.kind = "hf"
            self.files: list[Path] = []
            return
        p = Path(self.spec)
        if not p.exists():
            raise ConfigError(f"not found: {self.spec}", field="source")
        if p.is_dir():
            parquet = sorted(p.glob("*.parquet"))
            txt = sorted(p.glob("*.txt"))
            if txt and not parquet:
                self.kind, self.files = "txt", txt
            elif parquet and not txt:
                self.kind, self.files = "parquet", parquet
            else:
                raise ConfigError(f"{self.spec}: a folder source holds .txt files or .parquet files (found "
                                  f"{len(txt)} .txt, {len(parquet)} .parquet)", field="source")
        elif p.suffix in (".txt", ".md"):
            self.kind, self.files = "txt", [p]
        elif p.suffix == ".jsonl":
            self.kind, self.files = "jsonl", [p]
        elif p.suffix == ".parquet":
            self.kind, self.files = "parquet", [p]
        else:
            raise ConfigError(f"cannot tell the format of {self.spec} (.txt, .jsonl, .parquet, a folder or hf:)",
                              field="source")

    def reading_settings(self) -> dict[str, Any]:
        """The settings that decide what the documents are (part of the shards' identity)."""
        c = self.cfg
        s: dict[str, Any] = {"format": self.kind, "limit_documents": c.limit_documents}
        if self.kind == "txt":
            s["text_unit"] = c.text_unit
        elif self.kind == "jsonl":
            s["text_field"] = c.text_field
        elif self.kind == "parquet":
            s["text_column"] = c.text_column
        else:
            s.update(text_column=c.text_column, hf_split=c.hf_split, hf_config=c.hf_config)
        return s

    def records(self, keep: Callable[[int], bool] = lambda i: True) -> Iterator[tuple[int, Any, str, int | None]]:
        limit = self.cfg.limit_documents
        index = 0
        gen = {"txt": self._txt, "jsonl": self._jsonl, "parquet": self._parquet, "hf": self._hf}[self.kind]
        it = gen(keep, lambda: index)
        for item in it:
            if limit is not None and index >= limit:
                it.close()
                break
            if item is not None:
                yield (index, *item)
            index += 1
        self.count = index

    # Each generator yields, per source document in order, (text, path, line) or None when keep(index) is false;
    # ``pos()`` is the index of the document about to be yielded.
    def _txt(self, keep, pos):
        unit = self.cfg.text_unit
        for path in self.files:
            if unit == "file":
                yield (read_text_file(path), str(path), None) if keep(pos()) else None
                continue
            with path.open("rb") as fh:
                para: list[str] = []
                para_line = 0
                for line_no, raw in enumerate(fh, start=1):
                    if unit == "line":
                        yield (_decode(raw, path, line_no, line_no == 1).rstrip("\r\n"), str(path), line_no) \
                            if keep(pos()) else None
                        continue
                    blank = not raw.strip()
                    if blank:
                        if para:
                            yield ("".join(para).rstrip("\r\n"), str(path), para_line) if keep(pos()) else None
                            para = []
                        continue
                    if not para:
                        para_line = line_no
                    # a paragraph not kept is still delimited, never decoded
                    para.append(_decode(raw, path, line_no, line_no == 1) if keep(pos()) else "")
                if para:
                    yield ("".join(para).rstrip("\r\n"), str(path), para_line) if keep(pos()) else None

    def _jsonl(self, keep, pos):
        from conceptlm.data.fields import field_value

        path = self.files[0]
        field = self.cfg.text_field
        with path.open("rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                if not keep(pos()):
                    yield None
                    continue
                text = _decode(raw, path, line_no, line_no == 1)
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, line=line_no) from None
                try:
                    value = field_value(obj, field)
                except KeyError as e:
                    raise DataError(f"no {e.args[0]!r} in the object", path=path, line=line_no,
                                    field=field) from None
                yield value, str(path), line_no

    def _parquet(self, keep, pos):
        import pyarrow.parquet as pq

        col = self.cfg.text_column
        for path in self.files:
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise DataError(f"unreadable Parquet file ({type(e).__name__})", path=path) from None
            if col not in pf.schema_arrow.names:
                raise DataError(f"no column {col!r} (columns: {', '.join(pf.schema_arrow.names)})", path=path,
                                field=col)
            row0 = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                start = pos()
                if not any(keep(start + r) for r in range(n)):
                    for _ in range(n):
                        yield None
                    row0 += n
                    continue
                values = pf.read_row_group(g, columns=[col]).column(0).to_pylist()
                for r, v in enumerate(values):
                    yield (v, str(path), row0 + r + 1) if keep(pos()) else None
                row0 += n

    def _hf(self, keep, pos):
        import datasets

        from conceptlm.data.fields import field_value

        name = self.spec[3:]
        try:
            ds = datasets.load_dataset(name, self.cfg.hf_config, split=self.cfg.hf_split, streaming=True)
        except Exception as e:  # noqa: BLE001 - datasets raises many types for a missing/unknown dataset
            raise ConfigError(f"cannot stream {name!r}: {type(e).__name__}: {str(e).splitlines()[0][:160]}",
                              field="source") from None
        for row_no, row in enumerate(ds, start=1):
            if not keep(pos()):
                yield None
                continue
            try:
                value = field_value(row, self.cfg.text_column)
            except KeyError as e:
                raise DataError(f"no {e.args[0]!r} in the row", path=self.spec, line=row_no,
                                field=self.cfg.text_column) from None
            yield value, self.spec, row_no


def _decode(raw: bytes, path: Path, line_no: int, first: bool) -> str:
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (bad byte at offset {e.start} of the line)", path=path,
                        line=line_no) from None


# ------------------------------------------------------------------------------------------------ tokenizing
def check_text(text: Any, path: str, line: int | None) -> str:
    if not isinstance(text, str):
        raise DataError(f"expected a string document, got {type(text).__name__}", path=path, line=line)
    m = SURROGATE.search(text)
    if m is not None:
        raise DataError(f"lone surrogate U+{ord(m.group()):04X} cannot be encoded (not valid Unicode text)",
                        path=path, line=line)
    return text


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each document (no special tokens, no EOS), one batch encode over all their pieces: the ids
    :class:`~conceptlm.data.text.TextDataset` gets for the same documents. ``tokenizer``: a Hugging Face fast
    tokenizer or its ``tokenizers.Tokenizer`` backend (what the fast tokenizer's batch call runs)."""
    chunks: list[str] = []
    owners: list[int] = []
    for i, t in enumerate(texts):
        for c in split_chunks(t):
            chunks.append(c)
            owners.append(i)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    fast = getattr(backend, "encode_batch_fast", None)
    encs = (fast or backend.encode_batch)(chunks, add_special_tokens=False)
    out: list[list[int]] = [[] for _ in texts]
    for owner, enc in zip(owners, encs):
        out[owner].extend(enc.ids)
    return out


class _PieceBuffer:
    """One split of one piece being built: token arrays per batch and document end offsets."""

    def __init__(self, dtype: str):
        self.dtype = np.dtype(dtype)
        self.parts: list[np.ndarray] = []
        self.ends: list[int] = []
        self.total = 0

    def add(self, ids: list[int], eos: int) -> None:
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[:-1] = ids
        arr[-1] = eos
        self.parts.append(arr)
        self.total += len(arr)
        self.ends.append(self.total)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getbuffer())


def record_path(out: Path, piece: int) -> Path:
    return out / "pieces" / f"{piece:05d}.json"


def piece_done(out: Path, piece: int) -> bool:
    """Whether piece ``piece`` has a completion record whose files are all intact."""
    p = record_path(out, piece)
    if not p.is_file():
        return False
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
        listing = {k: v for s in SPLITS for k, v in rec[s]["files"].items()}
    except (ValueError, KeyError, TypeError):
        return False
    return listed_file_problem(out, listing) is None


def write_piece(out: Path, piece: int, read: int, buffers: dict[str, _PieceBuffer]) -> None:
    rec: dict[str, Any] = {"piece": piece, "read": read}
    for split in SPLITS:
        b = buffers[split]
        tok_name, end_name = shard_names(split, piece)
        tokens = np.concatenate(b.parts) if b.parts else np.empty(0, dtype=b.dtype)
        _save_npy(out / tok_name, tokens)
        _save_npy(out / end_name, np.asarray(b.ends, dtype=np.int64))
        rec[split] = {"tokens": int(tokens.shape[0]), "documents": len(b.ends),
                      "files": file_listing(out, [tok_name, end_name])}
    atomic_write_text(record_path(out, piece), json.dumps(rec, sort_keys=True, indent=1) + "\n")


def work(cfg_dict: dict, out: str, backend_json: str, eos: int, dtype: str, worker: int, n_workers: int,
         show_progress: bool) -> int:
    """One process's share: the pieces ``k`` with ``k % n_workers == worker`` that are not done yet, encoded by the
    tokenizer's backend (``backend_json``: ``backend_tokenizer.to_str()`` of the folder's tokenizer). Returns the
    number of documents in the source."""
    from tokenizers import Tokenizer

    from conceptlm.core.progress import progress_bar
    from conceptlm.data.config import TokenizeConfig

    cfg = TokenizeConfig(**cfg_dict)
    out_p = Path(out)
    tokenizer = Tokenizer.from_str(backend_json)
    D = cfg.docs_per_shard
    done: dict[int, bool] = {}

    def mine(k: int) -> bool:
        if k % n_workers != worker:
            return False
        if k not in done:
            done[k] = piece_done(out_p, k)
        return not done[k]

    reader = SourceReader(cfg)
    bar = progress_bar(desc=f"tokenize (worker {worker} of {n_workers})", unit="doc", enabled=show_progress)
    current: int | None = None
    buffers: dict[str, _PieceBuffer] = {}
    batch: list[tuple[str, bool]] = []
    read = 0

    def flush() -> None:
        if not batch:
            return
        ids = encode_documents(tokenizer, [t for t, _ in batch])
        for (_, val), doc in zip(batch, ids):
            buffers["validation" if val else "train"].add(doc, eos)
        bar.update(len(batch))
        batch.clear()

    def finish() -> None:
        flush()
        write_piece(out_p, current, read, buffers)

    for index, text, path, line in reader.records(lambda i: mine(i // D)):
        k = index // D
        if k != current:
            if current is not None:
                finish()
            current, read = k, 0
            buffers = {s: _PieceBuffer(dtype) for s in SPLITS}
        read += 1
        text = check_text(text, path, line)
        if not text.strip():
            continue
        batch.append((text, is_validation(text, cfg.split_seed, cfg.val_fraction)))
        if len(batch) >= cfg.batch_size:
            flush()
    if current is not None:
        finish()
    bar.close()
    return int(reader.count or 0)


