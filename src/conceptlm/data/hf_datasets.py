"""Records from Hugging Face ``datasets``: a local file or folder, or a dataset name already in the local cache.

``datasets`` is imported only when used. Set ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` to make sure nothing
is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from conceptlm.core.errors import ConceptLMError, DataError
from conceptlm.data.chat import validate_messages

__all__ = ["load_hf_records"]

# Local file suffix -> `datasets` builder name.
_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ConceptLMError(
            "reading Hugging Face datasets needs the 'datasets' package: pip install datasets") from e
    return datasets


def load_hf_records(name_or_path: str, *, split: str = "train", limit: int | None = None,
                    cache_dir: str | None = None) -> list[list[dict]] | list[str]:
    """Load chat records or plain texts with ``datasets.load_dataset``.

    Args:
        name_or_path: a local ``.jsonl``/``.json``/``.txt``/``.parquet``/``.csv`` file (any split name is
            accepted for a single file), a local dataset folder, or a dataset name already cached.
        split: the split to read.
        limit: read at most this many rows (the first ones).
        cache_dir: where ``datasets`` keeps its Arrow cache (default: its own).

    Returns:
        With a ``messages`` column: one list of ``{"role", "content"}`` dicts per row, validated like chat JSONL.
        Otherwise with a ``text`` column: the list of strings.

    Raises:
        DataError: the dataset cannot be loaded, a row is malformed (names the dataset, the 1-based row as the
            line, and the field), or it has neither a ``messages`` nor a ``text`` column (lists the columns).
        ConceptLMError: ``datasets`` is not installed.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    datasets = _import_datasets()
    path = Path(name_or_path)
    try:
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"unknown file type {path.suffix!r} (expected one of {', '.join(_BUILDERS)})",
                                path=name_or_path)
            ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(str(name_or_path), split=split, cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, arrow errors, ...)
        raise DataError(f"could not load split {split!r}: {type(e).__name__}: {e}", path=name_or_path) from e
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    columns = list(ds.column_names)
    if "messages" in columns:
        return [validate_messages(m, path=name_or_path, line=i) for i, m in enumerate(ds["messages"], start=1)]
    if "text" in columns:
        texts = list(ds["text"])
        for i, t in enumerate(texts, start=1):
            if not isinstance(t, str):
                raise DataError(f"expected a string, got {type(t).__name__}", path=name_or_path, line=i,
                                field="text")
        return texts
    raise DataError(f"no 'messages' or 'text' column (columns: {', '.join(columns) or 'none'})",
                    path=name_or_path)
