"""Autoregressive generation over sentence embeddings with the paper's stopping rules (LCM paper §2.3.1).

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
``sample_latent_variable``, off by default, as in the reference's evaluation: it adds large noise to an MSE model),
drawn per document and step so a document's output does not depend on the rest of the batch.

Decoding to text is the caller's: pass ``decode(vectors (N, D)) -> list[str]``; it is called once for all
generated vectors of the batch, and a document's text is its sentences joined with spaces.

Every LCM variant plugs into the same loop through a :class:`NextSentencePredictor` (``model.predictor(options)``):
the loop owns prompts, padding, stopping and batching; the predictor owns the model's state (KV caches, cached
cross-attention memories) and how one next sentence is produced (a regression, a diffusion sampler, residual
codes). A predictor draws its randomness from ``(options.seed, document row, step)`` only, so a document's output
does not depend on the other documents of the batch, nor on whether caches are used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from conceptlm.core.modules import positions_from_padding
from conceptlm.core.rng import derived_generator
from conceptlm.lcm.config import GenerationOptions
from conceptlm.lcm.sequence import NormalizedModel

__all__ = ["GeneratedDocument", "generate", "STOP_REASONS", "NextSentencePredictor", "SequenceState",
           "row_generator"]

STOP_REASONS = ("eot", "repetition", "max_new_sentences", "max_sentences")


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


def row_generator(purpose: str, seed: int, row: int, step: int) -> torch.Generator:
    """The CPU generator of document ``row`` at generation ``step`` (draws independent of the batch)."""
    return derived_generator(purpose, seed, row, step)


class NextSentencePredictor(Protocol):
    """The model side of :func:`generate`. All embeddings are in the model's normalized space.

    ``rows`` are the documents' indices in the caller's prompt list (for per-document randomness, see
    :func:`row_generator`); ``step`` counts the sentences generated so far (0 for the first).
    """

    def start(self, z: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Prompts ``z`` ``(A, S, D)`` left-padded (``keep`` bool ``(A, S)``, sentence ``positions`` long
        ``(A, S)``) -> the first generated sentence ``(A, D)``."""
        ...

    def step(self, z_new: torch.Tensor, rows: list[int], step: int) -> torch.Tensor:
        """Append the last generated sentence ``z_new`` ``(A, D)`` to every running document -> the next one
        ``(A, D)``."""
        ...

    def select(self, index: torch.Tensor) -> None:
        """Keep only the running documents ``index`` (long ``(A',)``), in that order."""
        ...


class SequenceState:
    """The left-padded normalized sequences of the running documents (the part every predictor keeps)."""

    def __init__(self, z: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor) -> None:
        self.z, self.keep, self.positions = z, keep, positions

    def append(self, z_new: torch.Tensor) -> None:
        self.z = torch.cat([self.z, z_new.unsqueeze(1)], dim=1)
        self.keep = torch.cat([self.keep, torch.ones_like(self.keep[:, :1])], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)

    def select(self, index: torch.Tensor) -> None:
        self.z, self.keep, self.positions = self.z[index], self.keep[index], self.positions[index]


def make_predictor(model: NormalizedModel, options: GenerationOptions) -> NextSentencePredictor:
    """``model.predictor(options)`` (every LCM variant defines one)."""
    factory = getattr(model, "predictor", None)
    if factory is None:
        raise TypeError(f"{type(model).__name__} has no predictor(options) for generation")
    return factory(options)


def _left_pad(prompts: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    dim = prompts[0].shape[-1]
    seq = torch.zeros(len(prompts), width, dim, device=device)
    keep = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seq[i, width - len(p):] = p.to(device=device, dtype=torch.float32)
        keep[i, width - len(p):] = True
    return seq, keep


def _check_prompts(model: NormalizedModel, prompts: Sequence[torch.Tensor]) -> None:
    if not prompts:
        raise ValueError("no prompts")
    for i, p in enumerate(prompts):
        if p.ndim != 2 or p.shape[-1] != model.cfg.dim or len(p) == 0:
            raise ValueError(f"prompt {i}: expected a non-empty (n, {model.cfg.dim}) tensor, got {tuple(p.shape)}")
        if len(p) >= model.cfg.max_sentences:
            raise ValueError(f"prompt {i} has {len(p)} sentences; the model's max_sentences is "
                             f"{model.cfg.max_sentences} (prompt + at least one new sentence must fit)")


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
def generate(model: NormalizedModel, prompts: Sequence[torch.Tensor], *, eot: torch.Tensor | None = None,
             options: GenerationOptions | None = None,
             decode: Callable[[torch.Tensor], list[str]] | None = None) -> list[GeneratedDocument]:
    """Continue each prompt document sentence by sentence (module docstring).

    Args:
        model: any LCM variant (put in eval mode here; restored afterwards).
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
    predictor = make_predictor(model, o)
    rows = list(range(len(prompts)))
    eot_unit = F.normalize(eot.to(device).float().reshape(1, -1), dim=-1) if eot is not None else None
    results: dict[int, GeneratedDocument] = {}
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in rows}
    prev = torch.stack([p[-1].to(device).float() for p in prompts])
    step = 0
    try:
        y = predictor.start(model.normalize(seq), keep, positions_from_padding(keep), rows)
        while True:
            x = model.denormalize(y).float()  # (A, D)
            cos_prev = F.cosine_similarity(x, prev, dim=-1).tolist()
            cos_eot = (F.normalize(x, dim=-1) @ eot_unit.T).squeeze(-1).tolist() if eot_unit is not None else None
            running = []
            for a, r in enumerate(rows):
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
            if len(running) < len(rows):
                index = torch.tensor(running, device=device)
                predictor.select(index)
                rows = [rows[a] for a in running]
                x, y = x[index], y[index]
            prev = x
            step += 1
            y = predictor.step(model.normalize(x), rows, step)
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
