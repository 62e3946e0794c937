"""Sentence decoders: concept vectors back to text, behind one interface (:class:`SentenceDecoder`).

- :class:`RetrievalDecoder` returns, for each vector, the nearest sentence (cosine) of an embedded sentence bank.
  No training, always fluent: the floor for round-trip checks and a sanity check of predicted concepts.
- :class:`PrefixLMDecoder` is a causal LM conditioned on the vector through ``n_prefix`` prefix embeddings: a small
  projector maps the (unit-norm) embedding to ``n_prefix x hidden`` input embeddings that are prepended to the token
  embeddings (``inputs_embeds``). The LM is a tiny Llama trained from scratch with a BPE tokenizer trained on the
  sentences, or a pretrained causal LM (``smollm2-135m``, any local HF folder), optionally with LoRA.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from conceptlm.core.artifact import Identity, damaged_file, read_manifest, write_manifest
from conceptlm.core.errors import ConceptLMError, ConfigError, DataError
from conceptlm.core.io import atomic_dir
from conceptlm.lcm.config import DecoderSection
from conceptlm.lcm.encoders import SentenceEncoder, verify_identity

__all__ = [
    "DECODER_FILE", "SentenceDecoder", "RetrievalDecoder", "PrefixProjector", "PrefixSettings",
    "PrefixLMDecoder", "build_prefix_decoder", "load_decoder", "resolve_decoder_dir",
    "check_encoder_identity", "DECODER_KIND", "decoder_manifest",
]

DECODER_FILE = "decoder.json"
DECODER_KIND = "lcm.decoder"
"""``kind`` of a decoder's ``artifact.json``."""
_FORMAT = "conceptlm-lcm-decoder"
_VERSION = 1
_GELU_SQ_MEAN = 0.4252
"""E[gelu(h)^2] for h ~ N(0, 1), used to give a fresh MLP projector the token embeddings' scale."""


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


def _jsonable(d: dict) -> dict:
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


def _read_header(directory: Path) -> dict:
    meta = _read_json(directory / DECODER_FILE)
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ConfigError(f"not a conceptlm sentence decoder (field 'format' is not {_FORMAT!r})",
                          path=directory / DECODER_FILE, field="format")
    if meta.get("version") != _VERSION:
        raise ConfigError(f"version {meta.get('version')!r} is not supported (expected {_VERSION})",
                          path=directory / DECODER_FILE, field="version")
    return meta


def _header(kind: str, encoder_identity: dict, **settings) -> dict:
    return {"format": _FORMAT, "version": _VERSION, "kind": kind, "encoder": _jsonable(encoder_identity), **settings}


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
        self._encoder_identity = _jsonable(encoder_identity)
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
            header = _header(self.kind, self._encoder_identity, bank_size=len(self), dim=self.dim)
            (tmp / DECODER_FILE).write_text(json.dumps(header, indent=2), encoding="utf-8")
            if identity is not None:
                write_manifest(tmp, identity, extra=extra)
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, encoder: SentenceEncoder | dict | None = None) -> RetrievalDecoder:
        """Read a bank saved by :meth:`save`; refuse it when ``encoder``'s identity differs from the bank's."""
        directory = Path(directory)
        meta = _read_header(directory)
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


# ------------------------------------------------------------------------------------------------ prefix LM
class PrefixProjector(nn.Module):
    """Maps a sentence embedding (B, dim) to prefix input embeddings (B, n_prefix, hidden).

    The input is scaled by ``sqrt(dim)`` (a unit-norm vector then has per-dimension variance ~1) and the last layer is
    initialised so the prefix embeddings start with per-dimension std ``out_std`` (the LM's token embedding std).
    """

    def __init__(self, dim: int, hidden: int, n_prefix: int, *, kind: str = "mlp", inner: int = 1024,
                 out_std: float = 0.02):
        super().__init__()
        self.dim, self.hidden, self.n_prefix, self.kind = dim, hidden, n_prefix, kind
        if kind == "linear":
            self.net = nn.Linear(dim, n_prefix * hidden)
            last, fan = self.net, 1.0
        elif kind == "mlp":
            first = nn.Linear(dim, inner)
            last = nn.Linear(inner, n_prefix * hidden)
            self.net = nn.Sequential(first, nn.GELU(), last)
            nn.init.normal_(first.weight, std=dim ** -0.5)
            nn.init.zeros_(first.bias)
            fan = inner * _GELU_SQ_MEAN / last.in_features
        else:
            raise ValueError(f"unknown projector kind {kind!r} (linear or mlp)")
        nn.init.normal_(last.weight, std=out_std / math.sqrt(last.in_features * fan))
        nn.init.zeros_(last.bias)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        out = self.net(vectors * math.sqrt(self.dim))
        return out.view(vectors.shape[0], self.n_prefix, self.hidden)


@dataclass(kw_only=True)
class PrefixSettings:
    """The settings a :class:`PrefixLMDecoder` keeps with its weights (in ``decoder.json``)."""

    dim: int
    n_prefix: int
    projector: str
    projector_hidden: int
    base: str | None
    lora: int
    lora_alpha: int
    max_tokens: int
    max_new_tokens: int
    num_beams: int
    batch_size: int
    lowercase: bool

    @classmethod
    def from_section(cls, s: DecoderSection, dim: int) -> PrefixSettings:
        return cls(dim=dim, n_prefix=s.n_prefix, projector=s.projector, projector_hidden=s.projector_hidden,
                   base=s.base, lora=s.lora, lora_alpha=s.lora_alpha, max_tokens=s.max_tokens,
                   max_new_tokens=s.max_new_tokens, num_beams=s.num_beams, batch_size=s.batch_size,
                   lowercase=s.lowercase)


class PrefixLMDecoder(nn.Module, SentenceDecoder):
    """A causal LM reading a sentence embedding through ``n_prefix`` prefix embeddings.

    Sequence layout: ``[p_1 .. p_k] t_1 .. t_n EOS``; position ``k - 1 + j`` predicts token ``j`` (the first token
    comes from the last prefix position). Generation is ``lm.generate(inputs_embeds=prefix)``.

    Args:
        lm: an HF causal LM (or a ``peft.PeftModel`` around one).
        tokenizer: its tokenizer (must have an EOS token).
        projector: a :class:`PrefixProjector` whose ``hidden`` is the LM's width.
        settings: what is saved with the weights.
        encoder_identity: identity of the encoder whose vectors this decoder reads.
    """

    kind = "prefix_lm"

    def __init__(self, lm: nn.Module, tokenizer, projector: PrefixProjector, settings: PrefixSettings,
                 encoder_identity: dict):
        super().__init__()
        if tokenizer.eos_token_id is None:
            raise ValueError("the decoder's tokenizer needs an EOS token")
        self.lm, self.projector, self.tokenizer, self.settings = lm, projector, tokenizer, settings
        self._encoder_identity = _jsonable(encoder_identity)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    # ------------------------------------------------------------------------------------------ pieces
    @property
    def encoder_identity(self) -> dict:
        return self._encoder_identity

    @property
    def n_prefix(self) -> int:
        return self.settings.n_prefix

    def _device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def prefix_embeds(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, dim) embeddings -> (B, n_prefix, hidden) LM input embeddings (vectors are unit-normalized first)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.settings.dim:
            raise ValueError(f"expected vectors of shape (B, {self.settings.dim}), got {tuple(vectors.shape)}")
        w = next(self.projector.parameters())
        return self.projector(F.normalize(vectors.to(device=w.device, dtype=w.dtype), dim=-1))

    def target_ids(self, sentences: Sequence[str]) -> list[list[int]]:
        """Training targets: each sentence's tokens (at most ``max_tokens``) plus EOS when it was not cut."""
        texts = [s.lower() for s in sentences] if self.settings.lowercase else list(sentences)
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        m = self.settings.max_tokens
        return [ids[:m] if len(ids) > m else [*ids, self.eos_id] for ids in enc]

    def token_loss(self, vectors: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy of the sentence tokens given the prefix.

        Args:
            vectors: (B, dim) sentence embeddings.
            input_ids: (B, T) target tokens (right-padded).
            labels: (B, T) the same ids, -100 at padding.
            attention_mask: (B, T) 1 = token, 0 = padding (default: all ones).

        Returns:
            ``(loss_sum, n_targets, n_correct)``: fp32 scalar sum over targets, int64 count, int64 greedy hits.
        """
        from conceptlm.core.hf import backbone, logits_at

        b, t = input_ids.shape
        k = self.n_prefix
        prefix = self.prefix_embeds(vectors)
        tokens = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)
        mask = torch.ones(b, k + t, dtype=torch.long, device=input_ids.device)
        if attention_mask is not None:
            mask[:, k:] = attention_mask
        hid = backbone(self.lm)(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        keep = labels != -100
        picked = hid[:, k - 1:k - 1 + t][keep]  # (N, hidden)
        target = labels[keep]
        logits = logits_at(self.lm, picked).float()
        loss = F.cross_entropy(logits, target, reduction="sum")
        return loss, keep.sum(), (logits.argmax(-1) == target).sum()

    # ------------------------------------------------------------------------------------------ decoding
    def _generation_config(self):
        from transformers import GenerationConfig

        s = self.settings
        return GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=False, num_beams=s.num_beams,
                                eos_token_id=self.eos_id, pad_token_id=self.pad_id)

    @torch.no_grad()
    def generate_ids(self, vectors: torch.Tensor) -> list[list[int]]:
        """Greedy (or beam) token ids for each vector (n, dim), EOS and padding removed."""
        was_training = self.training
        self.eval()
        out: list[list[int]] = []
        try:
            gen_cfg = self._generation_config()
            for start in range(0, vectors.shape[0], self.settings.batch_size):
                prefix = self.prefix_embeds(vectors[start:start + self.settings.batch_size])
                prefix = prefix.to(self.lm.get_input_embeddings().weight.dtype)
                mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
                seqs = self.lm.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=gen_cfg)
                for row in seqs.tolist():
                    out.append(row[:row.index(self.eos_id)] if self.eos_id in row else row)
        finally:
            self.train(was_training)
        return out

    def decode(self, vectors: torch.Tensor) -> list[str]:
        """Decode (n, dim) vectors into n sentences."""
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in self.generate_ids(vectors)]
        if self.settings.lowercase:
            texts = [t[:1].upper() + t[1:] for t in texts]
        return texts

    def identity(self) -> dict:
        s = self.settings
        return {"kind": self.kind, "base": s.base, "n_prefix": s.n_prefix, "projector": s.projector,
                "lora": s.lora, "dim": s.dim, "lm_params": sum(p.numel() for p in self.lm.parameters()),
                "encoder": self._encoder_identity}

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the decoder folder atomically.

        Args:
            directory: target folder (replaced if it exists).
            state_dict: this module's full state dict to write instead of the live weights (e.g. gathered from
                FSDP shards); keys ``lm.*`` and ``projector.*``.
        """
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            self.write(tmp, state_dict)
        return directory

    def write(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the decoder's files into an existing, empty ``directory`` (not atomic: see :meth:`save`)."""
        from conceptlm.core.checkpoint import tied_parameter_names

        directory.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        proj = {k[len("projector."):]: v.detach().cpu().contiguous() for k, v in sd.items()
                if k.startswith("projector.")}
        save_file(proj, str(directory / "projector.safetensors"))
        tied = tied_parameter_names(self.lm)
        lm_sd = {k[len("lm."):]: v for k, v in sd.items() if k.startswith("lm.") and k[len("lm."):] not in tied}
        if self.settings.lora:  # PEFT picks the adapter weights out of the full state dict
            self.lm.save_pretrained(str(directory / "lm"), state_dict=lm_sd)
        else:
            self.lm.save_pretrained(str(directory / "lm"), state_dict=lm_sd, safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory / "lm"))
        header = _header(self.kind, self._encoder_identity, **asdict(self.settings),
                         lm_hidden=self.projector.hidden)
        (directory / DECODER_FILE).write_text(json.dumps(header, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path, *, encoder: SentenceEncoder | dict | None = None,
             device: str | torch.device | None = None) -> PrefixLMDecoder:
        """Read a folder written by :meth:`save`; refuse it when ``encoder``'s identity differs from the saved one.

        A LoRA decoder loads its base from ``decoder.json``'s ``base`` and applies the adapter in ``lm/``.
        """
        from conceptlm.core.hf import load_causal_lm, load_tokenizer

        directory = Path(directory)
        meta = _read_header(directory)
        if meta["kind"] != cls.kind:
            raise ConfigError(f"holds a {meta['kind']!r} decoder, not a prefix_lm decoder",
                              path=directory / DECODER_FILE, field="kind")
        check_encoder_identity(meta["encoder"], encoder, where=directory)
        names = {f for f in PrefixSettings.__dataclass_fields__}
        missing = sorted(names - set(meta))
        if missing:
            raise ConfigError(f"missing settings {', '.join(missing)}", path=directory / DECODER_FILE)
        settings = PrefixSettings(**{k: meta[k] for k in names})
        lm_dir = directory / "lm"
        tokenizer = load_tokenizer(lm_dir)
        if settings.lora:
            import peft

            lm = peft.PeftModel.from_pretrained(load_causal_lm(settings.base), str(lm_dir))
        else:
            lm = load_causal_lm(lm_dir)
        projector = PrefixProjector(settings.dim, meta["lm_hidden"], settings.n_prefix, kind=settings.projector,
                                    inner=settings.projector_hidden)
        projector.load_state_dict(load_file(str(directory / "projector.safetensors")), strict=True)
        dec = cls(lm, tokenizer, projector, settings, meta["encoder"])
        if device is not None:
            dec.to(device)
        return dec.eval()


def build_prefix_decoder(section: DecoderSection, *, dim: int, encoder_identity: dict,
                         sentences: Sequence[str] | None = None, seed: int = 0) -> PrefixLMDecoder:
    """A fresh (untrained projector) prefix decoder for ``dim``-dimensional embeddings.

    ``base: null`` trains a byte-level BPE tokenizer on ``sentences`` (required then) and builds a tiny Llama
    (seeded); otherwise the pretrained LM and its tokenizer are loaded (and wrapped with LoRA when ``lora > 0``:
    only the adapters and the projector train).
    """
    from conceptlm.core.hf import apply_lora, build_tiny_model, load_causal_lm, load_tokenizer

    section.validate()
    if section.base is None:
        from conceptlm.core.tokenizer import train_bpe_tokenizer

        if not sentences:
            raise ValueError("a from-scratch prefix decoder needs sentences to train its tokenizer on")
        texts = [s.lower() for s in sentences] if section.lowercase else list(sentences)
        tokenizer = train_bpe_tokenizer(texts, vocab_size=section.vocab_size)
        lm = build_tiny_model("llama", len(tokenizer), hidden_size=section.hidden_size,
                              num_layers=section.num_layers, num_heads=section.num_heads,
                              max_position_embeddings=section.max_position_embeddings,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, seed=seed)
    else:
        lm = load_causal_lm(section.base)
        tokenizer = load_tokenizer(section.base)
        if section.lora:
            lm.requires_grad_(False)
            lm = apply_lora(lm, r=section.lora, alpha=section.lora_alpha)
    emb = lm.get_input_embeddings().weight
    hidden = emb.shape[1]
    with torch.random.fork_rng():  # the projector's init must not move the global RNG
        torch.manual_seed(seed + 1)
        projector = PrefixProjector(dim, hidden, section.n_prefix, kind=section.projector,
                                    inner=section.projector_hidden, out_std=float(emb.detach().float().std()))
    return PrefixLMDecoder(lm, tokenizer, projector, PrefixSettings.from_section(section, dim), encoder_identity)


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
    meta = _read_header(directory)
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
    if meta["kind"] == PrefixLMDecoder.kind:
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
