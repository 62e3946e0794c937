"""The ``prepare`` verb: documents -> sentences -> embeddings in Parquet shards, plus the fitted normalizer.

Documents (:mod:`~conceptlm.lcm.data.documents`) are segmented (:mod:`~conceptlm.lcm.data.segment`), optionally
capped at ``max_sentences`` and suffixed with the paper's end-of-document concept "End of text." (§2.3.1), and embedded
(:mod:`~conceptlm.lcm.data.encoders`); every ``shard_size`` documents form one shard (layout in
:mod:`~conceptlm.lcm.data.store`). Each shard is written to a temporary name and renamed, ``prepare_state.json`` records
the settings, and ``manifest.json`` is written last.

Resuming: a second run with the same settings walks the same deterministic document stream, keeps every shard
already on disk whose recorded content fingerprint (its documents' ids, splits, texts and sentences, the settings
and the encoder; Parquet metadata ``conceptlm.inputs``) equals the one it would write now -- and, when the folder
was complete, whose sha256 still matches ``artifact.json`` -- and encodes only the missing ones, so a run killed at
any moment resumes without duplicates or holes. A shard made from other documents (a changed text, other ids) or
a damaged one is refused with one line naming the shard and what changed (``prepare.on_change: refuse``, the
default), or re-encoded (``prepare.on_change: rebuild``, only those shards). The normalizer is then fitted on the
vectors of the training documents as stored (fp16), on at most ``normalizer_max_samples`` evenly strided vectors
(a warning when fewer than :data:`~conceptlm.lcm.data.normalizer.MIN_FIT_VECTORS`), by one streaming pass over the
shards: exact up to ``normalizer_max_fit_vectors`` vectors, a seeded uniform sample of that many beyond
(:func:`fit_normalizer_streaming`); ``artifact.json`` (kind ``lcm.prepared``) and ``manifest.json`` are written last.

The folder is locked (:class:`~conceptlm.core.lock.RunLock`) while ``prepare`` writes it. A refused run changes
nothing; a run that fails (e.g. the disk is full) leaves only complete shards, and no folder at all when it had
created the folder and finished no shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from conceptlm.core.artifact import (
    ARTIFACT_FILE,
    Identity,
    StaleArtifactError,
    damaged_file,
    digest,
    read_manifest,
    write_manifest,
)
from conceptlm.core.errors import ConceptLMError, ConfigError, DataError
from conceptlm.core.io import atomic_write_text
from conceptlm.core.lock import RunLock
from conceptlm.core.progress import progress_bar
from conceptlm.lcm.config import DocsSection, PrepareConfig, PrepareSection
from conceptlm.lcm.data.documents import iter_documents, split_instruction
from conceptlm.lcm.data.encoders import SentenceEncoder, get_encoder, identity_fingerprint
from conceptlm.lcm.data.normalizer import NORMALIZER_FILE, RobustNormalizer, warn_if_few_vectors
from conceptlm.lcm.data.segment import Segmenter, get_segmenter
from conceptlm.lcm.data.store import (
    ARTIFACT_KIND,
    FORMAT,
    MANIFEST_FILE,
    STATE_FILE,
    assign_split,
    documents_table,
    read_shard,
    shard_inputs,
    shard_name,
)

__all__ = ["prepare", "segment_document"]

log = logging.getLogger(__name__)
_SURROGATE = re.compile("[\ud800-\udfff]")
_SHARD_RE = re.compile(r"^shard-(\d{5})\.parquet$")
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def segment_document(doc_id: str, text: str, segmenter: Segmenter, section: PrepareSection,
                     marker: str | None = None) -> list[tuple[str, list[str]]]:
    """``[(id, sentences)]`` for one document: segmented, end-of-text appended, capped/wrapped. An instruction
    example (``marker`` given and a marker line in the text) is its source's sentences, the marker as a sentence,
    then its answer's sentences; it is never wrapped: beyond the cap its first source sentences are dropped (and
    the example, if even the marker does not fit)."""
    pair = split_instruction(text, marker) if marker else None
    if pair is not None:
        source, answer = (segmenter.split(part) for part in pair)
        if not source or not answer:
            return []
        sentences = [*source, marker, *answer]
    else:
        sentences = segmenter.split(text)
    if not sentences:
        return []
    cap = section.max_sentences
    eot = [section.end_of_text_sentence] if section.end_of_text else []
    if cap is None or len(sentences) + len(eot) <= cap:
        return [(doc_id, sentences + eot)]
    if pair is not None:  # too long: keep the end (the marker and the answer), drop sentences of the source
        kept = (sentences + eot)[-cap:]
        return [(doc_id, kept)] if marker in kept[:-1] else []
    if section.long_documents == "truncate":
        return [(doc_id, sentences[:cap])]
    full = sentences + eot
    return [(f"{doc_id}#{k}", full[i:i + cap]) for k, i in enumerate(range(0, len(full), cap))]


# Settings that do not change what a written shard holds (skip_bad only decides whether a run stops, on_change
# what a rerun does with a shard that differs, workers how many processes write them).
_NOT_CONTENT = ("out_dir", "skip_bad", "on_change", "workers")
_REBUILD = "rerun with prepare.on_change=rebuild, use another prepare.out_dir or delete it"


def _state(cfg: PrepareConfig, identity: dict) -> dict:
    prep = {k: v for k, v in asdict(cfg.prepare).items() if k not in _NOT_CONTENT}
    return {"format": FORMAT, "docs": asdict(cfg.docs), "segment": asdict(cfg.segment),
            "encoder": {k: v for k, v in identity.items() if k != "path"}, "prepare": prep}


def _identity_settings(state: dict) -> dict:
    """The settings part of the folder's identity: the state without paths (the documents' source is identified
    by their content; the encoder by :func:`~conceptlm.lcm.data.encoders.identity_fingerprint`)."""
    return {"format": state["format"], "docs": {k: v for k, v in state["docs"].items() if k != "source"},
            "segment": state["segment"], "prepare": state["prepare"]}


def shard_fingerprint(base: dict, docs: list[dict]) -> str:
    """Content fingerprint of a shard: ``base`` (settings and encoder fingerprint) and, per document, its id,
    split, stored text and sentences, in order."""
    return digest({**base, "documents": [[d["id"], d["split"], d.get("text"), list(d["sentences"])] for d in docs]})


def _check_state(out: Path, state: dict, on_change: str = "refuse") -> bool:
    """Whether ``out`` holds shards of other settings that must all be rebuilt (``on_change=rebuild``); refuses
    with one line naming the settings that differ otherwise."""
    path = out / STATE_FILE
    if not path.is_file() or not any(_SHARD_RE.match(p.name) for p in out.iterdir()):
        return False  # nothing written that the settings could contradict
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        diffs = [f"{sec}.{k}" for sec in ("docs", "segment", "encoder", "prepare")
                 for k in sorted(set(old.get(sec, {})) | set(state[sec]))
                 if old.get(sec, {}).get(k) != state[sec].get(k)
                 and (sec, k) != ("docs", "source")]  # where the documents are is not identity: each shard's
        # content fingerprint (ids, texts) decides whether its documents are the same
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
        diffs = [f"{STATE_FILE} unreadable"]
    if not diffs:
        return False
    if on_change == "rebuild":
        log.warning("%s: shards were prepared with other settings (%s differ): rebuilding all of them", out,
                    ", ".join(diffs[:6]))
        return True
    raise ConfigError(f"{out} holds shards prepared with other settings ({', '.join(diffs[:6])} differ); {_REBUILD}",
                      field="prepare.out_dir")


def _clear(out: Path) -> None:
    """Remove what ``prepare`` wrote in ``out`` (shards, normalizer, state and manifests), nothing else."""
    for p in out.iterdir():
        if _SHARD_RE.match(p.name) or p.name in (NORMALIZER_FILE, STATE_FILE, MANIFEST_FILE, ARTIFACT_FILE):
            p.unlink(missing_ok=True)


def _remove_temporaries(out: Path) -> None:
    for p in out.glob(".tmp-*"):
        if p.is_file():
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def _writing(path: Path):
    """An OSError while writing ``path`` (a full disk, a read-only folder) becomes one line naming it."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise DataError(f"cannot write ({reason}); free space or fix the folder, then run prepare again (it "
                        "resumes from the complete shards)", path=path) from None


def _write_shard(path: Path, docs: list[dict], dim: int, section: PrepareSection, inputs: str | None = None
                 ) -> None:
    """Write a shard (``inputs``: its content fingerprint, in the Parquet metadata) under a temporary name,
    fsync, rename."""
    import pyarrow.parquet as pq

    table = documents_table(docs, dim, section.vector_dtype, inputs=inputs)
    with _writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            pq.write_table(table, tmp, compression=None if section.compression == "none" else section.compression,
                           row_group_size=section.row_group_size)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _what_changed(path: Path, docs: list[dict]) -> str:
    """How the documents stored in ``path`` differ from ``docs`` (one phrase)."""
    try:
        have = read_shard(path, ["id", "split", "text", "sentences"])
    except DataError:
        return "unreadable (damaged)"
    ids = [d["id"] for d in docs]
    if have["id"] != ids:
        k = next((i for i, (a, b) in enumerate(zip(have["id"], ids)) if a != b), min(len(ids), len(have["id"])))
        old = have["id"][k] if k < len(have["id"]) else "<none>"
        new = ids[k] if k < len(ids) else "<none>"
        return (f"holds other documents than the input gives now (document {k + 1}: {old!r} -> {new!r}; "
                f"{len(have['id'])} -> {len(ids)} documents)")
    for i, d in enumerate(docs):
        if have["text"][i] != d.get("text"):
            return f"the text of document {d['id']!r} changed since the shard was written"
        if list(have["sentences"][i]) != list(d["sentences"]):
            return f"the sentences of document {d['id']!r} changed since the shard was written"
        if have["split"][i] != d["split"]:
            return f"document {d['id']!r} moved from the {have['split'][i]} to the {d['split']} split"
    return "made with other settings or another encoder"


def _embed(docs: list[dict], encoder: SentenceEncoder, batch_size: int | None) -> None:
    """Fill ``doc["vectors"]`` ((n, dim) float32) for every document; identical sentences are encoded once."""
    unique: dict[str, int] = {}
    for d in docs:
        for s in d["sentences"]:
            unique.setdefault(s, len(unique))
    vectors = encoder.encode(list(unique), batch_size=batch_size).numpy()
    for d in docs:
        d["vectors"] = vectors[[unique[s] for s in d["sentences"]]]


def _marker(docs: DocsSection) -> str | None:
    """The instruction marker when the documents are instruction pairs, else None."""
    return docs.instruction_marker if docs.target_field or docs.generated_task == "summary" else None


def _documents(cfg: PrepareConfig, segmenter: Segmenter, skipped: Counter) -> Iterator[dict]:
    seen: set[str] = set()
    sec = cfg.prepare
    for doc_id, text in iter_documents(cfg.docs, skip_bad=sec.skip_bad, skipped=skipped):
        if _SURROGATE.search(text):
            err = DataError("text holds a lone surrogate (not valid Unicode)", path=cfg.docs.source, field=doc_id)
            if not sec.skip_bad:
                raise err
            skipped["bad_text"] += 1
            continue
        pieces = segment_document(doc_id, text, segmenter, sec, marker=_marker(cfg.docs))
        if not pieces:
            if not sec.skip_bad:
                raise DataError("document has no sentence", path=cfg.docs.source, field=doc_id)
            skipped["no_sentences"] += 1
            continue
        if doc_id in seen:
            raise DataError(f"duplicate document id {doc_id!r}", path=cfg.docs.source, field=cfg.docs.id_field)
        seen.add(doc_id)
        split = assign_split(doc_id, sec.val_fraction, sec.split_seed)
        for piece_id, sentences in pieces:
            yield {"id": piece_id, "split": split, "text": text if sec.keep_text and len(pieces) == 1 else None,
                   "sentences": sentences}


def _train_vectors(path: Path) -> Iterator[np.ndarray]:
    """The training documents' vectors of one shard, in row order, one row group at a time (stored dtype)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conceptlm.lcm.data.store import _decode_columns

    try:
        pf = pq.ParquetFile(path)
        for g in range(pf.metadata.num_row_groups):
            data = _decode_columns(pf.read_row_group(g, columns=["split", "vectors"]))
            flat, offsets = data["vectors"]
            train = np.array([sp == "train" for sp in data["split"]], dtype=bool)
            rows = np.repeat(train, np.diff(offsets))  # one flag per vector
            yield flat[rows]
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read Parquet shard ({type(e).__name__})", path=path) from None


def fit_normalizer_streaming(out: Path, shards: list[dict], dim: int, section: PrepareSection) -> RobustNormalizer:
    """Fit the normalizer on the training vectors of ``shards`` (records with ``file`` and ``n_train_sentences``)
    by one pass over the shards, one Parquet row group at a time.

    Which vectors: with ``n`` training vectors in shard order, every ``stride = ceil(n /
    normalizer_max_samples)``-th one (all when ``n <= normalizer_max_samples``); call them the ``s`` selected
    vectors. When ``s <= normalizer_max_fit_vectors`` the fit is on all of them, exactly what fitting on the
    concatenated matrix gives. Beyond it, on a uniform sample without replacement of ``m =
    normalizer_max_fit_vectors`` of them: the ``j``-th selected vector gets the key ``u_j``, the ``j``-th draw of
    ``numpy.random.Generator(PCG64(normalizer_sample_seed)).random()``, and the ``m`` smallest keys are kept
    ("bottom-k", a reservoir of size m), then ordered by ``j``. The shards and their order do not depend on how
    many workers or ranks wrote them, so neither does the fit. Memory: at most ``min(s, 2m)`` float32 vectors
    plus one row group.
    """
    n_train = sum(s["n_train_sentences"] for s in shards)
    if n_train < 2:
        raise ConceptLMError(f"{out}: fewer than 2 training sentences; cannot fit the normalizer "
                             "(lower prepare.val_fraction or add documents)")
    stride = max(1, -(-n_train // section.normalizer_max_samples))
    n_sel = -(-n_train // stride)
    m = section.normalizer_max_fit_vectors
    exact = n_sel <= m
    rng = np.random.Generator(np.random.PCG64(section.normalizer_sample_seed))
    buf = np.empty((n_sel if exact else 0, dim), dtype=np.float32)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (keys, positions, vectors) not yet compacted
    held, bar = 0, np.inf  # vectors in parts; the m-th smallest key so far (a larger key never enters the sample)

    def compact() -> None:
        nonlocal parts, held, bar
        keys, pos, vecs = (np.concatenate([p[i] for p in parts]) for i in range(3))
        if len(keys) > m:
            keep = np.argpartition(keys, m - 1)[:m]
            keys, pos, vecs = keys[keep], pos[keep], vecs[keep]
            bar = float(keys.max())
        parts, held = [(keys, pos, vecs)], len(keys)

    seen = filled = 0  # training vectors passed, selected vectors passed
    for s in shards:
        for vectors in _train_vectors(out / s["file"]):
            take = np.flatnonzero((seen + np.arange(len(vectors))) % stride == 0)  # every stride-th overall
            seen += len(vectors)
            if exact:
                buf[filled:filled + len(take)] = vectors[take]
            else:
                keys = rng.random(len(take))
                enter = np.flatnonzero(keys < bar)
                parts.append((keys[enter], filled + enter, vectors[take[enter]].astype(np.float32)))
                held += len(enter)
                if held >= 2 * m:  # at most 2m vectors held between compactions
                    compact()
            filled += len(take)
    if filled != n_sel or seen != n_train:
        raise DataError(f"the shards hold {seen} training vectors, {MANIFEST_FILE} records {n_train}", path=out)
    if not exact:
        compact()
        _, pos, vecs = parts[0]
        buf = vecs[np.argsort(pos, kind="stable")]  # in shard order
        log.info("%s: normalizer fitted on a seeded uniform sample of %d of %d training vectors "
                 "(prepare.normalizer_max_fit_vectors)", out, len(buf), n_sel)
    norm = RobustNormalizer(dim, method=section.normalizer_method, clip_proba=section.normalizer_clip_proba)
    norm.fit(torch.from_numpy(buf))
    warn_if_few_vectors(norm.n_fit, str(out))
    return norm


_fit_normalizer = fit_normalizer_streaming  # the name the trust tests call


def _shard_record(name: str, docs: list[dict]) -> dict:
    return {"file": name, "n_documents": len(docs),
            "n_sentences": int(sum(len(d["sentences"]) for d in docs)),
            "n_train_documents": sum(d["split"] == "train" for d in docs),
            "n_train_sentences": int(sum(len(d["sentences"]) for d in docs if d["split"] == "train"))}


# ------------------------------------------------------------------------------------------------ embedding workers
_WORKER_ENCODER: SentenceEncoder | None = None  # the encoder of a worker process (loaded once, by _pool_init)


def _pool_init(section, threads: int) -> None:
    global _WORKER_ENCODER
    from conceptlm.core.progress import silence_library_bars

    silence_library_bars()
    torch.set_num_threads(threads)
    _WORKER_ENCODER = get_encoder(section)


def _pool_identity() -> tuple[dict, int]:
    return _WORKER_ENCODER.identity(), _WORKER_ENCODER.dim


def _pool_write(path: str, docs: list[dict], fp: str, section: PrepareSection, batch_size: int | None
                ) -> tuple[float, int]:
    """Embed and write one shard in a worker; returns (encode seconds, sentences)."""
    t = time.perf_counter()
    _embed(docs, _WORKER_ENCODER, batch_size)
    seconds = time.perf_counter() - t
    _write_shard(Path(path), docs, _WORKER_ENCODER.dim, section, inputs=fp)
    return seconds, sum(len(d["sentences"]) for d in docs)


class _Embedder:
    """Embeds and writes shards: in this process (``workers=1``, the encoder loaded here), or in a pool of
    ``workers`` spawned processes, each loading the encoder once (this process then never loads it: the identity
    comes from a worker). At most ``2 * workers`` shards are in flight, so memory stays bounded."""

    def __init__(self, cfg: PrepareConfig):
        self.cfg, self.workers = cfg, cfg.prepare.workers
        self.encode_seconds, self.encoded_sentences = 0.0, 0
        self._pending: list = []
        if self.workers == 1:
            self.encoder: SentenceEncoder | None = get_encoder(cfg.encoder)
            self.identity, self.dim = self.encoder.identity(), self.encoder.dim
            self._pool = None
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.encoder = None
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // (self.workers * local))
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_pool_init, initargs=(cfg.encoder, threads))
        try:
            self.identity, self.dim = self._pool.submit(_pool_identity).result()
        except BaseException:
            self.close()
            raise

    def submit(self, path: Path, docs: list[dict], fp: str) -> None:
        batch_size = self.cfg.encoder.batch_size
        if self._pool is None:
            t = time.perf_counter()
            _embed(docs, self.encoder, batch_size)
            self.encode_seconds += time.perf_counter() - t
            self.encoded_sentences += sum(len(d["sentences"]) for d in docs)
            _write_shard(path, docs, self.dim, self.cfg.prepare, inputs=fp)
            return
        self._pending.append(self._pool.submit(_pool_write, str(path), docs, fp, self.cfg.prepare, batch_size))
        while len(self._pending) > 2 * self.workers:
            self._collect(self._pending.pop(0))

    def _collect(self, future) -> None:
        seconds, sentences = future.result()
        self.encode_seconds += seconds / self.workers  # about the pool's wall time
        self.encoded_sentences += sentences

    def drain(self) -> None:
        """Wait for every shard in flight (the first failure is raised)."""
        while self._pending:
            self._collect(self._pending.pop(0))

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending:
                f.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _ranks() -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) the gloo process group is initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from conceptlm.core.distributed import get_rank, get_world_size, init_distributed

    init_distributed("cpu")
    return get_rank(), get_world_size()


def _gather(obj) -> list:
    import torch.distributed as dist

    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, obj)
    return got


def prepare(cfg: PrepareConfig, *, checkpoint: str | None = None, output: str | None = None) -> dict:
    """Segment, embed and store ``cfg.docs`` in ``output`` (default ``cfg.prepare.out_dir``); resumable.

    Parallel: ``prepare.workers`` processes embed and write shards; under torchrun every rank reads and segments
    the whole document stream (the shard boundaries depend on it) and embeds and writes the shards ``k`` with ``k
    % world_size == rank``; rank 0 holds the folder lock, checks the folder before and fits the normalizer and
    writes the manifests after. Which documents form shard ``k`` depends only on the documents and
    ``shard_size``, so the folder is byte-identical for any number of workers and ranks.

    Args:
        checkpoint: unused (the verb signature shared by all methods).
        output: the output folder, overriding ``prepare.out_dir``.

    Returns:
        A JSON-able summary: counts of documents/sentences/shards (written, reused and rebuilt), skips by reason,
        the encoder identity, the normalizer path, the folder's fingerprint and timings.

    Raises:
        RunLockedError: another process is preparing the same folder.
        StaleArtifactError / ConfigError: the folder holds shards made from other documents or settings, or a
            damaged shard (``prepare.on_change=refuse``); nothing is changed then.
        DataError: bad input, or a write failed (e.g. the disk is full): one line naming the file.
    """
    del checkpoint
    sec = cfg.prepare
    out = Path(output or sec.out_dir)
    segmenter = get_segmenter(cfg.segment)
    rank, world = _ranks()
    embedder = _Embedder(cfg)
    try:
        created = not out.exists()
        lock = RunLock(out) if rank == 0 else None
        if lock is not None:
            with _writing(out):
                lock.acquire()
        try:
            return _prepare_locked(cfg, out, segmenter, embedder, rank, world)
        except BaseException:
            if lock is not None and created and out.is_dir() and not any(_SHARD_RE.match(p.name)
                                                                         for p in out.iterdir()):
                shutil.rmtree(out, ignore_errors=True)  # a refused or failed first run leaves nothing behind
            raise
        finally:
            if lock is not None:
                lock.release()
    finally:
        embedder.close()


def _agree(rank: int, world: int, step, *args):
    """Run ``step(*args)`` on rank 0 and give its result to every rank (an error there is raised on every rank,
    as one line); with one process just ``step(*args)``."""
    if world == 1:
        return step(*args)
    import torch.distributed as dist

    box: list = [None, None]
    if rank == 0:
        try:
            box = [step(*args), None]
        except ConceptLMError as e:
            box = [None, str(e)]
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise ConceptLMError(f"rank 0: {box[1]}")
    return box[0]


def _prepare_locked(cfg: PrepareConfig, out: Path, segmenter: Segmenter, embedder: _Embedder, rank: int = 0,
                    world: int = 1) -> dict:
    t0 = time.perf_counter()
    sec = cfg.prepare
    identity = embedder.identity
    state = _state(cfg, identity)
    settings = _identity_settings(state)
    encoder_fp = identity_fingerprint(identity)
    base = {"settings": settings, "encoder": encoder_fp}

    def look() -> tuple[bool, dict | None]:
        rebuild_all = _check_state(out, state, sec.on_change)
        try:
            old = None if rebuild_all else read_manifest(out)
        except DataError:
            old = None  # an unreadable manifest: the shards are checked by their fingerprints alone
        old = old if old and old.get("kind") == ARTIFACT_KIND else None
        _remove_temporaries(out)
        return rebuild_all, old

    rebuild_all, old = _agree(rank, world, look)
    old_files = (old or {}).get("files") or {}
    old_inputs = {r.get("file"): r.get("inputs") for r in (old or {}).get("shards") or [] if isinstance(r, dict)}
    modified = False

    def invalidate() -> None:
        """Before the first change: the folder is incomplete until the manifests are written again."""
        nonlocal modified
        if modified:
            return
        with _writing(out / STATE_FILE):
            if rebuild_all:
                _clear(out)
            (out / MANIFEST_FILE).unlink(missing_ok=True)
            (out / ARTIFACT_FILE).unlink(missing_ok=True)
            atomic_write_text(out / STATE_FILE, json.dumps(state, indent=1) + "\n")
        modified = True

    if world > 1:  # ranks write at once: rank 0 marks the folder incomplete before any of them starts
        _agree(rank, world, invalidate)
        modified = True

    def reuse_problem(path: Path, fp: str, docs: list[dict]) -> str | None:
        try:
            have = shard_inputs(path)
        except DataError:
            return "unreadable (damaged)"
        if have is None:
            return "made by an older version of conceptlm (no content fingerprint)"
        if have != fp:
            return _what_changed(path, docs)
        if old_inputs.get(path.name) == fp and path.name in old_files:
            problem = damaged_file(out, {"files": old_files}, [path.name])
            if problem is not None:
                return f"damaged ({problem.split(': ', 1)[-1]})"
        return None

    skipped: Counter = Counter()
    records: list[dict] = []
    counts = Counter()  # written, reused, rebuilt
    bar = progress_bar(total=cfg.docs.n_documents if cfg.docs.source == "generated" else None, desc="prepare",
                       unit="doc", enabled=rank == 0)

    def flush(buffer: list[dict]) -> None:
        name = shard_name(len(records))
        path = out / name
        fp = shard_fingerprint(base, buffer)
        mine = len(records) % world == rank  # this rank's shard
        records.append({**_shard_record(name, buffer), "inputs": fp})
        bar.set_postfix(shards=len(records))
        if not mine:
            return
        problem = "rebuild" if rebuild_all or not path.is_file() else reuse_problem(path, fp, buffer)
        if problem is None:
            counts["reused"] += 1
            return
        if path.is_file() and not rebuild_all:
            if sec.on_change != "rebuild":
                raise StaleArtifactError(f"{path}: {problem}; {_REBUILD}")
            log.warning("%s: %s; rebuilding it (prepare.on_change=rebuild)", path, problem)
            counts["rebuilt"] += 1
        invalidate()
        embedder.submit(path, buffer, fp)
        counts["written"] += 1

    error: ConceptLMError | None = None
    try:
        buffer: list[dict] = []
        for doc in _documents(cfg, segmenter, skipped):
            buffer.append(doc)
            bar.update(1)
            if len(buffer) == sec.shard_size:
                flush(buffer)
                buffer = []
        if buffer:
            flush(buffer)
        embedder.drain()
    except ConceptLMError as e:
        if world == 1:
            raise
        error = e
    finally:
        bar.close()
    counts.update(encoded=embedder.encoded_sentences)
    encode_seconds = embedder.encode_seconds
    if world > 1:  # every rank learns whether all shards were written, and the totals
        gathered = _gather((None if error is None else str(error), dict(counts), encode_seconds))
        if error is not None:
            raise error
        failed = next((f"rank {r}: {g[0]}" for r, g in enumerate(gathered) if g[0] is not None), None)
        if failed:
            raise ConceptLMError(failed)
        counts = sum((Counter(g[1]) for g in gathered), Counter())
        encode_seconds = max(g[2] for g in gathered)
    if not records:
        raise ConceptLMError(f"{cfg.docs.source}: no documents to prepare")

    totals = {"n_documents": sum(r["n_documents"] for r in records),
              "n_sentences": sum(r["n_sentences"] for r in records),
              "n_train_documents": sum(r["n_train_documents"] for r in records),
              "n_train_sentences": sum(r["n_train_sentences"] for r in records)}
    totals["n_validation_documents"] = totals["n_documents"] - totals["n_train_documents"]
    artifact = Identity(kind=ARTIFACT_KIND, format=1, settings=settings,
                        inputs={"encoder": encoder_fp, "documents": digest([r["inputs"] for r in records])})

    def finish() -> None:
        stale = sorted(p.name for p in out.iterdir()
                       if (m := _SHARD_RE.match(p.name)) and int(m.group(1)) >= len(records))
        if stale:
            if sec.on_change != "rebuild":
                raise StaleArtifactError(f"{out} holds shards beyond the {len(records)} this input makes "
                                         f"({', '.join(stale[:3])}); {_REBUILD}")
            log.warning("%s: removing %d shards beyond the %d this input makes", out, len(stale), len(records))
            invalidate()
            for name in stale:
                (out / name).unlink()
        complete = (not modified and old is not None and old.get("fingerprint") == artifact.fingerprint
                    and (out / MANIFEST_FILE).is_file() and damaged_file(out, old, [NORMALIZER_FILE]) is None)
        if complete:  # everything reused and intact: nothing to write
            log.info("%s: every shard and the normalizer are up to date", out)
            return
        invalidate()
        norm = fit_normalizer_streaming(out, records, embedder.dim, sec)
        with _writing(out / NORMALIZER_FILE):
            norm.save_pretrained(out)
        manifest = {"format": FORMAT, "encoder": identity, "segmenter": segmenter.config(),
                    "prepare": state["prepare"], "docs": state["docs"], "normalizer": NORMALIZER_FILE,
                    "shards": records, "skipped": dict(sorted(skipped.items())), **totals}
        with _writing(out / ARTIFACT_FILE):
            write_manifest(out, artifact, files=[r["file"] for r in records] + [NORMALIZER_FILE],
                           extra={"shards": [{"file": r["file"], "inputs": r["inputs"]} for r in records]})
        with _writing(out / MANIFEST_FILE):  # last: marks the folder complete
            atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")

    _agree(rank, world, finish)
    seconds = time.perf_counter() - t0
    summary = {"out_dir": str(out), **totals, "n_shards": len(records), "shards_written": counts["written"],
               "shards_reused": counts["reused"], "shards_rebuilt": counts["rebuilt"],
               "skipped": dict(sorted(skipped.items())), "encoder": identity["name"], "dim": embedder.dim,
               "normalizer": str(out / NORMALIZER_FILE), "fingerprint": artifact.fingerprint,
               "workers": sec.workers, "ranks": world, "seconds": round(seconds, 3),
               "encode_seconds": round(encode_seconds, 3),
               "sentences_per_second": (round(counts["encoded"] / encode_seconds, 1) if encode_seconds else None)}
    if rank == 0:
        log.info("prepared %d documents (%d sentences) in %d shards at %s", totals["n_documents"],
                 totals["n_sentences"], len(records), out)
    return summary
