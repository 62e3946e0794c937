"""Sentence decoders: concept vectors back to text, behind one interface (:class:`SentenceDecoder`).

- :class:`RetrievalDecoder` returns, for each vector, the nearest sentence (cosine) of an embedded sentence bank.
  No training, always fluent: the floor for round-trip checks and a sanity check of predicted concepts.
- :class:`~conceptlm.lcm.prefix_decoder.PrefixLMDecoder` (its own module) is a causal LM conditioned on the vector
  through ``n_prefix`` prefix embeddings, trained by :mod:`conceptlm.lcm.decoder_train`.

A decoder is saved as a folder with ``decoder.json`` (kind, settings and the identity of the encoder it was made
for). Loading with an encoder whose identity differs is refused with a one-line :class:`ConfigError`. A decoder made
by ``train-decoder`` also holds ``artifact.json`` (kind ``lcm.decoder``): the fingerprints of the sentences it
learned from and of its encoder, which documents those sentences came from (``data``: the training split of a
prepared folder, by default), and the size and sha256 of its files, checked when it is loaded (a truncated or
damaged bank is a one-line error).

Layouts::

    retrieval/  decoder.json  bank.safetensors ("embeddings": (N, dim) float32)  sentences.json
    prefix_lm/  decoder.json  projector.safetensors  lm/ (HF save_pretrained folder or LoRA adapter + tokenizer)
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from conceptlm.core.artifact import Identity, damaged_file, read_manifest, write_manifest
from conceptlm.core.errors import ConceptLMError, ConfigError, DataError
from conceptlm.core.io import atomic_dir
from conceptlm.lcm.config import DecoderSection
from conceptlm.lcm.data.encoders import SentenceEncoder, verify_identity

__all__ = [
    "DECODER_FILE", "SentenceDecoder", "RetrievalDecoder", "load_decoder", "resolve_decoder_dir",
    "check_encoder_identity", "DECODER_KIND", "decoder_manifest", "decoder_header", "read_decoder_header", "jsonable",
]

DECODER_FILE = "decoder.json"
DECODER_KIND = "lcm.decoder"
"""``kind`` of a decoder's ``artifact.json``."""
_FORMAT = "conceptlm-lcm-decoder"
_VERSION = 1


# ------------------------------------------------------------------------------------------------ interface
class SentenceDecoder(ABC):
    """Turns sentence embeddings into text."""

    @abstractmethod
    def decode(self, vectors: torch.Tensor) -> list[str]:
        """Decode ``vectors`` (n, dim) (any norm; they are compared/used by direction) into n sentences."""

    @abstractmethod
    def identity(self) -> dict:
        """A JSON-able description: kind, settings and the identity of the encoder this decoder was made for."""

    @property
    @abstractmethod
    def encoder_identity(self) -> dict:
        """The ``identity()`` of the encoder whose embeddings this decoder reads."""


def jsonable(d: dict) -> dict:
    """``d`` as it reads back from JSON (sorted keys, tuples as lists): how identities are compared."""
    return json.loads(json.dumps(d, sort_keys=True))


def check_encoder_identity(expected: dict, encoder: SentenceEncoder | dict | None, *, where: str | Path) -> None:
    """Refuse an encoder whose identity differs from ``expected`` (a decoder's) in what defines the embedding
    space (dim, normalization, pooling, truncation, casing, language, weights fingerprint: see
    ``encoders.verify_identity``), as one :class:`ConfigError` line naming the decoder's ``decoder.json``."""
    if encoder is None:
        return
    try:
        verify_identity(expected, encoder, where="this decoder")
    except ConceptLMError as err:
        raise ConfigError(f"{err}; use the encoder it was trained with or train a decoder for this one",
                          path=Path(where) / DECODER_FILE, field="encoder") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("missing: not a saved sentence decoder folder", path=path) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"not valid JSON ({e.msg})", path=path, line=e.lineno) from None


def read_decoder_header(directory: Path) -> dict:
    """The checked ``decoder.json`` of a decoder folder (format and version; one-line errors)."""
    meta = _read_json(directory / DECODER_FILE)
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ConfigError(f"not a conceptlm sentence decoder (field 'format' is not {_FORMAT!r})",
                          path=directory / DECODER_FILE, field="format")
    if meta.get("version") != _VERSION:
        raise ConfigError(f"version {meta.get('version')!r} is not supported (expected {_VERSION})",
                          path=directory / DECODER_FILE, field="version")
    return meta


def decoder_header(kind: str, encoder_identity: dict, **settings) -> dict:
    """The ``decoder.json`` of a decoder of ``kind`` made for the encoder ``encoder_identity``."""
    return {"format": _FORMAT, "version": _VERSION, "kind": kind, "encoder": jsonable(encoder_identity), **settings}


# ------------------------------------------------------------------------------------------------ retrieval
class RetrievalDecoder(SentenceDecoder):
    """Nearest-neighbour decoding over a bank of embedded sentences.

    Args:
        embeddings: (N, dim) bank vectors (normalized here to unit length).
        sentences: the N sentences, aligned with ``embeddings``.
        encoder_identity: identity of the encoder that made ``embeddings``.
        chunk: bank rows scored at once (bounds the (n, chunk) similarity matrix).
        normalized: ``embeddings`` are unit-norm already (kept bit for bit, e.g. when loading a saved bank).
    """

    kind = "retrieval"

    def __init__(self, embeddings: torch.Tensor, sentences: Sequence[str], encoder_identity: dict, *,
                 chunk: int = 65536, normalized: bool = False):
        if embeddings.dim() != 2 or embeddings.shape[0] != len(sentences):
            raise ValueError(f"embeddings {tuple(embeddings.shape)} do not align with {len(sentences)} sentences")
        if len(sentences) == 0:
            raise ValueError("a retrieval decoder needs at least one sentence in its bank")
        vectors = embeddings.detach().float()
        self.embeddings = vectors if normalized else F.normalize(vectors, dim=-1)
        self.sentences = list(sentences)
        self._encoder_identity = jsonable(encoder_identity)
        self.chunk = chunk

    @classmethod
    def build(cls, sentences: Sequence[str], encoder: SentenceEncoder, *, batch_size: int | None = None,
              progress: bool = False, dedupe: bool = True) -> RetrievalDecoder:
        """Embed ``sentences`` with ``encoder`` (batched) into a bank; duplicates are dropped when ``dedupe``."""
        bank = list(dict.fromkeys(sentences)) if dedupe else list(sentences)
        vectors = encoder.encode(bank, batch_size=batch_size, progress=progress)
        return cls(vectors, bank, encoder.identity())

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def encoder_identity(self) -> dict:
        return self._encoder_identity

    def __len__(self) -> int:
        return len(self.sentences)

    def nearest(self, vectors: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` bank entries by cosine: ``(scores (n, k), indices (n, k))``; ties go to the lower index."""
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {tuple(vectors.shape)}")
        k = min(k, len(self))
        q = F.normalize(vectors.detach().float().to(self.embeddings.device), dim=-1)
        best_s = torch.full((q.shape[0], 0), -math.inf)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long)
        for start in range(0, len(self), self.chunk):
            sims = q @ self.embeddings[start:start + self.chunk].T
            s, i = sims.topk(min(k, sims.shape[1]), dim=1)
            best_s, best_i = torch.cat([best_s, s.cpu()], 1), torch.cat([best_i, i.cpu() + start], 1)
            order = torch.sort(best_s, dim=1, descending=True, stable=True).indices[:, :k]
            best_s, best_i = best_s.gather(1, order), best_i.gather(1, order)
        return best_s, best_i

    def decode(self, vectors: torch.Tensor) -> list[str]:
        """The nearest bank sentence of each vector (n, dim)."""
        _, idx = self.nearest(vectors, k=1)
        return [self.sentences[i] for i in idx[:, 0].tolist()]

    def identity(self) -> dict:
        return {"kind": self.kind, "bank_size": len(self), "dim": self.dim, "encoder": self._encoder_identity}

    def save(self, directory: str | Path, *, identity: Identity | None = None, extra: dict | None = None) -> Path:
        """Write the bank atomically (``bank.safetensors`` + ``sentences.json`` + ``decoder.json``, and
        ``artifact.json`` with ``identity`` and ``extra`` when given)."""
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            save_file({"embeddings": self.embeddings.contiguous().cpu()}, str(tmp / "bank.safetensors"))
            (tmp / "sentences.json").write_text(json.dumps(self.sentences, ensure_ascii=False), encoding="utf-8")
            header = decoder_header(self.kind, self._encoder_identity, bank_size=len(self), dim=self.dim)
            (tmp / DECODER_FILE).write_text(json.dumps(header, indent=2), encoding="utf-8")
            if identity is not None:
                write_manifest(tmp, identity, extra=extra)
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, encoder: SentenceEncoder | dict | None = None) -> RetrievalDecoder:
        """Read a bank saved by :meth:`save`; refuse it when ``encoder``'s identity differs from the bank's."""
        directory = Path(directory)
        meta = read_decoder_header(directory)
        if meta["kind"] != cls.kind:
            raise ConfigError(f"holds a {meta['kind']!r} decoder, not a retrieval bank",
                              path=directory / DECODER_FILE, field="kind")
        check_encoder_identity(meta["encoder"], encoder, where=directory)
        bank_file = directory / "bank.safetensors"
        try:
            vectors = load_file(str(bank_file))["embeddings"]
        except (SafetensorError, OSError, KeyError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise ConfigError(f"cannot read the bank (truncated or damaged: {reason}); run 'conceptlm lcm "
                              "train-decoder' again", path=bank_file) from None
        if vectors.dim() != 2:
            raise ConfigError(f"'embeddings' has shape {tuple(vectors.shape)}, expected (N, dim)", path=bank_file)
        sentences = _read_json(directory / "sentences.json")
        if not isinstance(sentences, list) or len(sentences) != vectors.shape[0]:
            raise ConfigError(f"does not hold a list of {vectors.shape[0]} sentences (one per bank vector)",
                              path=directory / "sentences.json")
        return cls(vectors, sentences, meta["encoder"], normalized=True)


# ------------------------------------------------------------------------------------------------ loading
def load_decoder(source: str | Path | DecoderSection, *, encoder: SentenceEncoder | dict | None = None,
                 device: str | torch.device | None = None) -> SentenceDecoder:
    """Load a saved decoder from a folder (or ``section.path``), of whichever kind it is.

    Also accepts a training checkpoint folder (its ``model/`` export) and a run folder (its newest checkpoint).

    Raises:
        ConfigError: no decoder there, a kind other than ``section.kind``, or an encoder mismatch.
    """
    want_kind = None
    if isinstance(source, DecoderSection):
        source.validate()
        if source.path is None:
            raise ConfigError("no saved decoder to load: set decoder.path to a decoder folder (train one first)",
                              field="decoder.path")
        want_kind, source = source.kind, source.path
    directory = resolve_decoder_dir(Path(source))
    meta = read_decoder_header(directory)
    manifest = decoder_manifest(directory)
    if manifest is not None:
        problem = damaged_file(directory, manifest)
        if problem is not None:
            raise ConfigError(f"{problem}; run 'conceptlm lcm train-decoder' again")
    if want_kind is not None and meta["kind"] != want_kind:
        raise ConfigError(f"holds a {meta['kind']!r} decoder but decoder.kind is {want_kind!r}",
                          path=directory / DECODER_FILE, field="kind")
    if meta["kind"] == RetrievalDecoder.kind:
        return RetrievalDecoder.load(directory, encoder=encoder)
    if meta["kind"] == "prefix_lm":
        from conceptlm.lcm.prefix_decoder import PrefixLMDecoder  # transformers is imported only for this kind

        return PrefixLMDecoder.load(directory, encoder=encoder, device=device)
    raise ConfigError(f"unknown decoder kind {meta['kind']!r}", path=directory / DECODER_FILE, field="kind")


def decoder_manifest(directory: str | Path) -> dict | None:
    """The ``artifact.json`` of a decoder folder (resolved as :func:`load_decoder` does), or None when it has
    none (saved through the API, or made by an older version); one-line error when it is unreadable or of
    another kind."""
    directory = resolve_decoder_dir(Path(directory))
    try:
        manifest = read_manifest(directory)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if manifest is not None and manifest.get("kind") != DECODER_KIND:
        raise ConfigError(f"holds a {manifest.get('kind')!r} artifact, not a sentence decoder", path=directory)
    return manifest


def resolve_decoder_dir(path: Path) -> Path:
    """``path`` itself when it holds ``decoder.json``; else its ``model/`` export; else the newest checkpoint's."""
    if (path / DECODER_FILE).is_file():
        return path
    if (path / "model" / DECODER_FILE).is_file():
        return path / "model"
    if (path / "decoder" / DECODER_FILE).is_file():
        return path / "decoder"
    if (path / "checkpoints").is_dir():
        from conceptlm.core.checkpoint import find_latest_checkpoint

        latest = find_latest_checkpoint(path)
        if latest is not None and (latest / "model" / DECODER_FILE).is_file():
            return latest / "model"
    raise ConfigError("not a saved sentence decoder (no decoder.json here, in model/ or in a checkpoint)",
                      path=path)
