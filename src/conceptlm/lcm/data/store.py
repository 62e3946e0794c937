"""Prepared (segmented and embedded) documents in Parquet shards, and a Dataset over them.

Layout of a prepared folder (written by :func:`conceptlm.lcm.data.prepare.prepare`)::

    shard-00000.parquet    one row per document (see SCHEMA below), written atomically
    shard-00001.parquet    ...
    normalizer.json        RobustNormalizer fitted on the training documents' vectors
    prepare_state.json     the settings the shards were made with (a resume must match them)
    artifact.json          the folder's identity (kind ``lcm.prepared``: settings, encoder and document content
                           fingerprints) and the size and sha256 of every shard and of normalizer.json
    manifest.json          written last: encoder identity, segmenter config, shard list and counts

Columns of a shard: ``id`` (string), ``split`` (``train`` | ``validation``, by a hash of the document id),
``text`` (the document, or null), ``sentences`` (``list<string>``), ``vectors`` (``list<fixed_size_list<float16,
dim>>``, one vector per sentence — the paper's FP16 storage), ``n_sentences`` (int32). The Parquet key-value
metadata ``conceptlm.inputs`` holds the content fingerprint of what the shard was made from (its documents' ids,
splits, texts and sentences, the settings and the encoder), so a rerun of ``prepare`` reuses a shard only when it
would write the same one.

Each shard holds row groups of at most ``prepare.row_group_size`` documents (a shard written before that setting
existed holds one row group); :class:`EmbeddedDocuments` reads one row group at a time, on demand.

Reading checks: :class:`EmbeddedDocuments` verifies each shard's sha256 against ``artifact.json`` the first time
it reads from the shard (once per shard, lazily), so a damaged shard is a one-line :class:`DataError` naming it.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from conceptlm.core.errors import ConceptLMError, DataError

__all__ = ["EmbeddedDocuments", "assign_split", "shard_name", "shard_schema", "documents_table", "read_shard",
           "shard_inputs", "load_manifest", "load_artifact", "MANIFEST_FILE", "STATE_FILE", "SPLITS", "ARTIFACT_KIND"]

MANIFEST_FILE = "manifest.json"
STATE_FILE = "prepare_state.json"
SPLITS = ("train", "validation")
FORMAT = "conceptlm-lcm-embedded/1"
ARTIFACT_KIND = "lcm.prepared"
INPUTS_KEY = b"conceptlm.inputs"
"""Parquet key-value metadata of a shard: the content fingerprint of what it was made from."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def assign_split(doc_id: str, val_fraction: float, seed: int = 0) -> str:
    """``validation`` for a fraction ``val_fraction`` of document ids (a hash: independent of order and of the
    other documents), else ``train``."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.sha256(f"{seed}\x00{doc_id}".encode("utf-8", "surrogatepass")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    return "validation" if u < val_fraction else "train"


def shard_schema(dim: int, vector_dtype: str = "float16"):
    import pyarrow as pa

    value = pa.float16() if vector_dtype == "float16" else pa.float32()
    return pa.schema([("id", pa.string()), ("split", pa.string()), ("text", pa.string()),
                      ("sentences", pa.list_(pa.string())), ("vectors", pa.list_(pa.list_(value, dim))),
                      ("n_sentences", pa.int32())])


def documents_table(docs: Sequence[dict], dim: int, vector_dtype: str = "float16", inputs: str | None = None):
    """A pyarrow Table of ``docs`` (dicts with ``id``, ``split``, ``text``, ``sentences`` and ``vectors``:
    an (n, dim) float array); ``inputs`` (the shard's content fingerprint) goes into the schema metadata."""
    import pyarrow as pa

    np_dtype = np.float16 if vector_dtype == "float16" else np.float32
    counts = [len(d["sentences"]) for d in docs]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = (np.concatenate([np.asarray(d["vectors"], dtype=np.float32).reshape(-1) for d in docs])
            if docs else np.zeros(0, dtype=np.float32)).astype(np_dtype)
    schema = shard_schema(dim, vector_dtype)
    vec_type = schema.field("vectors").type
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=vec_type.value_type.value_type), dim)
    vectors = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values, type=vec_type)
    table = pa.table({"id": [d["id"] for d in docs], "split": [d["split"] for d in docs],
                      "text": [d.get("text") for d in docs], "sentences": [list(d["sentences"]) for d in docs],
                      "vectors": vectors, "n_sentences": pa.array(counts, type=pa.int32())}, schema=schema)
    if inputs is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), INPUTS_KEY: inputs.encode()})
    return table


def shard_inputs(path: str | Path) -> str | None:
    """The content fingerprint recorded in a shard's metadata (None for a shard written before it was recorded).

    Raises:
        DataError: the file is not readable Parquet.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read Parquet shard ({type(e).__name__})", path=path) from None
    value = meta.get(INPUTS_KEY)
    return value.decode() if value is not None else None


def read_shard(path: str | Path, columns: Sequence[str] | None = None) -> dict:
    """Columns of a shard as Python/numpy data: ``id``/``split``/``text``/``sentences`` lists, ``vectors`` as
    ``(flat (total, dim) array, offsets (rows + 1,))`` in the stored dtype, ``n_sentences`` as an int array."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=list(columns) if columns else None)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read Parquet shard ({type(e).__name__})", path=path) from None
    return _decode_columns(table)


def _decode_columns(table) -> dict:
    """A shard's (or a row group's) pyarrow table as Python/numpy data (see :func:`read_shard`)."""
    out: dict = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if name == "vectors":
            offsets = col.offsets.to_numpy().astype(np.int64)
            inner = col.flatten()
            dim = inner.type.list_size
            flat = inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            out[name] = (flat, offsets - offsets[0])
        elif name == "n_sentences":
            out[name] = col.to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            out[name] = col.to_pylist()
    return out


def load_manifest(root: str | Path) -> dict:
    """The manifest of a complete preparation; one-line error when the folder is not one."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise ConceptLMError(f"{root}: no {MANIFEST_FILE} (not a prepared folder, or the preparation did not "
                             "finish: run prepare again to complete it)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConceptLMError(f"{path}: unreadable manifest ({type(e).__name__})") from None
    if manifest.get("format") != FORMAT:
        raise ConceptLMError(f"{path}: not a conceptlm embedded-documents manifest")
    return manifest


def load_artifact(root: str | Path) -> dict:
    """The ``artifact.json`` of a complete preparation (identity, fingerprint, shard checksums); one-line error
    when there is none (a folder prepared before checksums were recorded) or it is of another kind."""
    from conceptlm.core.artifact import ARTIFACT_FILE, read_manifest

    artifact = read_manifest(root)
    if artifact is None:
        raise ConceptLMError(f"{root}: no {ARTIFACT_FILE} (prepared by an older version of conceptlm, without shard "
                             "checksums or content fingerprints): run 'conceptlm lcm prepare' again with "
                             "prepare.on_change=rebuild")
    if artifact.get("kind") != ARTIFACT_KIND:
        raise ConceptLMError(f"{Path(root) / ARTIFACT_FILE}: holds a {artifact.get('kind')!r} artifact, not "
                             f"{ARTIFACT_KIND!r}")
    return artifact


class EmbeddedDocuments(Dataset):
    """Documents of a prepared folder: ``ds[i] -> {"id": str, "vectors": FloatTensor (n, dim), "sentences":
    list[str]}``.

    Args:
        root: the prepared folder (``manifest.json`` and ``artifact.json`` must exist).
        split: ``train``, ``validation`` or ``all`` (the split is stored per document, so no document is in both).
        verify: check each shard's sha256 against ``artifact.json`` the first time it is read (once per shard).
        cache_row_groups: how many decoded Parquet row groups are kept (least recently used dropped first).

    Reading is lazy, by Parquet row group: ``ds[i]`` decodes the row group holding document ``i`` (its ``id``,
    ``sentences`` and ``vectors`` columns, vectors kept in their stored dtype) into a small LRU of
    ``cache_row_groups`` groups, so memory is bounded by the row-group size (``prepare.row_group_size``), not by
    the number of documents. A document not in the cache costs the decoding of its whole row group (the fp16
    vectors dominate), which is why row groups are small. A shard written with one row group (before row groups
    were bounded) reads the same, a whole shard per group. The index of the documents is three numpy int32
    arrays (shard, row group, row in the group), built from the small ``split`` / ``n_sentences`` columns and
    checked against the per-shard counts of ``manifest.json``; the whole shard is checked against its sha256 when
    it is first read. ``lengths`` holds the number of sentences of each document (for length-bucketed batching).
    ``fingerprint`` is the folder's content
    identity (what a run trained on it records).
    """

    def __init__(self, root: str | Path, split: Literal["train", "validation", "all"] = "all", *,
                 verify: bool = True, cache_row_groups: int = 64):
        if split not in (*SPLITS, "all"):
            raise ValueError(f"split must be train, validation or all, got {split!r}")
        if cache_row_groups < 1:
            raise ValueError("cache_row_groups must be >= 1")
        self.root, self.split = Path(root), split
        self.manifest = load_manifest(self.root)
        self.artifact = load_artifact(self.root)
        self.fingerprint: str = self.artifact["fingerprint"]
        self.verify = verify
        self._verified: set[int] = set()
        self.dim = int(self.manifest["encoder"]["dim"])
        self.shards = [self.root / s["file"] for s in self.manifest["shards"]]
        shard_col, group_col, row_col, length_col = [], [], [], []
        for k, path in enumerate(self.shards):
            meta = read_shard(path, ["split", "n_sentences"])
            self._check_counts(k, meta)
            keep = np.ones(len(meta["split"]), dtype=bool) if split == "all" else \
                np.array([sp == split for sp in meta["split"]], dtype=bool)
            starts = np.concatenate([[0], np.cumsum(_row_group_sizes(path))]).astype(np.int64)
            rows = np.flatnonzero(keep)
            groups = np.searchsorted(starts, rows, side="right") - 1
            shard_col.append(np.full(len(rows), k, dtype=np.int32))
            group_col.append(groups.astype(np.int32))
            row_col.append((rows - starts[groups]).astype(np.int32))
            length_col.append(meta["n_sentences"][keep].astype(np.int32))
        def cat(parts: list) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

        self._shard_of, self._group_of, self._row_of = cat(shard_col), cat(group_col), cat(row_col)
        self.lengths: list[int] = cat(length_col).tolist()
        """Sentences per document (small ints: 8 bytes each in a list)."""
        self.cache_row_groups = int(cache_row_groups)
        self._cache: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self._files: OrderedDict[int, object] = OrderedDict()
        docs = self.manifest.get("docs") or {}
        self.instruction_marker: str | None = (docs.get("instruction_marker", "[MODEL]:")
                                               if docs.get("target_field") or docs.get("generated_task") == "summary"
                                               else None)
        """The marker sentence of instruction data (None for plain documents)."""

    @property
    def encoder_identity(self) -> dict:
        return self.manifest["encoder"]

    def normalizer(self):
        """The :class:`~conceptlm.lcm.data.normalizer.RobustNormalizer` fitted on the training documents."""
        from conceptlm.lcm.data.normalizer import RobustNormalizer

        return RobustNormalizer.from_pretrained(self.root / self.manifest["normalizer"])

    def __len__(self) -> int:
        return len(self._shard_of)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"], state["_files"] = OrderedDict(), OrderedDict()  # open files do not travel
        return state

    def _check_counts(self, k: int, meta: dict) -> None:
        """The index columns of shard ``k`` agree with its record in ``manifest.json`` (else it is damaged)."""
        rec = self.manifest["shards"][k]
        splits, counts = meta["split"], meta["n_sentences"]
        train = [sp == "train" for sp in splits]
        seen = (len(splits), sum(train), int(counts.sum()), int(counts[train].sum()) if len(counts) else 0,
                all(sp in SPLITS for sp in splits))
        want = (rec.get("n_documents"), rec.get("n_train_documents"), rec.get("n_sentences"),
                rec.get("n_train_sentences"), True)
        if seen != want:
            self._verify_shard(k)  # names the damage when the file changed
            raise DataError(f"its split / n_sentences columns disagree with {MANIFEST_FILE} (documents, training "
                            f"documents, sentences, training sentences: {seen[:4]} vs {want[:4]})",
                            path=self.shards[k])

    def _verify_shard(self, k: int) -> None:
        """Check shard ``k``'s size and sha256 against ``artifact.json`` (once)."""
        if not self.verify or k in self._verified:
            return
        from conceptlm.core.artifact import damaged_file

        problem = damaged_file(self.root, self.artifact, [self.manifest["shards"][k]["file"]])
        if problem is not None:
            raise DataError(f"{problem}; run 'conceptlm lcm prepare' again with prepare.on_change=rebuild to "
                            "re-encode it")
        self._verified.add(k)

    def _file(self, k: int):
        """The open ``ParquetFile`` of shard ``k`` (a few kept open, least recently used closed first)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if k in self._files:
            self._files.move_to_end(k)
            return self._files[k]
        self._verify_shard(k)
        try:
            pf = pq.ParquetFile(self.shards[k])
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"cannot read Parquet shard ({type(e).__name__})", path=self.shards[k]) from None
        self._files[k] = pf
        if len(self._files) > self.cache_row_groups:
            self._files.popitem(last=False)[1].close()
        return pf

    def _group(self, k: int, g: int) -> dict:
        """Row group ``g`` of shard ``k`` decoded (``id``, ``sentences``, ``vectors``), through the LRU."""
        key = (k, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        import pyarrow as pa

        try:
            table = self._file(k).read_row_group(g, columns=["id", "sentences", "vectors"])
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"cannot read row group {g} ({type(e).__name__})", path=self.shards[k]) from None
        data = _decode_columns(table)
        flat, offsets = data["vectors"]
        if flat.shape[1] != self.dim:
            raise DataError(f"vectors have dim {flat.shape[1]}, manifest says {self.dim}", path=self.shards[k])
        counts = np.fromiter((len(s) for s in data["sentences"]), dtype=np.int64, count=len(data["sentences"]))
        bad = np.flatnonzero(np.diff(offsets) != counts)
        if len(bad):
            row = int(bad[0])
            raise DataError(f"row {row}: {counts[row]} sentences but {offsets[row + 1] - offsets[row]} vectors "
                            f"(row group {g})", path=self.shards[k], field="vectors")
        self._cache[key] = data
        if len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return data

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} of {len(self)}")
        k, g, row = int(self._shard_of[i]), int(self._group_of[i]), int(self._row_of[i])
        data = self._group(k, g)
        flat, offsets = data["vectors"]
        vectors = torch.from_numpy(flat[offsets[row]:offsets[row + 1]].astype(np.float32))
        item = {"id": data["id"][row], "vectors": vectors, "sentences": data["sentences"][row]}
        if self.instruction_marker is not None and self.instruction_marker in item["sentences"]:
            item["loss_from"] = item["sentences"].index(self.instruction_marker) + 1  # the answer's first sentence
        return item

    @property
    def ids(self) -> list[str]:
        """Document ids in dataset order (reads the id column of one shard at a time)."""
        out: list[str] = []
        bounds = np.searchsorted(self._shard_of, np.arange(len(self.shards) + 1))  # the index is in shard order
        for k in range(len(self.shards)):
            sel = range(int(bounds[k]), int(bounds[k + 1]))
            if len(sel):
                self._verify_shard(k)
                col = read_shard(self.shards[k], ["id"])["id"]
                starts = np.concatenate([[0], np.cumsum(_row_group_sizes(self.shards[k]))])
                out.extend(col[int(starts[self._group_of[j]] + self._row_of[j])] for j in sel)
        return out


def _row_group_sizes(path: Path) -> list[int]:
    """Rows of each row group of a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read Parquet shard ({type(e).__name__})", path=path) from None
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
