"""An on-disk cache of concept labels for fixed token windows (ours: the reference code recomputes them every
step).

The teacher and the SAE are frozen, so the labels are a deterministic function of the window: computed once, they
serve every student seed and ablation, and the student's training steps no longer run the teacher.

Layout of a cache folder::

    header.json     what the labels were computed from (refused on mismatch): format, n_windows, window, k_attr,
                    dtype, n_latents, labeling settings, SAE identity (sha256 of its tensors), teacher identity,
                    corpus identity (incl. sha256 of the window tokens), batch_size, chunk_windows
    labels.npy      (n_windows, window, k_attr) latent indices, uint16 when n_latents <= 65535 else int32
    mask.npy        (n_windows, window) uint8, 1 = a valid label row
    progress.json   {"windows_done", "chunks_done", "complete"}, rewritten atomically after every chunk
    artifact.json   written by the ``label`` verb (:mod:`conceptlm.cocomix.labels`): the cache's identity when it
                    starts, plus the size and sha256 of the four files above when it completes (checked before a
                    student reads the cache)

Sharded layout (``labels.shard_windows`` = S > 0; ``shard_windows: S`` is then in the header): instead of the two
arrays, ``shards/labels-{s:06d}.npy`` and ``shards/mask-{s:06d}.npy`` hold windows ``[s*S, (s+1)*S)`` (the last
shard the rest), so shard ``s`` is aligned with those token windows. Every process of a torchrun launch computes the
shards ``s = rank, rank + world, ...`` in parallel (:func:`write_label_shards`), each shard written to a temporary
file, flushed and renamed into place (mask first, labels last: a shard is complete when its labels file exists), so
a killed run leaves only complete shards and a rerun computes the missing ones. The batches are the 1-process
run's (``S`` is a multiple of ``batch_size``), so the labels are the same bytes for any number of processes, and
the same as the single-file layout's. ``progress.json`` (``{"windows_done", "shards_done", "complete": true}``) is
written once every shard is there. Readers map the shards lazily, a few at a time (:class:`LabelCache`), so their
memory does not grow with the corpus.

The arrays are ``.npy`` files written through memory maps, chunk by chunk. A chunk's rows are flushed to disk
before the progress record that covers them is replaced, so after a kill a restart continues from the last
complete chunk and ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from conceptlm.cocomix.attribution import ConceptLabeler
from conceptlm.cocomix.identity import weights_fingerprint
from conceptlm.core.errors import ConceptLMError, DataError
from conceptlm.core.io import atomic_write_text
from conceptlm.core.progress import progress_bar

__all__ = [
    "FORMAT", "LabelCacheError", "LabelCache", "LabeledWindows", "CacheSpec",
    "label_dtype", "state_fingerprint", "windows_fingerprint", "window_ids", "cache_header", "write_label_cache",
    "missing_folders", "write_label_shards", "prepare_label_shards", "finish_label_shards", "shard_file",
    "SHARDS",
]

FORMAT = "conceptlm.cocomix.label_cache/1"
HEADER, PROGRESS, LABELS, MASK = "header.json", "progress.json", "labels.npy", "mask.npy"
SHARDS = "shards"
"""Sub-folder of a sharded cache holding its shard files."""
_OPEN_SHARDS = 4
"""Shards a reader keeps memory-mapped at once (least recently used closed first)."""


class LabelCacheError(ConceptLMError, ValueError):
    """A label cache cannot be used: it was written for another configuration, is incomplete or damaged."""


# ------------------------------------------------------------------------------------------------ identities

def label_dtype(n_latents: int) -> np.dtype:
    """Smallest integer type the cache stores latent indices in: uint16 up to 65535 latents, else int32."""
    return np.dtype(np.uint16) if n_latents <= 65535 else np.dtype(np.int32)


def state_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's parameters (names, dtypes, shapes and bytes; tied ones once): the weights by
    content, :func:`conceptlm.cocomix.identity.weights_fingerprint`. Buffers are left out: they are either derived
    from the config or training statistics (an SAE's firing counters)."""
    return weights_fingerprint(module)


def window_ids(windows: Any, i: int) -> torch.Tensor:
    """Token ids (T,) int64 of window ``i`` of a (N, T) tensor/array or a sequence of ``{"input_ids": ...}``."""
    item = windows[i]
    ids = item["input_ids"] if isinstance(item, dict) else item
    return torch.as_tensor(ids, dtype=torch.long)


def windows_fingerprint(windows: Any) -> tuple[int, int, str]:
    """(n_windows, window length T, sha256 of all token ids as int64) of a window set; windows must share T."""
    lazy = hasattr(windows, "rows") and getattr(windows, "ndim", 0) == 2  # e.g. windows read from token shards
    if lazy or (isinstance(windows, (torch.Tensor, np.ndarray)) and windows.ndim == 2):  # row chunk by chunk
        rows = windows if lazy else torch.as_tensor(windows)
        if rows.shape[1] < 2 or rows.shape[0] == 0:
            raise DataError("a label cache needs at least one window of at least 2 tokens", field="input_ids")
        digest, step = hashlib.sha256(), max(1, (1 << 22) // rows.shape[1])  # ~4M tokens at a time
        for lo in range(0, rows.shape[0], step):
            digest.update(rows[lo:lo + step].to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
        return rows.shape[0], rows.shape[1], digest.hexdigest()
    digest, length = hashlib.sha256(), None
    for i in range(len(windows)):
        ids = window_ids(windows, i)
        if length is None:
            length = len(ids)
        if ids.dim() != 1 or len(ids) != length:
            raise DataError(f"window {i} has shape {tuple(ids.shape)}; every window must have {length} tokens",
                            field="input_ids")
        digest.update(ids.numpy().astype("<i8").tobytes())
    if length is None or length < 2:
        raise DataError("a label cache needs at least one window of at least 2 tokens", field="input_ids")
    return len(windows), length, digest.hexdigest()


@dataclass(kw_only=True)
class CacheSpec:
    """What a cache is requested for (its header is derived from it and compared on restart)."""

    teacher: dict[str, Any]
    """Teacher identity, e.g. ``{"name": "smollm2-135m", "sha256": state_fingerprint(teacher)}``."""
    corpus: dict[str, Any]
    """Corpus identity, e.g. the corpus config and split; the windows' token hash is added."""
    batch_size: int = 8
    chunk_windows: int = 64
    shard_windows: int = 0
    """Windows per shard file (a multiple of ``batch_size``); 0 = the single-file layout."""


def cache_header(windows: Any, labeler: ConceptLabeler, spec: CacheSpec) -> dict[str, Any]:
    """The header a cache of ``windows`` labelled by ``labeler`` under ``spec`` must carry."""
    n, length, tokens_sha = windows_fingerprint(windows)
    desc = labeler.describe()
    return {
        "format": FORMAT,
        "n_windows": n,
        "window": length,
        "k_attr": desc["k_attr"],
        "n_latents": desc["n_latents"],
        "dtype": label_dtype(desc["n_latents"]).name,
        "labeling": desc,
        "sae": {"sha256": state_fingerprint(labeler.sae), **_sae_config(labeler.sae)},
        "teacher": dict(spec.teacher),
        "corpus": {**spec.corpus, "tokens_sha256": tokens_sha},
        "batch_size": spec.batch_size,
        "chunk_windows": spec.chunk_windows,
        **({"shard_windows": spec.shard_windows} if spec.shard_windows else {}),
    }


def shard_file(kind: str, index: int) -> str:
    """Relative path of shard ``index``'s ``labels`` or ``mask`` array in a sharded cache."""
    return f"{SHARDS}/{kind}-{index:06d}.npy"


def _n_shards(header: dict[str, Any]) -> int:
    return -(-int(header["n_windows"]) // int(header["shard_windows"]))


def _shard_rows(header: dict[str, Any], index: int) -> tuple[int, int]:
    size = int(header["shard_windows"])
    return index * size, min(int(header["n_windows"]), (index + 1) * size)


def _sae_config(sae: nn.Module) -> dict[str, Any]:
    return {"k": int(sae.k), "normalize_input": bool(getattr(sae, "normalize_input", True)),
            "eps": float(getattr(sae, "eps", 0.0))}


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} (cache {_short(old)}, requested {_short(new)})"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:20] + "..."


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LabelCacheError(f"{path}: unreadable ({type(e).__name__}); delete the cache folder to rebuild it") \
            from None
    if not isinstance(data, dict):
        raise LabelCacheError(f"{path}: not a JSON object; delete the cache folder to rebuild it")
    return data


# ----------------------------------------------------------------------------------------------------- writer

def _open_arrays(path: Path, header: dict[str, Any], fresh: bool) -> tuple[np.memmap, np.memmap]:
    shapes = {LABELS: ((header["n_windows"], header["window"], header["k_attr"]), np.dtype(header["dtype"])),
              MASK: ((header["n_windows"], header["window"]), np.dtype(np.uint8))}
    arrays = []
    for name, (shape, dtype) in shapes.items():
        file = path / name
        if fresh:
            arrays.append(np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape))
            _preallocate(file)
            continue
        try:
            arr = np.lib.format.open_memmap(file, mode="r+")
        except (OSError, ValueError) as e:
            raise LabelCacheError(f"{file}: unreadable ({type(e).__name__}) although progress.json records "
                                  f"finished chunks; delete the cache folder to rebuild it") from None
        if arr.shape != shape or arr.dtype != dtype:
            raise LabelCacheError(f"{file}: shape {arr.shape} {arr.dtype} does not match the header "
                                  f"({shape} {dtype}); delete the cache folder to rebuild it")
        arrays.append(arr)
    return arrays[0], arrays[1]


def _preallocate(file: Path) -> None:
    """Give the (sparse) file its disk blocks now, so a full disk is an ``OSError`` (ENOSPC) here rather than a
    SIGBUS when a memory-mapped page is first written. ``posix_fallocate``; zeros written where it is missing."""
    size = file.stat().st_size
    with open(file, "rb+") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
            return
        except AttributeError:  # not on this platform
            pass
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        block = 1 << 20
        for start in range(0, size, block):  # the memmap has not been written yet: zeros are its content
            f.seek(start)
            f.write(b"\0" * min(block, size - start))
        f.flush()


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def missing_folders(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` would create, deepest first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


def _remove_refused(path: Path, created: list[Path]) -> None:
    """Remove what a refused new cache wrote: its files, and the folders this call created."""
    for name in (LABELS, MASK, PROGRESS, HEADER):
        (path / name).unlink(missing_ok=True)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


def _flush(arr: np.memmap) -> None:
    arr.flush()
    with open(arr.filename, "rb+") as f:
        os.fsync(f.fileno())


def write_label_cache(path: str | Path, windows: Any, labeler: ConceptLabeler,
                      spec: CacheSpec, *, progress: bool = True, desc: str = "labels") -> dict[str, Any]:
    """Compute the labels of every window and store them in the cache folder ``path``; resume an interrupted run.

    Args:
        path: cache folder (created).
        windows: (N, T) token ids (tensor/array) or a sequence of ``{"input_ids": (T,)}`` records.
        labeler: a :class:`~conceptlm.cocomix.attribution.ConceptLabeler` (``labeler(ids) -> (labels, mask)``,
            ``describe()``, ``sae``).
        spec: teacher/corpus identities and the batch/chunk sizes (``chunk_windows`` a multiple of ``batch_size``).
        progress: show a progress bar.

    Returns:
        ``{"path", "windows", "tokens", "computed_windows", "resumed_from", "seconds", "tokens_per_s"}`` (tokens
        per second over the windows computed by this call).

    Raises:
        LabelCacheError: the folder holds a cache of another configuration, or damaged files.
    """
    _check_spec(spec)
    if spec.shard_windows:
        raise ValueError("a sharded cache is written with prepare_label_shards / write_label_shards")
    path = Path(path)
    header = cache_header(windows, labeler, spec)
    created = missing_folders(path)
    path.mkdir(parents=True, exist_ok=True)
    done = _resume_point(path, header)
    n, length = header["n_windows"], header["window"]
    summary = {"path": str(path), "windows": n, "tokens": n * length, "resumed_from": done}
    if done >= n:
        return {**summary, "computed_windows": 0, "seconds": 0.0, "tokens_per_s": 0.0}
    try:
        labels_arr, mask_arr = _open_arrays(path, header, fresh=done == 0)
    except OSError as e:
        if done == 0:
            _remove_refused(path, created)
        if e.errno in _NO_SPACE:
            need = n * length * (header["k_attr"] * np.dtype(header["dtype"]).itemsize + 1)
            raise LabelCacheError(f"{path}: no space left on the device for the label arrays ({need} bytes); free "
                                  "space or set labels.cache_dir to another disk") from None
        raise
    start = time.perf_counter()
    with progress_bar(total=n, initial=done, unit="win", desc=desc, enabled=progress) as bar:
        for lo in range(done, n, spec.chunk_windows):
            hi = min(n, lo + spec.chunk_windows)
            for b in range(lo, hi, spec.batch_size):
                e = min(hi, b + spec.batch_size)
                labels, mask = labeler(torch.stack([window_ids(windows, i) for i in range(b, e)]))
                labels_arr[b:e] = labels.cpu().numpy().astype(labels_arr.dtype)
                mask_arr[b:e] = mask.cpu().numpy().astype(np.uint8)
                bar.update(e - b)
            try:
                _flush(labels_arr)
                _flush(mask_arr)
                _write_progress(path, hi, spec.chunk_windows, complete=hi >= n)
            except OSError as e:
                if e.errno not in _NO_SPACE:
                    raise
                raise LabelCacheError(f"{path}: no space left on the device after {lo} windows; free space and "
                                      "rerun: the cache resumes from its last complete chunk") from None
    seconds = time.perf_counter() - start
    computed = n - done
    del labels_arr, mask_arr
    return {**summary, "computed_windows": computed, "seconds": seconds,
            "tokens_per_s": computed * length / max(seconds, 1e-9)}


def _write_progress(path: Path, windows_done: int, chunk_windows: int, *, complete: bool) -> None:
    chunks = -(-windows_done // chunk_windows)
    atomic_write_text(path / PROGRESS, json.dumps({"windows_done": windows_done, "chunks_done": chunks,
                                                   "complete": complete}) + "\n")


def _resume_point(path: Path, header: dict[str, Any]) -> int:
    """Windows already stored under ``path`` for ``header`` (0 for a new cache); refuse another configuration."""
    if not (path / HEADER).exists():
        if (path / PROGRESS).exists():
            raise LabelCacheError(f"{path}: progress.json without header.json; delete the cache folder to rebuild it")
        atomic_write_text(path / HEADER, json.dumps(header, indent=1, sort_keys=True) + "\n")
        return 0
    old = _read_json(path / HEADER)
    diffs = _differences(old, header)
    if diffs:
        raise LabelCacheError(f"label cache {path} was written for another configuration: {'; '.join(diffs)}; "
                              f"delete it or choose another labels.cache_dir")
    if not (path / PROGRESS).exists():
        return 0
    done = _read_json(path / PROGRESS).get("windows_done")
    if not isinstance(done, int) or not 0 <= done <= header["n_windows"]:
        raise LabelCacheError(f"{path / PROGRESS}: bad windows_done {done!r}; delete the cache folder to rebuild it")
    return done


def _check_spec(spec: CacheSpec) -> None:
    if spec.batch_size <= 0 or spec.chunk_windows <= 0 or spec.chunk_windows % spec.batch_size:
        raise ValueError(f"chunk_windows ({spec.chunk_windows}) must be a positive multiple of batch_size "
                         f"({spec.batch_size})")
    if spec.shard_windows < 0 or spec.shard_windows % spec.batch_size:
        raise ValueError(f"shard_windows ({spec.shard_windows}) must be a multiple of batch_size ({spec.batch_size})")


def prepare_label_shards(path: str | Path, header: dict[str, Any]) -> bool:
    """Set up (or check) a sharded cache folder for ``header`` (one process, before the others write shards):
    write the header, or refuse one of another configuration; remove temporary files a killed run left behind.
    Returns whether the cache is already complete."""
    path = Path(path)
    (path / SHARDS).mkdir(parents=True, exist_ok=True)
    if not (path / HEADER).exists():
        if (path / PROGRESS).exists():
            raise LabelCacheError(f"{path}: progress.json without header.json; delete the cache folder to rebuild it")
        atomic_write_text(path / HEADER, json.dumps(header, indent=1, sort_keys=True) + "\n")
    else:
        diffs = _differences(_read_json(path / HEADER), header)
        if diffs:
            raise LabelCacheError(f"label cache {path} was written for another configuration: {'; '.join(diffs)}; "
                                  f"delete it or choose another labels.cache_dir")
    for tmp in (path / SHARDS).glob(".tmp-*"):
        tmp.unlink(missing_ok=True)
    return bool((path / PROGRESS).is_file() and _read_json(path / PROGRESS).get("complete"))


def _shard_done(path: Path, header: dict[str, Any], index: int) -> bool:
    """Shard ``index`` is complete: its labels file (renamed into place last) exists with the right shape."""
    file = path / shard_file("labels", index)
    if not file.is_file() or not (path / shard_file("mask", index)).is_file():
        return False
    lo, hi = _shard_rows(header, index)
    arr = _open_array(file)
    return arr.shape == (hi - lo, header["window"], header["k_attr"]) and arr.dtype == np.dtype(header["dtype"])


def _save_atomic(file: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary file in the same folder, fsync, rename into place, fsync the folder."""
    tmp = file.parent / f".tmp-{file.name}"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
    fd = os.open(file.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_label_shards(path: str | Path, windows: Any, labeler: ConceptLabeler, spec: CacheSpec, *, rank: int = 0,
                       world_size: int = 1, progress: bool = True, desc: str = "labels") -> dict[str, Any]:
    """Compute this process's missing shards (``s = rank, rank + world_size, ...``) of the sharded cache ``path``
    (prepared by :func:`prepare_label_shards`; see the module docstring). Every process calls it; when all have
    returned, one calls :func:`finish_label_shards`.

    Returns:
        ``{"path", "windows", "tokens", "computed_windows", "resumed_from", "seconds", "tokens_per_s"}`` of this
        process (``resumed_from``: windows of its shards already there).
    """
    _check_spec(spec)
    if spec.shard_windows <= 0:
        raise ValueError("write_label_shards needs spec.shard_windows > 0")
    path = Path(path)
    header = cache_header(windows, labeler, spec)
    on_disk = _read_json(path / HEADER) if (path / HEADER).is_file() else None
    if on_disk is None or _differences(on_disk, header):
        raise LabelCacheError(f"{path}: not prepared for this configuration (prepare_label_shards first)")
    n, length = header["n_windows"], header["window"]
    mine = range(rank, _n_shards(header), world_size)
    todo = [s for s in mine if not _shard_done(path, header, s)]
    rows = {s: _shard_rows(header, s) for s in mine}
    done = sum(rows[s][1] - rows[s][0] for s in mine if s not in todo)
    summary = {"path": str(path), "windows": n, "tokens": n * length, "resumed_from": done}
    dtype = np.dtype(header["dtype"])
    start = time.perf_counter()
    computed = 0
    with progress_bar(total=done + sum(rows[s][1] - rows[s][0] for s in todo), initial=done, unit="win", desc=desc,
                      enabled=progress) as bar:
        for s in todo:
            lo, hi = rows[s]
            labels_arr = np.zeros((hi - lo, length, header["k_attr"]), dtype=dtype)
            mask_arr = np.zeros((hi - lo, length), dtype=np.uint8)
            for b in range(lo, hi, spec.batch_size):
                e = min(hi, b + spec.batch_size)
                labels, mask = labeler(torch.stack([window_ids(windows, i) for i in range(b, e)]))
                labels_arr[b - lo:e - lo] = labels.cpu().numpy().astype(dtype)
                mask_arr[b - lo:e - lo] = mask.cpu().numpy().astype(np.uint8)
                bar.update(e - b)
            try:
                _save_atomic(path / shard_file("mask", s), mask_arr)
                _save_atomic(path / shard_file("labels", s), labels_arr)  # last: the shard's completion mark
            except OSError as e:
                if e.errno not in _NO_SPACE:
                    raise
                raise LabelCacheError(f"{path}: no space left on the device at shard {s}; free space and rerun: "
                                      "the cache keeps its complete shards") from None
            computed += hi - lo
    seconds = time.perf_counter() - start
    return {**summary, "computed_windows": computed, "seconds": seconds,
            "tokens_per_s": computed * length / max(seconds, 1e-9)}


def finish_label_shards(path: str | Path) -> list[str]:
    """Once every process has written its shards: check that all are there and mark the cache complete. Returns
    the cache's files (relative paths, for its manifest)."""
    path = Path(path)
    header = _read_json(path / HEADER)
    shards = _n_shards(header)
    missing = [s for s in range(shards) if not _shard_done(path, header, s)]
    if missing:
        raise LabelCacheError(f"{path}: shards {missing[:8]} of {shards} are missing after every process finished; "
                              "rerun the label verb to compute them")
    atomic_write_text(path / PROGRESS, json.dumps({"windows_done": header["n_windows"], "shards_done": shards,
                                                   "complete": True}) + "\n")
    return [HEADER, *(shard_file(kind, s) for s in range(shards) for kind in ("labels", "mask")), PROGRESS]


# ----------------------------------------------------------------------------------------------------- reader

class LabelCache:
    """Read a complete label cache: ``cache[i] -> (labels LongTensor (T, k_attr), mask BoolTensor (T,))``.

    The arrays are memory-mapped lazily in each process (safe with DataLoader workers: the object pickles without
    its maps).

    Args:
        path: cache folder.
        expect: header entries the caller requires (e.g. ``{"k_attr": 4, "sae": {"sha256": ...}}``); compared
            recursively, only the keys given.
    """

    def __init__(self, path: str | Path, *, expect: dict[str, Any] | None = None):
        self.path = Path(path)
        if not (self.path / HEADER).is_file():
            raise LabelCacheError(f"{self.path}: no label cache here (header.json missing); run the label verb")
        self.header = _read_json(self.path / HEADER)
        if self.header.get("format") != FORMAT:
            raise LabelCacheError(f"{self.path / HEADER}: format {self.header.get('format')!r} is not {FORMAT!r}")
        prog = _read_json(self.path / PROGRESS) if (self.path / PROGRESS).is_file() else {}
        if not prog.get("complete"):
            raise LabelCacheError(f"{self.path}: incomplete label cache ({prog.get('windows_done', 0)}/"
                                  f"{self.header['n_windows']} windows); rerun the label verb to finish it")
        if expect:
            diffs = _differences({k: _subset(self.header.get(k), v) for k, v in expect.items()}, expect)
            if diffs:
                raise LabelCacheError(f"label cache {self.path} does not match: {'; '.join(diffs)}")
        self._maps: tuple[int, np.ndarray, np.ndarray] | None = None
        self._shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # (LRU) open shard maps of this process
        self._shards_pid = os.getpid()
        self.shard_windows = int(self.header.get("shard_windows", 0))
        if self.shard_windows:
            for s in range(_n_shards(self.header)):  # damaged shards are refused here, not mid-training
                self._shard(s)
            self._shards.clear()
        else:
            self._arrays()  # damaged arrays are refused here, not in a DataLoader worker mid-training

    @property
    def window(self) -> int:
        return int(self.header["window"])

    @property
    def k_attr(self) -> int:
        return int(self.header["k_attr"])

    def __len__(self) -> int:
        return int(self.header["n_windows"])

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None or self._maps[0] != os.getpid():
            labels, mask = _open_array(self.path / LABELS), _open_array(self.path / MASK)
            want = (len(self), self.window, self.k_attr)
            if labels.shape != want or mask.shape != want[:2] or labels.dtype != np.dtype(self.header["dtype"]) \
                    or mask.dtype != np.uint8:
                raise LabelCacheError(f"{self.path}: arrays {labels.shape} {labels.dtype} / {mask.shape} {mask.dtype} "
                                      f"do not match the header {want} {self.header['dtype']} / uint8; delete the "
                                      "cache folder to rebuild it")
            self._maps = (os.getpid(), labels, mask)
        return self._maps[1], self._maps[2]

    def _shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory maps of shard ``index`` (at most :data:`_OPEN_SHARDS` kept open, least recently used closed)."""
        if self._shards_pid != os.getpid():
            self._shards, self._shards_pid = {}, os.getpid()
        maps = self._shards.pop(index, None)
        if maps is None:
            labels = _open_array(self.path / shard_file("labels", index))
            mask = _open_array(self.path / shard_file("mask", index))
            lo, hi = _shard_rows(self.header, index)
            want = (hi - lo, self.window, self.k_attr)
            if labels.shape != want or mask.shape != want[:2] or labels.dtype != np.dtype(self.header["dtype"]) \
                    or mask.dtype != np.uint8:
                raise LabelCacheError(f"{self.path}: shard {index} arrays {labels.shape} {labels.dtype} / "
                                      f"{mask.shape} {mask.dtype} do not match the header {want} "
                                      f"{self.header['dtype']} / uint8; delete the cache folder to rebuild it")
            maps = (labels, mask)
            while len(self._shards) >= _OPEN_SHARDS:
                self._shards.pop(next(iter(self._shards)))
        self._shards[index] = maps
        return maps

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for a cache of {len(self)} windows")
        if self.shard_windows:
            i = i % len(self)
            labels, mask = self._shard(i // self.shard_windows)
            i %= self.shard_windows
        else:
            labels, mask = self._arrays()
        return (torch.from_numpy(np.asarray(labels[i], dtype=np.int64)),
                torch.from_numpy(np.asarray(mask[i]) != 0))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None, "_shards": {}}


def _open_array(file: Path) -> np.ndarray:
    """A read-only memory map of one cache array (never unpickles); a one-line :class:`LabelCacheError` for a
    missing, truncated, object-dtype or otherwise unreadable ``.npy`` file."""
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise LabelCacheError(f"{file}: unreadable, truncated or not a plain integer array ({why}); delete the "
                              "cache folder and rerun the label verb") from None


def _subset(have: Any, want: Any) -> Any:
    """``have`` restricted to the keys of ``want`` (recursively), for partial header comparisons."""
    if isinstance(have, dict) and isinstance(want, dict):
        return {k: _subset(have.get(k), v) for k, v in want.items()}
    return have


class LabeledWindows(torch.utils.data.Dataset):
    """Windows with their cached labels: ``{"input_ids" (T,), "concept_labels" (T, k_attr), "concept_mask" (T,)}``
    (plus ``"id"`` when the window records carry one).

    Args:
        windows: the windows the cache was built from (same order).
        cache: the :class:`LabelCache`.
        verify: check the windows' token hash against the cache header (one pass over the windows).
    """

    def __init__(self, windows: Sequence[Any] | Any, cache: LabelCache, *, verify: bool = True):
        if len(windows) != len(cache):
            raise LabelCacheError(f"{cache.path}: {len(cache)} cached windows, but {len(windows)} windows given")
        if verify:
            _, length, sha = windows_fingerprint(windows)
            if sha != cache.header["corpus"].get("tokens_sha256") or length != cache.window:
                raise LabelCacheError(f"{cache.path}: the windows given are not the ones the labels were computed "
                                      f"for (token hash differs); rebuild the cache or pass the same windows")
        self.windows, self.cache = windows, cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, Any]:
        labels, mask = self.cache[i]
        item = {"input_ids": window_ids(self.windows, i), "concept_labels": labels, "concept_mask": mask}
        record = self.windows[i]
        item["id"] = record["id"] if isinstance(record, dict) and "id" in record else i
        return item
