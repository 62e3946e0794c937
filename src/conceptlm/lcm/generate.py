"""Autoregressive generation over sentence embeddings with the paper's stopping rules (spec §3.3).

From a batch of prompt documents of different lengths, the model predicts one next sentence embedding per step,
appends it, and repeats. The prompts are **left-padded** (positions restart at 0 at each document's first
sentence, padding is masked out of attention), so every document advances one sentence per step; with the KV
cache (default) each new sentence costs one position per layer instead of a pass over the whole sequence.

A document stops, after at least ``min_new_sentences`` generated sentences, when

- ``cos(x^_n, eot) >= eos_threshold`` (``eot`` = the embedding of the end-of-text sentence, e.g. "End of text."),
- ``cos(x^_n, x_{n-1}) >= repetition_threshold`` (``x_{n-1}`` = the previous sentence of the sequence, the last
  prompt sentence for the first generated one),
- ``max_new_sentences`` sentences were generated, or the document reached the model's ``max_sentences``.

Cosines are taken in raw embedding space (paper: both thresholds 0.9). The sentence that triggered an end-of-text
or repetition stop is dropped from the output (``trim_stop_sentence``; the reference keeps it by default and then
decodes "End of text."). Finished documents leave the batch (their cache rows are dropped), so the others run on.
``temperature > 0`` adds ``temperature * N(0, I)`` noise in normalized space (the reference's
``sample_latent_variable``, off by default: spec §3.3 recommends it off for an MSE model), drawn per document and
step so a document's output does not depend on the rest of the batch.

Decoding to text is the caller's: pass ``decode(vectors (N, D)) -> list[str]``; it is called once for all
generated vectors of the batch, and a document's text is its sentences joined with spaces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from conceptlm.core.modules import KVCache, positions_from_padding
from conceptlm.core.rng import derived_generator
from conceptlm.lcm.model import BaseLCM

__all__ = ["GenerationOptions", "GeneratedDocument", "generate", "STOP_REASONS"]

STOP_REASONS = ("eot", "repetition", "max_new_sentences", "max_sentences")


@dataclass(kw_only=True)
class GenerationOptions:
    """Stopping rules and sampling of :func:`generate` (defaults: the paper's thresholds)."""

    max_new_sentences: int = 32
    min_new_sentences: int = 1
    """The end-of-text and repetition rules apply only from this many generated sentences on."""
    eos_threshold: float | None = 0.9
    """Stop when ``cos(x^_n, eot)`` reaches it (``None``: off; also off when no ``eot`` is given)."""
    repetition_threshold: float | None = 0.9
    """Stop when ``cos(x^_n, x_{n-1})`` reaches it (``None``: off)."""
    trim_stop_sentence: bool = True
    temperature: float = 0.0
    seed: int = 0
    use_cache: bool = True

    def validate(self) -> None:
        if self.max_new_sentences < 1:
            raise ValueError("max_new_sentences must be >= 1")
        if not 0 <= self.min_new_sentences <= self.max_new_sentences:
            raise ValueError("min_new_sentences must be in [0, max_new_sentences]")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")


@dataclass
class GeneratedDocument:
    """One document's continuation: ``vectors`` ``(n, D)`` raw embeddings, why it stopped (one of
    :data:`STOP_REASONS`), and, with a ``decode`` callable, its ``sentences`` and ``text``."""

    vectors: torch.Tensor
    stop: str
    sentences: list[str] | None = None
    text: str | None = None
    steps: int = 0
    """Sentences predicted, including a trimmed stop sentence."""


@dataclass
class _Batch:
    """The still-running documents: their row in the input, left-padded raw sequence, mask and positions."""

    rows: list[int]
    seq: torch.Tensor  # (A, S, D) raw
    keep: torch.Tensor  # (A, S) bool
    positions: torch.Tensor  # (A, S) long
    cache: KVCache | None = None

    def select(self, index: list[int]) -> None:
        idx = torch.tensor(index, device=self.seq.device)
        self.rows = [self.rows[i] for i in index]
        self.seq, self.keep, self.positions = self.seq[idx], self.keep[idx], self.positions[idx]
        if self.cache is not None:
            self.cache.reorder(idx)


def _left_pad(prompts: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    dim = prompts[0].shape[-1]
    seq = torch.zeros(len(prompts), width, dim, device=device)
    keep = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seq[i, width - len(p):] = p.to(device=device, dtype=torch.float32)
        keep[i, width - len(p):] = True
    return seq, keep


def _check_prompts(model: BaseLCM, prompts: Sequence[torch.Tensor]) -> None:
    if not prompts:
        raise ValueError("no prompts")
    for i, p in enumerate(prompts):
        if p.ndim != 2 or p.shape[-1] != model.cfg.dim or len(p) == 0:
            raise ValueError(f"prompt {i}: expected a non-empty (n, {model.cfg.dim}) tensor, got {tuple(p.shape)}")
        if len(p) >= model.cfg.max_sentences:
            raise ValueError(f"prompt {i} has {len(p)} sentences; the model's max_sentences is "
                             f"{model.cfg.max_sentences} (prompt + at least one new sentence must fit)")


def _next(model: BaseLCM, b: _Batch, new: torch.Tensor | None) -> torch.Tensor:
    """Append ``new`` ``(A, D)`` raw (``None`` on the first call) and return the normalized prediction of the
    next sentence ``(A, D)``."""
    if new is not None:
        b.seq = torch.cat([b.seq, new.unsqueeze(1)], dim=1)
        b.keep = torch.cat([b.keep, torch.ones_like(b.keep[:, :1])], dim=1)
        b.positions = torch.cat([b.positions, b.positions[:, -1:] + 1], dim=1)
    if b.cache is None:  # the whole sequence every step
        y = model.forward_normalized(model.normalize(b.seq), positions=b.positions, key_padding_mask=b.keep)
    elif new is None:  # prefill the prompts
        y = model.forward_normalized(model.normalize(b.seq), positions=b.positions, key_padding_mask=b.keep,
                                     cache=b.cache)
    else:  # one position per document
        y = model.forward_normalized(model.normalize(new.unsqueeze(1)), positions=b.positions[:, -1:],
                                     key_padding_mask=b.keep, cache=b.cache)
    return y[:, -1]


def _stop_reason(o: GenerationOptions, n_new: int, length: int, max_len: int, cos_eot: float | None,
                 cos_prev: float) -> str | None:
    if n_new >= o.min_new_sentences:
        if cos_eot is not None and o.eos_threshold is not None and cos_eot >= o.eos_threshold:
            return "eot"
        if o.repetition_threshold is not None and cos_prev >= o.repetition_threshold:
            return "repetition"
    if n_new >= o.max_new_sentences:
        return "max_new_sentences"
    if length >= max_len:
        return "max_sentences"
    return None


@torch.no_grad()
def generate(model: BaseLCM, prompts: Sequence[torch.Tensor], *, eot: torch.Tensor | None = None,
             options: GenerationOptions | None = None,
             decode: Callable[[torch.Tensor], list[str]] | None = None) -> list[GeneratedDocument]:
    """Continue each prompt document sentence by sentence (module docstring).

    Args:
        model: a :class:`BaseLCM` (put in eval mode here; restored afterwards).
        prompts: raw sentence embeddings ``(n_i, D)`` per document, ``n_i`` may differ.
        eot: ``(D,)`` embedding of the end-of-text sentence (the end-of-text rule is off without it).
        options: stopping rules and sampling.
        decode: ``(N, D) -> N`` sentences, for the texts.

    Returns:
        One :class:`GeneratedDocument` per prompt, in order.
    """
    o = options or GenerationOptions()
    o.validate()
    _check_prompts(model, prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seq, keep = _left_pad(prompts, device)
    b = _Batch(rows=list(range(len(prompts))), seq=seq, keep=keep, positions=positions_from_padding(keep),
               cache=KVCache() if o.use_cache else None)
    eot_unit = F.normalize(eot.to(device).float().reshape(1, -1), dim=-1) if eot is not None else None
    results: dict[int, GeneratedDocument] = {}
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in b.rows}
    prev = torch.stack([p[-1].to(device).float() for p in prompts])
    y = _next(model, b, None)
    step = 0
    try:
        while True:
            if o.temperature > 0:
                noise = torch.stack([torch.randn(y.shape[-1], generator=derived_generator(
                    "lcm-generate", o.seed, r, step)) for r in b.rows]).to(y)
                y = y + o.temperature * noise
            x = model.denormalize(y).float()  # (A, D)
            cos_prev = F.cosine_similarity(x, prev, dim=-1).tolist()
            cos_eot = (F.normalize(x, dim=-1) @ eot_unit.T).squeeze(-1).tolist() if eot_unit is not None else None
            running = []
            for a, r in enumerate(b.rows):
                outputs[r].append(x[a])
                n_new = len(outputs[r])
                reason = _stop_reason(o, n_new, len(prompts[r]) + n_new, model.cfg.max_sentences,
                                      cos_eot[a] if cos_eot is not None else None, cos_prev[a])
                if reason is None:
                    running.append(a)
                    continue
                vecs = outputs[r][:-1] if (o.trim_stop_sentence and reason in ("eot", "repetition")) else outputs[r]
                results[r] = GeneratedDocument(
                    vectors=torch.stack(vecs) if vecs else x.new_zeros(0, x.shape[-1]), stop=reason, steps=n_new)
            if not running:
                break
            if len(running) < len(b.rows):
                b.select(running)
                x = x[running]
            prev = x
            y = _next(model, b, x)
            step += 1
    finally:
        model.train(was_training)
    docs = [results[i] for i in range(len(prompts))]
    if decode is not None:
        _decode_all(docs, decode)
    return docs


def _decode_all(docs: list[GeneratedDocument], decode: Callable[[torch.Tensor], list[str]]) -> None:
    """One ``decode`` call for every generated vector of the batch; texts are sentences joined with spaces."""
    counts = [len(d.vectors) for d in docs]
    flat = [d.vectors for d in docs if len(d.vectors)]
    sentences = list(decode(torch.cat(flat))) if flat else []
    if len(sentences) != sum(counts):
        raise ValueError(f"decode returned {len(sentences)} sentences for {sum(counts)} vectors")
    start = 0
    for d, n in zip(docs, counts):
        d.sentences = sentences[start:start + n]
        d.text = " ".join(d.sentences)
        start += n
