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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from conceptlm.core.artifact import (
    Identity,
    begin,
    canonical_json,
    decide,
    digest,
    file_listing,
    file_sha256,
    is_complete,
    read_manifest,
)
from conceptlm.core.errors import ConfigError, DataError
from conceptlm.core.io import atomic_dir, atomic_write_text
from conceptlm.data.config import TokenizeConfig
from conceptlm.data.shards import FORMAT, KIND, tokenizer_fingerprint
from conceptlm.data.token_pieces import (
    SPLITS,
    SourceReader,
    check_text,
    is_validation,
    record_path,
    token_dtype,
    work,
)

__all__ = ["tokenize", "source_fingerprint", "tokenizer_sample"]

log = logging.getLogger(__name__)

_SAMPLE_CHARS = 1 << 17
"""A document in the tokenizer's training sample is cut to this many characters."""


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


# ------------------------------------------------------------------------------------------------ tokenizer
def tokenizer_sample(cfg: TokenizeConfig) -> list[str]:
    """The tokenizer's training documents: of the training-split documents, the ``tokenizer_sample_docs`` with the
    smallest keys blake2b(tokenizer_seed, index) (a uniform seeded sample, one streaming pass, memory bounded by
    the sample), each cut to its first 128k characters, in source order."""
    key = int(cfg.tokenizer_seed).to_bytes(8, "little", signed=True)
    heap: list[tuple[int, int, str]] = []  # (-key, index, text): a max-heap of the smallest keys
    for index, text, path, line in SourceReader(cfg).records():
        text = check_text(text, path, line)
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

    from conceptlm.core.hf import load_tokenizer

    tok = load_tokenizer(out / "tokenizer")
    # the workers get the backend itself (what the fast tokenizer's batch call runs): no transformers import there
    common = (asdict(cfg), str(out), tok.backend_tokenizer.to_str(), tok.eos_token_id, token_dtype(len(tok)))
    n_proc = world * cfg.workers
    show = cfg.progress and rank == 0
    ids = [rank * cfg.workers + w for w in range(cfg.workers)]
    if cfg.workers == 1:
        counts = [work(*common, ids[0], n_proc, show)]
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with _env(TOKENIZERS_PARALLELISM="false"):  # one thread per worker: the workers are the parallelism
            pool = ctx.Pool(cfg.workers)
            try:
                counts = pool.starmap(work, [(*common, i, n_proc, show and j == 0) for j, i in enumerate(ids)])
                pool.close()
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
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
        p = record_path(out, k)
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
