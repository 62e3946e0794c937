"""The CoCoMix text corpus: documents (generated offline or read from files), a train/val split by document, and
fixed-length token windows.

Sources (``CorpusSection.source``):

- ``generated``: English-like documents with latent topics (:func:`generate_documents`). Every document draws a
  mixture of ``topics_per_document`` topics; each sentence picks one of them (it tends to keep the previous
  sentence's topic) and fills a phrase template with that topic's nouns, verbs and adjectives, mixed with shared
  function words. A teacher trained on it has to infer the topic to predict well, which is the kind of concept an
  SAE on its hidden states should isolate. Deterministic from ``seed``.
- a ``.txt`` file: one document per paragraph (paragraphs are separated by blank lines) with ``txt_split:
  paragraph``, or one document per non-empty line with ``txt_split: line``.
- a ``.jsonl`` file: one JSON object per line; the document is the string at ``text_field``, a dotted path whose
  integer parts index lists (``text``, ``messages.1.content``). Blank lines are skipped.
- a directory: every ``*.txt`` and ``*.jsonl`` file in it (not recursive), in sorted name order.
- a token-shard folder (``conceptlm data tokenize``, :mod:`conceptlm.data.shards`): the windows are those of the
  folder's ``train`` split (validation: its ``validation`` split; none when it holds no token), cut exactly as below
  from the split's token stream and read through memory maps (:class:`ShardWindowArray`), so memory does not grow
  with the corpus. The folder fixes the documents, their split and the tokenizer: the teacher's tokenizer must be
  the shards' (checked by fingerprint; the tiny teacher uses it), and ``n_documents``, ``text_field``,
  ``txt_split``, ``val_fraction`` and ``seed`` do not apply. The corpus identity is the folder's fingerprint.

Windows: the documents of one split are tokenized (no special tokens), each followed by the tokenizer's EOS,
concatenated and cut into consecutive windows of ``window`` tokens (the remainder is dropped), as in the reference
code's OpenWebText preparation (CoCoMix paper App. A) but with fixed windows, so labels can be cached. The split is by
document: a seeded permutation puts ``round(val_fraction * n)`` documents (at least one when ``val_fraction > 0``)
into validation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from conceptlm.cocomix.config import CorpusSection
from conceptlm.core.artifact import file_sha256
from conceptlm.core.errors import DataError
from conceptlm.data.chat import DuplicateKeyError, field_value, refuse_duplicate_keys
from conceptlm.data.text import read_text_file

__all__ = ["GeneratedDocument", "generate_documents", "read_documents", "load_documents",
           "split_documents", "tokenize_windows", "WindowDataset", "collate_windows", "CorpusSplits",
           "build_corpus", "corpus_identity", "source_files", "TOPICS", "ShardWindowArray", "is_shard_corpus",
           "shard_fingerprint", "shard_tokenizer"]

log = logging.getLogger(__name__)

_SURROGATE = re.compile("[\ud800-\udfff]")
"""A lone surrogate (e.g. from a JSON ``\\ud800`` escape): not Unicode text, no tokenizer can encode it."""


# ----------------------------------------------------------------------------------------------- generator
# (name, nouns, verbs (3rd person), adjectives) of the built-in topics; more topics get invented words.
TOPICS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    ("cooking", ("soup", "oven", "recipe", "onion", "pan", "flour", "garlic", "kitchen", "sauce", "butter"),
     ("bakes", "stirs", "chops", "roasts", "tastes", "boils"), ("spicy", "crispy", "sweet", "salty", "fresh")),
    ("space", ("planet", "rocket", "orbit", "comet", "galaxy", "telescope", "astronaut", "moon", "star", "crater"),
     ("launches", "orbits", "observes", "lands", "explores", "drifts"), ("distant", "lunar", "bright", "cosmic",
                                                                        "silent")),
    ("sports", ("team", "goal", "coach", "match", "player", "stadium", "ball", "league", "referee", "season"),
     ("scores", "trains", "wins", "kicks", "defends", "passes"), ("fast", "tired", "strong", "loyal", "fierce")),
    ("music", ("guitar", "song", "drummer", "melody", "concert", "piano", "chorus", "violin", "band", "album"),
     ("plays", "sings", "records", "tunes", "performs", "hums"), ("loud", "gentle", "rhythmic", "catchy", "soft")),
    ("medicine", ("doctor", "patient", "clinic", "vaccine", "fever", "nurse", "surgery", "pill", "symptom",
                  "hospital"), ("treats", "heals", "examines", "prescribes", "recovers", "diagnoses"),
     ("sick", "healthy", "sterile", "chronic", "painful")),
    ("finance", ("bank", "loan", "market", "stock", "budget", "investor", "profit", "tax", "dollar", "account"),
     ("invests", "borrows", "trades", "saves", "pays", "earns"), ("wealthy", "risky", "annual", "fiscal", "cheap")),
    ("gardening", ("garden", "seed", "tomato", "soil", "flower", "shovel", "root", "hedge", "rose", "compost"),
     ("plants", "waters", "prunes", "grows", "digs", "blooms"), ("green", "muddy", "leafy", "ripe", "wild")),
    ("computing", ("computer", "program", "server", "keyboard", "network", "code", "database", "screen", "bug",
                   "laptop"), ("compiles", "crashes", "downloads", "runs", "debugs", "stores"),
     ("digital", "slow", "secure", "binary", "online")),
    ("ocean", ("ship", "wave", "harbor", "sailor", "whale", "island", "anchor", "tide", "reef", "fisherman"),
     ("sails", "swims", "floats", "dives", "anchors", "fishes"), ("salty", "stormy", "deep", "calm", "coastal")),
    ("school", ("teacher", "student", "lesson", "homework", "classroom", "exam", "pencil", "library", "book",
                "grade"), ("studies", "teaches", "reads", "writes", "learns", "grades"),
     ("clever", "quiet", "curious", "strict", "eager")),
    ("weather", ("rain", "cloud", "storm", "wind", "snow", "thunder", "forecast", "umbrella", "fog", "sunshine"),
     ("pours", "blows", "freezes", "clears", "falls", "shines"), ("cold", "humid", "windy", "foggy", "warm")),
    ("travel", ("train", "airport", "hotel", "passport", "ticket", "suitcase", "map", "tourist", "journey",
                "border"), ("travels", "books", "visits", "departs", "arrives", "packs"),
     ("foreign", "crowded", "scenic", "long", "early")),
    ("farming", ("farmer", "tractor", "barn", "cow", "wheat", "field", "harvest", "sheep", "fence", "hay"),
     ("harvests", "milks", "plows", "feeds", "herds", "sows"), ("rural", "dusty", "golden", "muddy", "busy")),
    ("law", ("judge", "court", "lawyer", "trial", "verdict", "witness", "contract", "jury", "evidence", "appeal"),
     ("argues", "rules", "sues", "testifies", "signs", "appeals"), ("legal", "guilty", "fair", "formal", "binding")),
    ("art", ("painter", "canvas", "brush", "museum", "sculpture", "portrait", "gallery", "color", "sketch",
             "easel"), ("paints", "draws", "carves", "sketches", "displays", "mixes"),
     ("vivid", "abstract", "pale", "elegant", "bold")),
    ("cars", ("engine", "driver", "wheel", "garage", "highway", "tire", "brake", "mechanic", "truck", "fuel"),
     ("drives", "parks", "repairs", "accelerates", "honks", "steers"), ("rusty", "shiny", "noisy", "electric",
                                                                       "heavy")),
)
_FUNCTION_WORDS = {
    "det": ("the", "a", "this", "that", "every", "one"),
    "prep": ("near", "with", "under", "behind", "after", "before", "beside"),
    "adv": ("often", "slowly", "again", "quietly", "always", "rarely", "suddenly"),
    "conj": ("and", "while", "because", "but", "so"),
}
_TEMPLATES = (
    "{det} {adj} {noun} {verb} {det} {noun}.",
    "{det} {noun} {adv} {verb} {prep} {det} {adj} {noun}.",
    "{prep} {det} {noun}, {det} {noun} {verb} {det} {noun}.",
    "{det} {noun} {verb} {det} {noun} {conj} {det} {noun} {verb}.",
    "{det} {adj} {noun} {verb} {adv}.",
    "they say {det} {noun} is {adj} {conj} {det} {noun} is {adj}.",
    "{det} {noun} {verb} {det} {adj} {noun} {prep} {det} {noun}.",
)
_SYLLABLES = ("ka", "lo", "mi", "ten", "ru", "sa", "vor", "pel", "dri", "nu", "bex", "tal", "quo", "fen", "gri",
              "zo", "har", "lim", "sto", "wen")


@dataclass(frozen=True)
class GeneratedDocument:
    """A generated document and the topics it was written from."""

    text: str
    topics: tuple[int, ...]
    """The document's topic ids, most frequent first."""
    sentence_topics: tuple[int, ...]
    """The topic of every sentence."""


def _invented_topic(i: int) -> tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """A topic beyond the built-in ones: pronounceable invented words, distinct per topic."""
    rng = random.Random(1_000_003 * (i + 1))

    def word(suffix: str = "") -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))) + suffix

    nouns = tuple(dict.fromkeys(word() for _ in range(10)))
    verbs = tuple(dict.fromkeys(word("s") for _ in range(6)))
    adjs = tuple(dict.fromkeys(word("ish") for _ in range(5)))
    return (f"topic{i}", nouns, verbs, adjs)


def _topic_table(n_topics: int) -> list[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]]:
    return [TOPICS[i] if i < len(TOPICS) else _invented_topic(i) for i in range(n_topics)]


def generate_documents(n: int, *, n_topics: int = 16, seed: int = 0, topics_per_document: int = 2,
                       sentences: tuple[int, int] = (6, 14), stickiness: float = 0.7,
                       generic_rate: float = 0.1) -> list[GeneratedDocument]:
    """``n`` English-like documents with latent topics (deterministic from ``seed``).

    Each document draws ``topics_per_document`` distinct topics with Dirichlet(1) weights. Sentence topics follow
    a sticky chain: keep the previous topic with probability ``stickiness``, else draw from the mixture. A slot of a
    template takes a word of the sentence's topic, or with probability ``generic_rate`` a word of a random topic.
    """
    table = _topic_table(n_topics)
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        topics = rng.sample(range(n_topics), topics_per_document)
        weights = [rng.expovariate(1.0) for _ in topics]
        n_sent = rng.randint(*sentences)
        current = rng.choices(topics, weights)[0]
        sent_topics, parts = [], []
        for _ in range(n_sent):
            if rng.random() >= stickiness:
                current = rng.choices(topics, weights)[0]
            sent_topics.append(current)
            parts.append(_sentence(rng, table, current, generic_rate))
        counts = {t: sent_topics.count(t) for t in topics}
        order = tuple(sorted((t for t in topics if counts[t]), key=lambda t: (-counts[t], t)))
        docs.append(GeneratedDocument(" ".join(parts), order, tuple(sent_topics)))
    return docs


def _sentence(rng: random.Random, table, topic: int, generic_rate: float) -> str:
    def pick(kind: int) -> str:
        source = table[rng.randrange(len(table))] if rng.random() < generic_rate else table[topic]
        return rng.choice(source[kind])

    template = rng.choice(_TEMPLATES)
    out, i = [], 0
    while i < len(template):  # fill every {slot} independently (str.format would reuse one value per name)
        j = template.find("{", i)
        if j < 0:
            out.append(template[i:])
            break
        out.append(template[i:j])
        end = template.index("}", j)
        slot = template[j + 1:end]
        kinds = {"noun": 1, "verb": 2, "adj": 3}
        out.append(pick(kinds[slot]) if slot in kinds else rng.choice(_FUNCTION_WORDS[slot]))
        i = end + 1
    text = "".join(out)
    return text[0].upper() + text[1:]


# ----------------------------------------------------------------------------------------------- reading files
def _read_jsonl(path: Path, text_field: str, limit: int) -> tuple[list[str], int]:
    """``(documents, how many more non-blank records the file holds beyond limit)``."""
    docs: list[str] = []
    lines = read_text_file(path).splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if limit and len(docs) >= limit:
            return docs, sum(1 for rest in lines[lineno - 1:] if rest.strip())
        try:
            obj = json.loads(line, object_pairs_hook=refuse_duplicate_keys)
        except DuplicateKeyError as e:
            raise DataError(str(e), path=path, line=lineno, field=e.key) from None
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg} at column {e.colno})", path=path, line=lineno) from None
        try:
            value = field_value(obj, text_field)
        except KeyError as e:
            raise DataError(f"missing (no {e.args[0]!r}); set corpus.text_field to the record's text",
                            path=path, line=lineno, field=text_field) from None
        if not isinstance(value, str):
            raise DataError(f"must be a string, got {type(value).__name__}", path=path, line=lineno,
                            field=text_field)
        bad = _SURROGATE.search(value)
        if bad is not None:
            raise DataError(f"lone surrogate U+{ord(bad.group()):04X} at character {bad.start()} cannot be encoded "
                            "(not valid Unicode text)", path=path, line=lineno, field=text_field)
        docs.append(value)
    return docs, 0


def _read_txt(path: Path, split: str, limit: int) -> tuple[list[str], int]:
    """``(documents, how many more the file holds beyond limit)``."""
    text = read_text_file(path)
    if split == "line":
        docs = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        docs, current = [], []
        for line in text.splitlines():
            if line.strip():
                current.append(line.rstrip())
            elif current:
                docs.append("\n".join(current))
                current = []
        if current:
            docs.append("\n".join(current))
    return (docs[:limit], max(0, len(docs) - limit)) if limit else (docs, 0)


def _count_documents(path: Path, split: str) -> int:
    """How many documents a file holds, counted without parsing (non-blank JSONL lines; TXT lines or paragraphs)."""
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return 0
    if path.suffix == ".jsonl" or split == "line":
        return sum(1 for line in lines if line.strip())
    return sum(1 for i, line in enumerate(lines) if line.strip() and (i == 0 or not lines[i - 1].strip()))


def source_files(source: str | Path) -> list[Path]:
    """The files a ``.txt`` / ``.jsonl`` source reads, in reading order (a directory's, sorted by name)."""
    p = Path(source)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix in (".txt", ".jsonl") and f.is_file())
    return [p]


_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, memoized per (resolved path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def read_documents(source: str | Path, *, text_field: str = "text", txt_split: str = "paragraph",
                   limit: int = 0) -> list[str]:
    """Documents of a ``.txt`` / ``.jsonl`` file or a directory of them (see the module docstring).

    ``limit`` > 0 keeps the first ``limit`` documents; how many were left out is logged as a warning (the later
    documents are counted, not parsed).

    Raises:
        DataError: ``file:line: field '...': reason`` for a bad record; a directory without such files.
    """
    p = Path(source)
    files = source_files(p)
    if not files:
        raise DataError("holds no .txt or .jsonl files", path=p)
    docs: list[str] = []
    cut = 0
    for f in files:
        if f.suffix not in (".jsonl", ".txt"):
            raise DataError("unsupported file type (expected .txt or .jsonl)", path=f)
        if limit and len(docs) >= limit:  # past the limit: counted, not parsed
            cut += _count_documents(f, txt_split)
            continue
        left = limit - len(docs) if limit else 0
        got, more = _read_jsonl(f, text_field, left) if f.suffix == ".jsonl" else _read_txt(f, txt_split, left)
        docs += got
        cut += more
    if not docs:
        raise DataError("holds no documents", path=p)
    if cut:
        log.warning("corpus.n_documents=%d: using the first %d documents of %s and leaving out %d more (set "
                    "corpus.n_documents=0 to use all %d)", limit, len(docs), p, cut, len(docs) + cut)
    return docs


def load_documents(section: CorpusSection) -> list[str]:
    """The section's documents: generated or read from its files."""
    if section.source == "generated":
        return [d.text for d in generate_documents(
            section.n_documents, n_topics=section.n_topics, seed=section.seed,
            topics_per_document=section.topics_per_document, sentences=tuple(section.sentences_per_document),
            stickiness=section.topic_stickiness)]
    return read_documents(section.source, text_field=section.text_field, txt_split=section.txt_split,
                          limit=section.n_documents)


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) by document: a seeded permutation; ``round(val_fraction * n)`` (>= 1 if the fraction > 0)
    documents go to validation, both keep their original order."""
    n = len(docs)
    n_val = 0 if val_fraction <= 0 else min(n - 1, max(1, round(val_fraction * n)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


# ----------------------------------------------------------------------------------------------- windows
def tokenize_windows(docs: list[str], tokenizer, window: int, *, name: str = "corpus") -> torch.Tensor:
    """Tokenize ``docs``, append EOS to each, concatenate and cut into ``(n_windows, window)`` int64 windows.

    Raises:
        DataError: the tokenizer has no EOS token, or the documents hold fewer than ``window`` tokens.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token (needed between documents)", path=name)
    stream: list[int] = []
    if docs:
        for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
    n = len(stream) // window
    if n == 0:
        raise DataError(f"only {len(stream)} tokens, fewer than one window of {window}", path=name)
    return torch.tensor(stream[: n * window], dtype=torch.long).view(n, window)


class ShardWindowArray:
    """The ``(N, T)`` int64 windows of one split of a token-shard folder, read lazily through its memory maps: window
    ``i`` is tokens ``[i * T, (i + 1) * T)`` of the split's stream (the partial window at the end is dropped), the
    windows :func:`tokenize_windows` would cut from the same stream. Indexing follows the in-memory tensor's: an
    int gives one ``(T,)`` LongTensor, a slice (optionally with a column index) a ``(n, T)`` one; ``rows(lo, hi)``
    reads a block of windows at once.
    """

    dtype = torch.long
    ndim = 2

    def __init__(self, shards: Any, window: int):
        from conceptlm.data.shards import ShardWindows

        self.source = ShardWindows(shards, window)
        self.shape = torch.Size((len(self.source), window))

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Windows ``[lo, hi)`` as one ``(hi - lo, T)`` LongTensor."""
        t = self.shape[1]
        lo, hi = max(0, lo), min(len(self), hi)
        if hi <= lo:
            return torch.empty((0, t), dtype=torch.long)
        return torch.from_numpy(self.source.shards.tokens(lo * t, hi * t)).view(hi - lo, t)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, tuple):
            return self[key[0]][(slice(None), *key[1:])] if isinstance(key[0], slice) else self[key[0]][key[1:]]
        if isinstance(key, slice):
            lo, hi, step = key.indices(len(self))
            return self.rows(lo, hi) if step == 1 else torch.stack([self[i] for i in range(lo, hi, step)])
        if isinstance(key, (torch.Tensor, np.ndarray, list)):
            return torch.stack([self[int(i)] for i in np.asarray(key).reshape(-1)])
        return torch.from_numpy(self.source.window(int(key)))

    def __repr__(self) -> str:
        return f"ShardWindowArray({self.source.sources[0]}, shape={tuple(self.shape)})"


def is_shard_corpus(section: CorpusSection) -> bool:
    """Whether ``corpus.source`` is a token-shard folder."""
    from conceptlm.data.shards import is_token_shards

    return section.source != "generated" and Path(section.source).is_dir() and is_token_shards(section.source)


def shard_fingerprint(section: CorpusSection) -> str:
    """The content fingerprint of a token-shard ``corpus.source`` (its ``artifact.json``)."""
    from conceptlm.data.shards import TokenShards

    return TokenShards(section.source, "train", verify=False).fingerprint


def shard_tokenizer(section: CorpusSection):
    """The tokenizer a token-shard ``corpus.source`` was made with (saved in the folder)."""
    from conceptlm.data.shards import TokenShards

    return TokenShards(section.source, "train", verify=False).load_tokenizer()


def _shard_splits(section: CorpusSection, tokenizer) -> CorpusSplits:
    from conceptlm.data.shards import TokenShards, tokenizer_fingerprint

    train = TokenShards(section.source, "train")
    found = tokenizer_fingerprint(tokenizer)
    if found != train.tokenizer_fingerprint:
        raise DataError(f"the teacher's tokenizer (fingerprint {found[:12]}) is not the one these token shards were "
                        f"made with ({train.tokenizer_fingerprint[:12]}); use a teacher with the shards' tokenizer "
                        "or tokenize the source again with the teacher's", path=section.source)
    val_shards = TokenShards(section.source, "validation")
    val = WindowDataset(ShardWindowArray(val_shards, section.window)) if val_shards.num_tokens else None
    return CorpusSplits(WindowDataset(ShardWindowArray(train, section.window)), val, [], [])


class WindowDataset(Dataset):
    """Fixed token windows; item ``i`` is ``{"id": i, "input_ids": LongTensor(window)}``. ``windows`` is a
    ``(N, T)`` int64 tensor, or a :class:`ShardWindowArray` (windows read lazily from token shards)."""

    def __init__(self, windows: torch.Tensor):
        if windows.dim() != 2 or windows.dtype != torch.long:
            raise ValueError(f"windows must be a (N, T) int64 tensor, got {tuple(windows.shape)} {windows.dtype}")
        self.windows = windows
        self.lengths = [windows.shape[1]] * windows.shape[0]

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"id": int(index), "input_ids": self.windows[index]}

    @property
    def n_tokens(self) -> int:
        return self.windows.numel()


def collate_windows(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Token windows ``{"id", "input_ids" (T,)[, "concept_labels" (T, A), "concept_mask" (T,)]}`` -> a batch
    ``{"ids": (B,), "input_ids": (B, T)[, "concept_labels" (B, T, A), "concept_mask" (B, T)]}`` (the label keys when
    every item has them: the student's cached labels)."""
    lengths = {int(it["input_ids"].shape[0]) for it in items}
    if len(lengths) != 1:
        raise DataError(f"windows of different lengths {sorted(lengths)} in one batch (ids "
                        f"{[it['id'] for it in items][:8]}); the student trains on fixed windows", field="input_ids")
    batch = {"ids": torch.tensor([int(it["id"]) for it in items], dtype=torch.long),
             "input_ids": torch.stack([torch.as_tensor(it["input_ids"]).long() for it in items])}
    if all(it.get("concept_labels") is not None for it in items):
        batch["concept_labels"] = torch.stack([torch.as_tensor(it["concept_labels"]).long() for it in items])
        if all(it.get("concept_mask") is not None for it in items):
            batch["concept_mask"] = torch.stack([torch.as_tensor(it["concept_mask"]).bool() for it in items])
    return batch


@dataclass
class CorpusSplits:
    train: WindowDataset
    val: WindowDataset | None
    train_documents: list[str]
    val_documents: list[str]


def build_corpus(section: CorpusSection, tokenizer, *, documents: tuple[list[str], list[str]] | None = None
                 ) -> CorpusSplits:
    """Documents -> split by document -> token windows of both splits.

    ``val`` is ``None`` when the split has no document (``val_fraction == 0``); a validation split shorter than
    one window is a :class:`DataError`. A token-shard source gives lazily read windows of its ``train`` and
    ``validation`` splits (no documents in memory; ``documents`` is not used), after checking that ``tokenizer`` is
    the shards' one.

    Args:
        documents: an already computed ``(train, val)`` document split (e.g. the one a tokenizer was trained on).
    """
    if is_shard_corpus(section):
        return _shard_splits(section, tokenizer)
    if documents is None:
        documents = split_documents(load_documents(section), section.val_fraction, section.seed)
    train_docs, val_docs = documents
    where = section.source
    train = WindowDataset(tokenize_windows(train_docs, tokenizer, section.window, name=f"{where} (train split)"))
    val = None
    if val_docs:
        val = WindowDataset(tokenize_windows(val_docs, tokenizer, section.window, name=f"{where} (val split)"))
    return CorpusSplits(train, val, train_docs, val_docs)


def corpus_identity(section: CorpusSection) -> str:
    """A short string naming the data (checked on resume with the data order).

    A file source is named by the sha256 of its files' names and bytes, not by its path; a token-shard folder by
    its fingerprint.
    """
    if section.source == "generated":
        return (f"generated(n={section.n_documents},topics={section.n_topics},seed={section.seed},"
                f"window={section.window})")
    if is_shard_corpus(section):
        return f"token_shards(fingerprint={shard_fingerprint(section)},window={section.window})"
    # by content, not by path: the same files linked or copied elsewhere keep their caches, edited files do not
    h = hashlib.sha256()
    for f in source_files(section.source):
        h.update(f"{f.name}\0{_file_sha256(f)}\0".encode())
    split = f",split={section.txt_split}" if any(f.suffix == ".txt" for f in source_files(section.source)) else ""
    return (f"files(sha256={h.hexdigest()[:16]},field={section.text_field}{split},n={section.n_documents},"
            f"window={section.window})")
