"""``conceptlm data tokenize``: a text source tokenized into a token-shard folder (:mod:`conceptlm.data.shards`).

The source is streamed (never held whole): ``.txt`` files, a ``.jsonl`` file, Parquet files (by row groups) or a
Hugging Face dataset (``datasets`` streaming). Source document ``i`` belongs to piece ``i // docs_per_shard``; the
pieces are dealt round-robin over ``world_size x workers`` processes (torchrun ranks x spawned workers); each process
reads the source, skips (without decoding) the records of pieces that are not its own or already finished, batch
encodes its documents with the fast tokenizer and writes each piece's train and validation shards atomically, then a
small completion record (``pieces/00000.json``). Once every piece has its record, rank 0 writes ``artifact.json``.

Killed and rerun with the same settings, only the pieces without a valid record are made again, and the folder
ends byte-identical to an uninterrupted run's (no file depends on the number of processes, timing or order). Other
settings or another source: refused naming what changed (``on_change=refuse``) or rebuilt (``on_change=rebuild``);
an identical rerun of a finished folder reuses it.

Documents are tokenized exactly as :class:`~conceptlm.data.text.TextDataset` does it (no special tokens, long
documents cut in pieces of about 64k characters after newlines, EOS after each document, whitespace-only documents
skipped), so :class:`~conceptlm.data.shards.ShardWindows` equals ``TextDataset`` over the same documents.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from conceptlm.core.artifact import (
    Identity,
    begin,
    canonical_json,
    decide,
    digest,
    file_listing,
    file_sha256,
    is_complete,
    listed_file_problem,
    read_manifest,
)
from conceptlm.core.errors import ConfigError, DataError
from conceptlm.core.io import atomic_dir, atomic_write_text
from conceptlm.data.config import TokenizeConfig
from conceptlm.data.shards import FORMAT, KIND, SPLITS, is_validation, shard_names, token_dtype, tokenizer_fingerprint
from conceptlm.data.text import _SURROGATE, _chunks

__all__ = ["tokenize", "SourceReader", "source_fingerprint", "encode_documents", "tokenizer_sample"]

log = logging.getLogger(__name__)

_SAMPLE_CHARS = 1 << 17
"""A document in the tokenizer's training sample is cut to this many characters."""


# ------------------------------------------------------------------------------------------------ source reading
class SourceReader:
    """The documents of a ``source`` setting, streamed in order with their index and location.

    :meth:`records` yields ``(index, text, path, line)`` for the documents whose index ``keep`` accepts (the others
    are skipped without being decoded where the format allows it); afterwards :attr:`count` is the number of
    documents in the source (after ``limit_documents``).
    """

    def __init__(self, cfg: TokenizeConfig):
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
        from conceptlm.data.text import read_text_file

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
        from conceptlm.data.chat import field_value

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

        from conceptlm.data.chat import field_value

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


def source_fingerprint(reader: SourceReader) -> str:
    """The source's content fingerprint: sha256 over the sha256 of each source file, in reading order (names and
    locations left out). An ``hf:`` source that is a local folder is identified by its files; a Hub name by the name,
    configuration and split (its content is not read twice)."""
    files = reader.files
    if reader.kind == "hf":
        p = Path(reader.spec[3:])
        if not p.exists():
            return digest({"hf": reader.spec[3:], "config": reader.cfg.hf_config, "split": reader.cfg.hf_split})
        files = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
    return digest([file_sha256(f) for f in files])


# ------------------------------------------------------------------------------------------------ tokenizing
def _check_text(text: Any, path: str, line: int | None) -> str:
    if not isinstance(text, str):
        raise DataError(f"expected a string document, got {type(text).__name__}", path=path, line=line)
    m = _SURROGATE.search(text)
    if m is not None:
        raise DataError(f"lone surrogate U+{ord(m.group()):04X} cannot be encoded (not valid Unicode text)",
                        path=path, line=line)
    return text


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each document (no special tokens, no EOS), one batch encode over all their pieces: the ids
    :class:`~conceptlm.data.text.TextDataset` gets for the same documents."""
    chunks: list[str] = []
    owners: list[int] = []
    for i, t in enumerate(texts):
        for c in _chunks(t):
            chunks.append(c)
            owners.append(i)
    backend = tokenizer.backend_tokenizer
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _record_path(out: Path, piece: int) -> Path:
    return out / "pieces" / f"{piece:05d}.json"


def _piece_done(out: Path, piece: int) -> bool:
    """Whether piece ``piece`` has a completion record whose files are all intact."""
    p = _record_path(out, piece)
    if not p.is_file():
        return False
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
        listing = {k: v for s in SPLITS for k, v in rec[s]["files"].items()}
    except (ValueError, KeyError, TypeError):
        return False
    return listed_file_problem(out, listing) is None


def _write_piece(out: Path, piece: int, read: int, buffers: dict[str, _PieceBuffer]) -> None:
    rec: dict[str, Any] = {"piece": piece, "read": read}
    for split in SPLITS:
        b = buffers[split]
        tok_name, end_name = shard_names(split, piece)
        tokens = np.concatenate(b.parts) if b.parts else np.empty(0, dtype=b.dtype)
        _save_npy(out / tok_name, tokens)
        _save_npy(out / end_name, np.asarray(b.ends, dtype=np.int64))
        rec[split] = {"tokens": int(tokens.shape[0]), "documents": len(b.ends),
                      "files": file_listing(out, [tok_name, end_name])}
    atomic_write_text(_record_path(out, piece), json.dumps(rec, sort_keys=True, indent=1) + "\n")


def _work(cfg_dict: dict, out: str, worker: int, n_workers: int, show_progress: bool) -> int:
    """One process's share: the pieces ``k`` with ``k % n_workers == worker`` that are not done yet. Returns the
    number of documents in the source."""
    from conceptlm.core.hf import load_tokenizer
    from conceptlm.core.progress import progress_bar

    cfg = TokenizeConfig(**cfg_dict)
    out_p = Path(out)
    tokenizer = load_tokenizer(out_p / "tokenizer")
    eos = tokenizer.eos_token_id
    dtype = token_dtype(len(tokenizer))
    D = cfg.docs_per_shard
    done: dict[int, bool] = {}

    def mine(k: int) -> bool:
        if k % n_workers != worker:
            return False
        if k not in done:
            done[k] = _piece_done(out_p, k)
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
        _write_piece(out_p, current, read, buffers)

    for index, text, path, line in reader.records(lambda i: mine(i // D)):
        k = index // D
        if k != current:
            if current is not None:
                finish()
            current, read = k, 0
            buffers = {s: _PieceBuffer(dtype) for s in SPLITS}
        read += 1
        text = _check_text(text, path, line)
        if not text.strip():
            continue
        batch.append((text, is_validation(text, cfg.split_seed, cfg.val_fraction)))
        if len(batch) >= cfg.batch_size:
            flush()
    if current is not None:
        finish()
    bar.close()
    return int(reader.count or 0)


# ------------------------------------------------------------------------------------------------ tokenizer
def tokenizer_sample(cfg: TokenizeConfig) -> list[str]:
    """The tokenizer's training documents: of the training-split documents, the ``tokenizer_sample_docs`` with the
    smallest keys blake2b(tokenizer_seed, index) (a uniform seeded sample, one streaming pass, memory bounded by
    the sample), each cut to its first 128k characters, in source order."""
    key = int(cfg.tokenizer_seed).to_bytes(8, "little", signed=True)
    heap: list[tuple[int, int, str]] = []  # (-key, index, text): a max-heap of the smallest keys
    for index, text, path, line in SourceReader(cfg).records():
        text = _check_text(text, path, line)
        if not text.strip() or is_validation(text, cfg.split_seed, cfg.val_fraction):
            continue
        k = int.from_bytes(hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8, key=key).digest(), "little")
        item = (-k, index, text[:_SAMPLE_CHARS])
        if len(heap) < cfg.tokenizer_sample_docs:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    return [t for _, _, t in sorted(heap, key=lambda x: x[1])]


def _tokenizer_identity(cfg: TokenizeConfig) -> tuple[dict[str, Any], Any, str]:
    """(tokenizer settings, the given tokenizer or None, its input fingerprint)."""
    if cfg.tokenizer:
        from conceptlm.core.hf import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
        if tok.eos_token_id is None:
            raise ConfigError(f"{cfg.tokenizer}: the tokenizer has no EOS token (documents are separated by EOS)",
                              field="tokenizer")
        return {"given": True}, tok, tokenizer_fingerprint(tok)
    settings = {"given": False, "train": "bpe", "vocab_size": cfg.vocab_size,
                "sample_docs": cfg.tokenizer_sample_docs, "seed": cfg.tokenizer_seed, "sample_chars": _SAMPLE_CHARS}
    return settings, None, "trained on the source"


def _prepare_tokenizer(cfg: TokenizeConfig, out: Path, given) -> None:
    """Make ``out/tokenizer`` (atomically) unless a previous run of the same identity made it."""
    target = out / "tokenizer"
    if target.is_dir():
        return
    if given is None:
        from conceptlm.core.tokenizer import train_bpe_tokenizer

        log.info("training a %d-token BPE on a sample of at most %d training documents", cfg.vocab_size,
                 cfg.tokenizer_sample_docs)
        given = train_bpe_tokenizer(tokenizer_sample(cfg), vocab_size=cfg.vocab_size)
    with atomic_dir(target) as tmp:
        given.save_pretrained(tmp)


def _clean_temporaries(out: Path) -> None:
    """Remove what a killed run left half-written (``.tmp-*`` files and folders)."""
    for sub in (out, *(out / s for s in SPLITS), out / "pieces"):
        if not sub.is_dir():
            continue
        for p in sub.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ the verb
@contextlib.contextmanager
def _dist():
    """(torch.distributed or None, rank, world size): a gloo group under torchrun (made here and removed at the end
    when none exists yet), None in one process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    made = world > 1 and not dist.is_initialized()
    if made:
        dist.init_process_group(backend="gloo")
    try:
        yield (dist if world > 1 else None), rank, world
    finally:
        if made:
            dist.destroy_process_group()


def _broadcast(dist, obj: Any) -> Any:
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def tokenize(cfg: TokenizeConfig, *, output: str | None = None) -> dict[str, Any]:
    """Tokenize ``cfg.source`` into the token-shard folder ``cfg.out`` (``output`` overrides it); one process or
    under torchrun (each rank runs ``cfg.workers`` workers). Returns a summary (counts, fingerprint, reused)."""
    with _dist() as (dist, rank, world):
        return _tokenize(cfg, Path(output or cfg.out), dist, rank, world)


def _tokenize(cfg: TokenizeConfig, out: Path, dist, rank: int, world: int) -> dict[str, Any]:
    reader = SourceReader(cfg)
    status: Any = None
    if rank == 0:
        try:
            tok_settings, given, tok_input = _tokenizer_identity(cfg)
            vocab = len(given) if given is not None else cfg.vocab_size
            identity = Identity(KIND, FORMAT, {
                "docs_per_shard": cfg.docs_per_shard, "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed,
                "dtype": token_dtype(vocab), "source": reader.reading_settings(), "tokenizer": tok_settings},
                {"source": source_fingerprint(reader), "tokenizer": tok_input})
            action = decide(out, identity, on_change=cfg.on_change, what=str(out), option="on_change")
            manifest = read_manifest(out) if action == "reuse" else None
            if manifest is not None and is_complete(manifest):
                status = ("reuse", manifest)
            else:
                if action == "rebuild" or (action == "reuse" and manifest is None):
                    shutil.rmtree(out, ignore_errors=True)
                if manifest is None:
                    begin(out, identity)
                _clean_temporaries(out)
                _prepare_tokenizer(cfg, out, given)
                status = ("work", identity.as_dict())
        except Exception as e:  # noqa: BLE001 - every rank must hear of a failure on rank 0
            status = ("error", e)
    status = _broadcast(dist, status)
    if status[0] == "error":
        raise status[1]
    if status[0] == "reuse":
        log.info("%s: token shards up to date, reused", out)
        return _summary(out, status[1], reused=True)
    identity = Identity(**{k: status[1][k] for k in ("kind", "format", "settings", "inputs")})

    n_proc = world * cfg.workers
    show = cfg.progress and rank == 0
    ids = [rank * cfg.workers + w for w in range(cfg.workers)]
    cfg_dict = asdict(cfg)
    if cfg.workers == 1:
        counts = [_work(cfg_dict, str(out), ids[0], n_proc, show)]
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with _env(TOKENIZERS_PARALLELISM="false"), ctx.Pool(cfg.workers) as pool:
            counts = pool.starmap(_work, [(cfg_dict, str(out), i, n_proc, show and j == 0)
                                          for j, i in enumerate(ids)])
    total = max(counts)
    if dist is not None:
        import torch

        t = torch.tensor([total], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        total = int(t.item())
        dist.barrier()
    result: Any = None
    if rank == 0:
        try:
            result = _finalize(out, identity, total, cfg.docs_per_shard)
        except Exception as e:  # noqa: BLE001
            result = e
    result = _broadcast(dist, result)
    if isinstance(result, Exception):
        raise result
    return _summary(out, result, reused=False)


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _finalize(out: Path, identity: Identity, total: int, docs_per_shard: int) -> dict[str, Any]:
    """Write ``artifact.json`` from the pieces' completion records (rank 0, once every piece is done)."""
    from conceptlm.core.hf import load_tokenizer

    if total == 0:
        raise DataError("the source holds no document", path=out)
    n_pieces = math.ceil(total / docs_per_shard)
    splits: dict[str, Any] = {s: {"tokens": 0, "documents": 0, "shards": []} for s in SPLITS}
    files: dict[str, Any] = {}
    for k in range(n_pieces):
        p = _record_path(out, k)
        if not p.is_file():
            raise DataError(f"piece {k} was not written (a worker failed?); rerun to finish it", path=p)
        rec = json.loads(p.read_text(encoding="utf-8"))
        for s in SPLITS:
            r = rec[s]
            splits[s]["tokens"] += r["tokens"]
            splits[s]["documents"] += r["documents"]
            splits[s]["shards"].append({"name": f"{s}/{k:05d}", "tokens": r["tokens"], "documents": r["documents"]})
            files.update(r["files"])
    if splits["train"]["tokens"] == 0:
        raise DataError("no training document has any text", path=out)
    tok_files = sorted(str(q.relative_to(out)).replace(os.sep, "/") for q in (out / "tokenizer").rglob("*")
                       if q.is_file())
    files.update(file_listing(out, tok_files))
    tok = load_tokenizer(out / "tokenizer")
    extra = {"tokenizer_fingerprint": tokenizer_fingerprint(tok), "eos_id": tok.eos_token_id,
             "vocab_size": len(tok), "dtype": token_dtype(len(tok)), "documents_read": total, "pieces": n_pieces,
             "splits": splits}
    if identity.settings["dtype"] != extra["dtype"]:
        raise DataError(f"the tokenizer has {len(tok)} ids: dtype {extra['dtype']}, not {identity.settings['dtype']}",
                        path=out / "tokenizer")
    manifest = {**identity.as_dict(), "fingerprint": identity.fingerprint,
                "files": {k: files[k] for k in sorted(files)}, **extra}
    atomic_write_text(out / "artifact.json", json.dumps(json.loads(canonical_json(manifest)), indent=1,
                                                        ensure_ascii=False) + "\n")
    return manifest


def _summary(out: Path, manifest: dict[str, Any], *, reused: bool) -> dict[str, Any]:
    return {"out": str(out), "fingerprint": manifest["fingerprint"], "reused": reused,
            "tokenizer_fingerprint": manifest["tokenizer_fingerprint"],
            "train": {k: manifest["splits"]["train"][k] for k in ("tokens", "documents")},
            "validation": {k: manifest["splits"]["validation"][k] for k in ("tokens", "documents")},
            "pieces": manifest["pieces"]}
