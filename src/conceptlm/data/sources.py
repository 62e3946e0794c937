"""Resolve a data spec from a config (``data.train`` / ``data.eval``) into records, then into batch functions.

Specs:
- ``path/to/file.jsonl``: chat JSONL (``{"messages": [...]}`` per line);
- ``path/to/file.txt`` (or a directory of ``.txt`` files): plain text for LM pretraining;
- ``path/to/shards``: a token-shard folder made by ``conceptlm data tokenize`` (:mod:`conceptlm.data.shards`):
  pretraining text read through memory maps; ``data.train`` reads its ``train`` split, ``data.eval`` its
  ``validation`` split;
- ``hf:<name or local path>``: a Hugging Face dataset with a ``messages`` or ``text`` column;
- ``generate:nlrx``: the built-in NL-RX-style English description -> regex generator (offline default).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conceptlm.core.errors import ConfigError, DataError

__all__ = ["Source", "resolve_source", "corpus_texts", "chat_records", "build_dataset"]


@dataclass
class Source:
    """Loaded data: ``kind`` "chat" or "text".

    Chat data is either in memory (``records``: lists of messages, from generators/HF datasets) or a JSONL file
    (``paths[0]``, with its raw JSON ``objects``: records may carry extra fields such as ``text``/``code`` or be
    paraphrase groups ``{"views": [...]}``; each consumer validates what it needs, naming file and line).
    Text data is ``texts`` or ``paths``, or ``shards`` (a :class:`~conceptlm.data.shards.TokenShards` split).
    """

    kind: str
    name: str
    records: list[list[dict]] | None = None
    objects: list[dict] | None = None
    texts: list[str] | None = None
    paths: list[Path] | None = None
    limit: int | None = None
    shards: Any = None

    @property
    def identity(self) -> str:
        """What names the data in a run's checkpoints (checked on resume): the name, and for token shards also the
        folder's artifact fingerprint (by content, so other shards at the same path are told apart)."""
        return self.name if self.shards is None else f"{self.name} {self.shards.fingerprint}"


def resolve_source(spec: str, *, split: str, fmt: str = "auto", limit: int | None = None,
                   generator: dict | None = None, field: str = "data.train") -> Source:
    """Load the data named by ``spec`` (see the module docstring).

    Args:
        split: "train" or "test" (used by generators and HF datasets).
        fmt: "auto" (by extension), "chat" or "text".
        generator: ``{"train_size", "test_size", "seed"}`` for ``generate:`` specs.
    """
    if spec.startswith("generate:"):
        name = spec.split(":", 1)[1]
        if name != "nlrx":
            raise ConfigError(f"unknown generator {name!r} (available: nlrx)", field=field)
        from conceptlm.data.generators.nlrx import make_splits

        g = generator or {}
        train, test = make_splits(g.get("train_size", 4000), g.get("test_size", 500), seed=g.get("seed", 0))
        recs = train if split == "train" else test
        records = [r["messages"] for r in recs][:limit]
        return Source(kind="chat", name=f"{spec}[{split}]", records=records)
    if spec.startswith("hf:"):
        from conceptlm.data.hf_datasets import load_hf_records

        name = spec[3:]
        rows = load_hf_records(name, split=split, limit=limit)
        if rows and isinstance(rows[0], str):
            return Source(kind="text", name=name, texts=rows)
        return Source(kind="chat", name=name, records=rows)
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"data file not found: {spec}", field=field)
    from conceptlm.data.shards import TokenShards, is_token_shards

    if path.is_dir() and is_token_shards(path):
        if fmt == "chat":
            raise ConfigError(f"{spec} is a token-shard folder (plain text), not chat data; set data.format to auto "
                              "or text", field=field)
        shard_split = "train" if split == "train" else "validation"
        shards = TokenShards(path, shard_split)
        if shards.num_tokens == 0:
            raise ConfigError(f"{spec}: its {shard_split} split holds no token", field=field)
        return Source(kind="text", name=f"{path}[{shard_split}]", shards=shards)
    kind = fmt
    if kind == "auto":
        if path.is_dir() or path.suffix in (".txt", ".md"):
            kind = "text"
        elif path.suffix in (".jsonl", ".json"):
            kind = "chat"
        else:
            raise ConfigError(f"cannot tell the format of {spec} from its extension; set data.format", field=field)
    if kind == "chat":
        from conceptlm.data.chat import iter_jsonl_objects

        objects = [obj for _, obj in iter_jsonl_objects(path, limit=limit)]
        return Source(kind="chat", name=str(path), objects=objects, paths=[path], limit=limit)
    paths = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not paths:
        raise DataError("no .txt files in directory", path=path)
    return Source(kind="text", name=str(path), paths=paths)


def corpus_texts(source: Source) -> Iterator[str]:
    """Strings to train a tokenizer on."""
    if source.kind == "chat":
        for msgs in source.records or []:
            for m in msgs:
                yield m["content"]
        for obj in source.objects or []:
            yield from _strings(obj)
    elif source.shards is not None:
        raise ConfigError(f"{source.name}: a token-shard folder is tokenized already; the run uses its tokenizer",
                          field="tokenizer.path")
    elif source.texts is not None:
        yield from source.texts
    else:
        from conceptlm.data.text import read_text_file

        for p in source.paths or []:
            yield from read_text_file(p).splitlines()


def _strings(obj) -> Iterator[str]:
    """Every string inside a JSON value (message contents, text/code fields, paraphrase views)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k != "role":
                yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def chat_records(source: Source) -> list[list[dict]]:
    """The validated message lists of a chat source (reads and validates the file when needed)."""
    if source.records is not None:
        return source.records
    from conceptlm.data.chat import read_chat_jsonl

    return read_chat_jsonl(source.paths[0], limit=source.limit)


def build_dataset(source: Source, tokenizer, *, max_length: int, label_mode: str = "assistant",
                  on_too_long: str = "error"):
    """A tokenized dataset (items ``{"input_ids", "labels"}`` and ``.lengths``) for LM training; over token shards,
    :class:`~conceptlm.data.shards.ShardWindows` of ``max_length`` tokens."""
    if source.kind == "chat":
        from conceptlm.data.chat import ChatDataset

        # A file is given by path so that errors name the file and line; generated/HF records by index.
        data = source.paths[0] if source.paths else source.records
        return ChatDataset(data, tokenizer, label_mode=label_mode, max_length=max_length, on_too_long=on_too_long,
                           limit=source.limit, name=None if source.paths else source.name)
    if source.shards is not None:
        from conceptlm.data.shards import ShardWindows

        return ShardWindows(source.shards, max_length)
    from conceptlm.data.text import TextDataset

    if source.texts is not None:
        return TextDataset.from_texts(source.texts, tokenizer, block_size=max_length, name=source.name)
    return TextDataset(source.paths, tokenizer, block_size=max_length)
