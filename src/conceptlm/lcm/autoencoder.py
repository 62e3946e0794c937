"""A sentence autoencoder trained here: an encoder and a decoder learned together, so that decoding inverts
encoding (as SONAR's were; LCM paper §2.1), saved as one folder that is both an encoder and a decoder.

Model (``autoencoder`` section; ``conceptlm lcm train-autoencoder``):

- **encoder** (:class:`SentenceEncoderNet`): token embeddings -> a small bidirectional transformer
  (:class:`~conceptlm.core.modules.Decoder` with ``causal=False``, RoPE) -> mean over the sentence's tokens ->
  ``Linear(hidden, dim)`` -> L2 normalisation: the concept vector ``z`` (unit norm, ``dim`` wide);
- **decoder**: a :class:`~conceptlm.lcm.prefix_decoder.PrefixLMDecoder` (tiny Llama, ``n_prefix`` prefix
  embeddings of ``z``) that reproduces the sentence's tokens and EOS;
- one byte-level BPE tokenizer (:func:`~conceptlm.core.tokenizer.train_bpe_tokenizer`) trained on the training
  sentences; the encoder reads exactly the decoder's target ids (tokens + EOS, or the first ``max_tokens``).

Objective (:class:`AutoencoderUnit`): part ``ntp`` = summed token cross-entropy of the sentence given
``noise(z)`` (the decoder's training noise, :func:`~conceptlm.lcm.decoder_train.noise_embeddings`:
``normalize(z + s * eps / sqrt(dim))``, gradients flow through ``z`` into the encoder), and, when
``align_weight > 0``, part ``align`` = summed ``1 - cos(W z, m)`` over sentences, ``m`` the frozen
``align_encoder`` (MiniLM) vector of the sentence and ``W`` a learned linear map, so that sentences MiniLM puts
close stay close (``W`` is dropped on export).

Folder (the checkpoint's ``model/`` export)::

    artifact.json          kind lcm.autoencoder: settings, inputs (training / held-out sentences), files
    encoder.json           the encoder's settings
    encoder.safetensors    the encoder's weights
    tokenizer/             the shared tokenizer
    decoder/               a prefix_lm decoder folder (decoder.json names this encoder's identity;
                           artifact.json kind lcm.decoder with the sentences' origin)

Use: ``encoder.name: <folder>`` (:func:`~conceptlm.lcm.data.encoders.get_encoder` gives an
:class:`AutoencoderEncoder`, whose identity carries the weights' and the folder's fingerprints), and
``decoder.path: <folder>`` or ``decoder.kind: autoencoder`` (:class:`CachedDecoder` around the folder's decoder).
A run folder or checkpoint is accepted too (its newest export). Any other encoder is refused by the decoder.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from conceptlm.core.artifact import Identity, damaged_file, digest, read_manifest, write_manifest
from conceptlm.core.errors import ConfigError, DataError
from conceptlm.core.progress import progress_bar
from conceptlm.core.unit import THROUGHPUT_KEY, TrainUnit
from conceptlm.lcm.data.encoders import SentenceEncoder, weights_fingerprint
from conceptlm.lcm.decoders import SentenceDecoder, jsonable

__all__ = ["AUTOENCODER_KIND", "EncoderSettings", "SentenceEncoderNet", "AutoencoderUnit", "AutoencoderEncoder",
           "CachedDecoder", "autoencoder_dir", "load_autoencoder_decoder", "build_autoencoder",
           "write_autoencoder"]

log = logging.getLogger(__name__)

AUTOENCODER_KIND = "lcm.autoencoder"
"""``kind`` of an autoencoder folder's ``artifact.json``."""
_ENCODER_FILE, _WEIGHTS_FILE, _TOKENIZER_DIR, _DECODER_DIR = ("encoder.json", "encoder.safetensors", "tokenizer",
                                                               "decoder")
_CACHE_SIZE = 4096


@dataclass(kw_only=True)
class EncoderSettings:
    """The encoder's settings, kept with its weights (``encoder.json``)."""

    vocab_size: int
    dim: int
    hidden_size: int
    num_layers: int
    num_heads: int
    max_tokens: int
    pad_id: int


class SentenceEncoderNet(nn.Module):
    """Token ids -> unit-norm concept vectors: embeddings, bidirectional blocks, masked mean, ``Linear`` to ``dim``."""

    def __init__(self, s: EncoderSettings):
        super().__init__()
        from conceptlm.core.modules import Decoder, DecoderConfig

        self.settings = s
        self.embed = nn.Embedding(s.vocab_size, s.hidden_size)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = Decoder(DecoderConfig(d_model=s.hidden_size, n_layers=s.num_layers, n_heads=s.num_heads,
                                            d_ff=4 * s.hidden_size, mlp="swiglu", norm="rms", rope=True,
                                            causal=False))
        self.proj = nn.Linear(s.hidden_size, s.dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask (1 = token) -> (B, dim) unit-norm vectors (float32)."""
        keep = attention_mask.bool()
        h = self.blocks(self.embed(input_ids), key_padding_mask=keep)
        m = keep.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return F.normalize(self.proj(pooled).float(), dim=-1)


# ------------------------------------------------------------------------------------------------ training unit
class AutoencoderUnit(TrainUnit):
    """Encoder + decoder trained together (module docstring): parts ``ntp`` (per target token) and, with
    ``align_weight > 0``, ``align`` (per sentence); metric ``token_acc``. Batches come from
    :class:`~conceptlm.lcm.decoder_train.TargetCollator` (``vectors``: the alignment targets, (B, 0) without)."""

    metric_names = ("token_acc",)
    throughput_unit = "sentences"

    def __init__(self, encoder: SentenceEncoderNet, decoder, *, noise_std: float = 0.0,
                 noise_schedule: str = "uniform", align_weight: float = 0.0, align_dim: int = 0):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.noise_std, self.noise_schedule = noise_std, noise_schedule
        self.loss_weights = {"ntp": 1.0}
        self.align = None
        if align_weight > 0:
            self.align = nn.Linear(encoder.settings.dim, align_dim)
            self.loss_weights["align"] = align_weight
        self.manifest: tuple[Identity, dict] | None = None
        """``(identity, extra)`` of the folder's ``artifact.json``; the decoder's own in ``decoder_manifest``."""
        self.decoder_manifest: tuple[Identity, dict] | None = None

    def counts(self, batch: dict) -> dict:
        out = {"ntp": (batch["labels"] != -100).sum(), THROUGHPUT_KEY: batch["labels"].shape[0]}
        if self.align is not None:
            out["align"] = batch["labels"].shape[0]
        return out

    def forward(self, batch: dict) -> dict:
        from conceptlm.lcm.decoder_train import noise_embeddings

        z = self.encoder(batch["input_ids"], batch["attention_mask"])
        zn = z
        if self.training and self.noise_std > 0 and self.step_rng is not None:
            zn = noise_embeddings(z, batch["ids"], self.step_rng, std=self.noise_std, schedule=self.noise_schedule)
        loss, n, correct = self.decoder.token_loss(zn, batch["input_ids"], batch["labels"], batch["attention_mask"])
        out: dict[str, Any] = {"ntp": loss, "token_acc": (correct, n)}
        if self.align is not None:
            out["align"] = (1 - F.cosine_similarity(self.align(z), batch["vectors"].to(z), dim=-1)).sum()
        return out

    def export(self, directory: Path, state_dict: dict[str, torch.Tensor], artifacts: dict[str, Any]) -> bool:
        enc = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
        dec = {k[len("decoder."):]: v for k, v in state_dict.items() if k.startswith("decoder.")}
        write_autoencoder(Path(directory), self.encoder.settings, enc, self.decoder, dec,
                          manifest=self.manifest, decoder_manifest=self.decoder_manifest)
        return True


# ------------------------------------------------------------------------------------------------ build / save
def build_autoencoder(section, sentences: Sequence[str], *, seed: int = 0):
    """A fresh ``(SentenceEncoderNet, PrefixLMDecoder)`` pair for the ``autoencoder`` section, with a BPE tokenizer
    trained on ``sentences`` (seeded: same seed and sentences, same weights)."""
    from conceptlm.core.hf import build_tiny_model
    from conceptlm.core.tokenizer import train_bpe_tokenizer
    from conceptlm.lcm.prefix_decoder import PrefixLMDecoder, PrefixProjector, PrefixSettings

    section.validate()
    if not sentences:
        raise ValueError("an autoencoder needs training sentences (for its tokenizer)")
    tokenizer = train_bpe_tokenizer(list(sentences), vocab_size=section.vocab_size)
    s = section
    lm = build_tiny_model("llama", len(tokenizer), hidden_size=s.hidden_size, num_layers=s.decoder_layers,
                          num_heads=s.num_heads, max_position_embeddings=s.n_prefix + s.max_tokens + 8,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, seed=seed)
    with torch.random.fork_rng():  # the other modules' init must not move the global RNG
        torch.manual_seed(seed + 1)
        emb = lm.get_input_embeddings().weight
        projector = PrefixProjector(s.dim, s.hidden_size, s.n_prefix, kind="mlp", inner=4 * s.hidden_size,
                                    out_std=float(emb.detach().float().std()))
        enc = SentenceEncoderNet(EncoderSettings(vocab_size=len(tokenizer), dim=s.dim, hidden_size=s.hidden_size,
                                                 num_layers=s.encoder_layers, num_heads=s.num_heads,
                                                 max_tokens=s.max_tokens, pad_id=tokenizer.pad_token_id))
    settings = PrefixSettings(dim=s.dim, n_prefix=s.n_prefix, projector="mlp", projector_hidden=4 * s.hidden_size,
                              base=None, lora=0, lora_alpha=16, max_tokens=s.max_tokens,
                              max_new_tokens=s.max_tokens + 1, num_beams=1, batch_size=128, lowercase=False)
    decoder = PrefixLMDecoder(lm, tokenizer, projector, settings, encoder_identity={})
    return enc, decoder


def _encoder_identity(settings: EncoderSettings, fingerprint: str, folder: str | Path,
                      artifact: str | None) -> dict:
    return {"name": str(folder), "backend": "autoencoder", "path": str(folder), "dim": settings.dim,
            "normalize": True, "pooling": "mean", "max_seq_length": settings.max_tokens, "lowercase": False,
            "fingerprint": fingerprint, "autoencoder": artifact}


def write_autoencoder(directory: Path, settings: EncoderSettings, encoder_sd: dict[str, torch.Tensor], decoder,
                      decoder_sd: dict[str, torch.Tensor] | None = None, *,
                      manifest: tuple[Identity, dict] | None = None,
                      decoder_manifest: tuple[Identity, dict] | None = None) -> None:
    """Write the folder (module docstring) into an existing, empty ``directory`` (the trainer's export is atomic).

    The decoder's ``decoder.json`` names the identity of exactly this encoder (its weights' fingerprint and the
    folder's ``artifact.json`` fingerprint), so no other encoder's vectors are decoded with it."""
    directory.mkdir(parents=True, exist_ok=True)
    net = SentenceEncoderNet(settings)
    net.load_state_dict(encoder_sd, strict=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(directory / _WEIGHTS_FILE))
    (directory / _ENCODER_FILE).write_text(json.dumps(asdict(settings), indent=2), encoding="utf-8")
    decoder.tokenizer.save_pretrained(str(directory / _TOKENIZER_DIR))
    artifact = manifest[0].fingerprint if manifest is not None else None
    ident = _encoder_identity(settings, weights_fingerprint(net), "", artifact)
    decoder._encoder_identity = jsonable({k: v for k, v in ident.items() if k not in ("name", "path")})
    decoder.write(directory / _DECODER_DIR, decoder_sd)
    if decoder_manifest is not None:
        dm_identity, dm_extra = decoder_manifest
        write_manifest(directory / _DECODER_DIR, dm_identity, extra={**dm_extra, "encoder": decoder.encoder_identity})
    if manifest is not None:
        write_manifest(directory, manifest[0], extra=manifest[1])


# ------------------------------------------------------------------------------------------------ loading
def autoencoder_dir(path: str | Path) -> Path | None:
    """The autoencoder folder that ``path`` names (itself, its ``model/`` export, or the newest checkpoint's of a
    run folder), or None when ``path`` holds no autoencoder. An unreadable ``artifact.json`` is a one-line error."""
    path = Path(path)
    if not path.is_dir():
        return None
    candidates = [path, path / "model"]
    if (path / "checkpoints").is_dir():
        from conceptlm.core.checkpoint import find_latest_checkpoint

        latest = find_latest_checkpoint(path)
        if latest is not None:
            candidates.append(latest / "model")
    for c in candidates:
        if (c / "artifact.json").is_file():
            try:
                m = read_manifest(c)
            except DataError as e:
                raise ConfigError(str(e)) from None
            if m is not None and m.get("kind") == AUTOENCODER_KIND:
                return c
    return None


def _require(path: str | Path) -> tuple[Path, dict]:
    folder = autoencoder_dir(path)
    if folder is None:
        raise ConfigError(f"{path}: not a sentence autoencoder folder (no artifact.json of kind {AUTOENCODER_KIND!r}"
                          " here, in model/ or in the newest checkpoint): run 'conceptlm lcm train-autoencoder'")
    manifest = read_manifest(folder)
    problem = damaged_file(folder, manifest)
    if problem is not None:
        raise ConfigError(f"{problem}; run 'conceptlm lcm train-autoencoder' again")
    return folder, manifest


class AutoencoderEncoder(SentenceEncoder):
    """The encoder half of an autoencoder folder as a frozen :class:`SentenceEncoder` (length-sorted batches).

    ``identity()`` carries the weights' fingerprint (what every identity check compares) and the folder's
    ``artifact.json`` fingerprint (``autoencoder``)."""

    def __init__(self, path: str | Path, *, batch_size: int = 64, device: str = "cpu", name: str | None = None):
        from conceptlm.core.hf import load_tokenizer

        self.folder, manifest = _require(path)
        self.name = name or str(path)
        self.artifact = str(manifest["fingerprint"])
        try:
            settings = EncoderSettings(**json.loads((self.folder / _ENCODER_FILE).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"unreadable encoder settings ({type(e).__name__})",
                              path=self.folder / _ENCODER_FILE) from None
        self.settings = settings
        self.net = SentenceEncoderNet(settings)
        self.net.load_state_dict(load_file(str(self.folder / _WEIGHTS_FILE)), strict=True)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.net.to(self.device).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(self.folder / _TOKENIZER_DIR)
        self.batch_size = batch_size

    @classmethod
    def live(cls, net: SentenceEncoderNet, tokenizer, *, batch_size: int = 64) -> AutoencoderEncoder:
        """An encoder over a network being trained (for the evaluations during training; its identity is
        provisional: the weights change)."""
        self = cls.__new__(cls)
        self.folder, self.name, self.artifact = None, "autoencoder (training)", None
        self.settings, self.net, self.tokenizer, self.batch_size = net.settings, net, tokenizer, batch_size
        self.device = next(net.parameters()).device
        return self

    @property
    def dim(self) -> int:
        return self.settings.dim

    def token_ids(self, sentences: Sequence[str]) -> list[list[int]]:
        """What the encoder reads: each sentence's tokens + EOS, or its first ``max_tokens`` tokens."""
        enc = self.tokenizer(list(sentences), add_special_tokens=False)["input_ids"]
        m, eos = self.settings.max_tokens, self.tokenizer.eos_token_id
        return [ids[:m] if len(ids) > m else [*ids, eos] for ids in enc]

    @torch.inference_mode()
    def encode(self, sentences: Sequence[str], batch_size: int | None = None, progress: bool = False
               ) -> torch.Tensor:
        n = len(sentences)
        out = torch.empty((n, self.dim), dtype=torch.float32)
        if n == 0:
            return out
        ids = self.token_ids(sentences)
        order = sorted(range(n), key=lambda i: -len(ids[i]))
        bs = batch_size or self.batch_size
        starts = range(0, n, bs)
        for start in progress_bar(starts, total=len(starts), desc="encode", unit="batch", enabled=progress):
            idx = order[start:start + bs]
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), self.settings.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                input_ids[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            out[torch.tensor(idx)] = self.net(input_ids.to(self.device), mask.to(self.device)).float().cpu()
        return out

    @cached_property
    def _fingerprint(self) -> str:
        return weights_fingerprint(self.net)

    def identity(self) -> dict:
        if self.folder is None:  # live: the weights are still changing
            return _encoder_identity(self.settings, weights_fingerprint(self.net), self.name, None)
        return _encoder_identity(self.settings, self._fingerprint, self.name, self.artifact)


class CachedDecoder(SentenceDecoder):
    """A decoder with a bounded cache of its last decodes (evaluation decodes the same vectors more than once);
    decoding itself stays batched (the wrapped decoder's ``batch_size``)."""

    def __init__(self, decoder: SentenceDecoder, size: int = _CACHE_SIZE):
        self.inner, self.size = decoder, size
        self._cache: OrderedDict[bytes, str] = OrderedDict()
        self.hits = 0

    @property
    def encoder_identity(self) -> dict:
        return self.inner.encoder_identity

    def identity(self) -> dict:
        return self.inner.identity()

    def decode(self, vectors: torch.Tensor) -> list[str]:
        vectors = torch.as_tensor(vectors).detach().float().cpu()
        keys = [v.numpy().tobytes() for v in vectors]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self._cache}.values())
        fresh = dict(zip((keys[i] for i in todo), self.inner.decode(vectors[todo]))) if todo else {}
        out = []
        for k in keys:
            if k in fresh:
                out.append(fresh[k])
            else:
                self.hits += 1
                self._cache.move_to_end(k)
                out.append(self._cache[k])
        for k, text in fresh.items():
            self._cache[k] = text
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return out


def load_autoencoder_decoder(path: str | Path, *, encoder: SentenceEncoder | dict | None = None,
                             device: str | torch.device | None = None) -> CachedDecoder:
    """The decoder half of the autoencoder folder ``path`` (a run folder or checkpoint works too), cached; refused
    in one line when ``encoder``'s identity is not exactly the folder's encoder."""
    from conceptlm.lcm.decoders import load_decoder

    folder, _ = _require(path)
    return CachedDecoder(load_decoder(folder / _DECODER_DIR, encoder=encoder, device=device))


def sentence_fingerprint(sentences: Sequence[str]) -> str:
    """Content fingerprint of a list of sentences (order included)."""
    return digest(list(sentences))


def log_size(enc: nn.Module, dec: nn.Module) -> dict[str, int]:
    """Parameter counts of the two halves (``encoder_params``, ``decoder_params``)."""
    n_enc = sum(p.numel() for p in enc.parameters())
    n_dec = sum(p.numel() for p in dec.parameters())
    log.info("autoencoder: encoder %.2fM, decoder %.2fM parameters", n_enc / 1e6, n_dec / 1e6)
    return {"encoder_params": n_enc, "decoder_params": n_dec}

