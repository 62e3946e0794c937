"""The prefix-LM sentence decoder: a causal LM conditioned on a concept vector through prefix embeddings.

:class:`PrefixLMDecoder` is a :class:`~conceptlm.lcm.decoders.SentenceDecoder`: a small projector
(:class:`PrefixProjector`) maps the (unit-norm) embedding to ``n_prefix x hidden`` input embeddings that are
prepended to the token embeddings (``inputs_embeds``). The LM is a tiny Llama trained from scratch with a BPE
tokenizer trained on the sentences, or a pretrained causal LM (``smollm2-135m``, any local HF folder), optionally
with LoRA (:func:`build_prefix_decoder`). Saved as ``decoder.json  projector.safetensors  lm/`` (an HF
``save_pretrained`` folder or a LoRA adapter, plus the tokenizer); trained by :mod:`conceptlm.lcm.decoder_train`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from conceptlm.core.errors import ConfigError
from conceptlm.core.io import atomic_dir
from conceptlm.lcm.config import DecoderSection
from conceptlm.lcm.data.encoders import SentenceEncoder
from conceptlm.lcm.decoders import (
    DECODER_FILE,
    SentenceDecoder,
    check_encoder_identity,
    decoder_header,
    jsonable,
    read_decoder_header,
)

__all__ = ["PrefixProjector", "PrefixSettings", "PrefixLMDecoder", "build_prefix_decoder"]

_GELU_SQ_MEAN = 0.4252
"""E[gelu(h)^2] for h ~ N(0, 1), used to give a fresh MLP projector the token embeddings' scale."""


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
        self._encoder_identity = jsonable(encoder_identity)
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
        header = decoder_header(self.kind, self._encoder_identity, **asdict(self.settings),
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
        meta = read_decoder_header(directory)
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


