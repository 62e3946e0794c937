"""LCM evaluation metrics (LCM paper §2.4.1, §2.5.2, §3.1.1).

Teacher-forced next-sentence metrics work on vectors; ``pred[i]`` is the model's prediction of ``target[i]`` from
the ground-truth prefix. Each returns per-item values; a caller reports them as ``(sum, count)`` pairs
(:func:`as_sum_count`).

- **ℓ2** :func:`l2_distance` ``||x^_n - x_n||_2`` in raw embedding space; **ℓ2-r** :func:`round_trip_l2`
  ``||enc(dec(x^_n)) - x_n||_2``.
- **CA** :func:`contrastive_accuracy`: the fraction of in-batch negatives farther from ``x^_n`` than ``x_n`` is
  (0.5 = chance). ``exclude="document"`` (reference code): negatives are the targets of the *other* documents;
  ``exclude="neighbours"`` (paper text): every target except ``x_n`` and its two neighbours in its document.
- **PAR** :func:`paraphrasing_score` ``max_{m<n} cos(x^_n, x_m) / max_{m<n} cos(x_n, x_m)``.
- **MI** :func:`mutual_information`: ``sum_n [log p(s^_n | s_{n-k..n-1}) - log p(s^_n)] / sum_n |s^_n|`` with a
  causal LM (:class:`CausalLMScorer`).

Text metrics: :func:`rouge_l` (``rouge-score``), :func:`ovl3` / :func:`rep4` (word n-grams, the paper's definitions),
:func:`ngram_overlap_char14` / :func:`repetition_char14` (character 1-4-grams, what the reference code computes),
:func:`auto_bleu` (``sacrebleu``), and :func:`fragility` (Eq. 26-28).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "as_sum_count", "l2_distance", "round_trip_l2", "contrastive_accuracy", "paraphrasing_score",
    "mutual_information", "CausalLMScorer", "rouge_l", "word_ngrams", "ovl3", "rep4", "char_ngrams_1_4",
    "ngram_overlap_char14", "repetition_char14", "auto_bleu", "sentence_bleu", "perturb_embeddings", "fragility",
    "cosine_score",
]

Vectors = Callable[[torch.Tensor], torch.Tensor]


def as_sum_count(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-item values ``(N,)`` -> ``(sum, N)``, ignoring NaN items (e.g. undefined ratios)."""
    ok = ~torch.isnan(values)
    return values[ok].sum(), int(ok.sum())


# ------------------------------------------------------------------------------------------------ vectors
def l2_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||pred - target||_2`` over the last dim: ``(..., D)`` x ``(..., D)`` -> ``(...)`` (fp32)."""
    return (pred.float() - target.float()).norm(dim=-1)


def round_trip_l2(pred: torch.Tensor, target: torch.Tensor, round_trip: Vectors) -> torch.Tensor:
    """ℓ2-r: ``||round_trip(pred) - target||_2`` ``(N,)``, where ``round_trip(v) = encode(decode(v))`` ``(N, D)``
    re-embeds the decoded text of each predicted vector."""
    return l2_distance(round_trip(pred), target)


def contrastive_accuracy(pred: torch.Tensor, target: torch.Tensor, doc: torch.Tensor,
                         position: torch.Tensor | None = None, *,
                         exclude: Literal["document", "neighbours"] = "document") -> torch.Tensor:
    """Per-prediction contrastive accuracy ``(N,)``; NaN where a prediction has no negative.

    ``acc_i = mean_{j in neg(i)} [ ||pred_i - target_j||^2 > ||pred_i - target_i||^2 ]``.

    Args:
        pred / target: ``(N, D)`` predictions and their ground truth (all targets of a batch).
        doc: ``(N,)`` document index of each row. position: ``(N,)`` sentence index in its document (needed for
            ``exclude="neighbours"``).
        exclude: ``document`` (reference code: negatives = targets of other documents) or ``neighbours`` (paper:
            all targets but ``target_i`` and the targets at positions ``±1`` of the same document).
    """
    pred, target = pred.float(), target.float()
    d_neg = torch.cdist(pred, target) ** 2  # (N, N): ||pred_i - target_j||^2
    d_pos = d_neg.diagonal().unsqueeze(1)
    same_doc = doc.unsqueeze(0) == doc.unsqueeze(1)
    if exclude == "document":
        negative = ~same_doc
    elif exclude == "neighbours":
        if position is None:
            raise ValueError("exclude='neighbours' needs the sentence positions")
        near = (position.unsqueeze(0) - position.unsqueeze(1)).abs() <= 1
        negative = ~(same_doc & near)
    else:
        raise ValueError(f"exclude must be 'document' or 'neighbours', got {exclude!r}")
    wins = ((d_neg > d_pos) & negative).sum(1).double()
    n = negative.sum(1).double()
    return torch.where(n > 0, wins / n.clamp_min(1), torch.full_like(n, math.nan))


def paraphrasing_score(pred: torch.Tensor, vectors: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """PAR at every target position: ``max_{m<n} cos(pred_n, x_m) / max_{m<n} cos(x_n, x_m)`` -> ``(N,)``.

    Args:
        pred: ``(B, T, D)``; ``pred[b, n]`` is the prediction of ``vectors[b, n]`` (aligned, not shifted).
        vectors: ``(B, T, D)`` ground-truth sentence embeddings.
        target_mask: bool ``(B, T)``, the positions scored (position 0 never is: it has no context); padding
            after a document never enters a maximum because ``m < n`` only reaches the sentences before a target.
            Values come in row-major order of the mask.

    Returns NaN where the reference's own maximum similarity is ``<= 0`` (the ratio is undefined).
    """
    x = F.normalize(vectors.float(), dim=-1)
    p = F.normalize(pred.float(), dim=-1)
    t = x.shape[1]
    before = torch.ones(t, t, dtype=torch.bool, device=x.device).tril(-1)  # [n, m] = m < n
    neg = torch.finfo(torch.float32).min
    pred_sim = (p @ x.transpose(1, 2)).masked_fill(~before, neg).amax(-1)  # (B, T)
    ref_sim = (x @ x.transpose(1, 2)).masked_fill(~before, neg).amax(-1)
    ratio = pred_sim / ref_sim
    ratio = torch.where(ref_sim > 0, ratio, torch.full_like(ratio, math.nan))
    mask = target_mask.clone()
    mask[:, 0] = False
    return ratio[mask]


# ------------------------------------------------------------------------------------------------ coherence (MI)
def mutual_information(generated: Sequence[str], contexts: Sequence[Sequence[str]],
                       scorer: Callable[[str | None, str], tuple[float, int]], *, k: int = 10) -> tuple[float, int]:
    """Coherence MI of decoded next sentences with their ground-truth contexts (paper §2.4.1).

    ``MI_n = (1/|s_n|) [log p_LM(s_n | s_{n-k}..s_{n-1}) - log p_LM(s_n)]``; the dataset value weights sentences
    by their token count ``|s_n|``, so this returns ``(sum_n [log p(s_n|ctx) - log p(s_n)], sum_n |s_n|)`` and
    ``MI = sum / count``. Positive = the context makes the sentence more likely (coherent).

    Args:
        generated: the decoded predictions ``s_n``.
        contexts: for each, its ground-truth preceding sentences (the last ``k`` are used).
        scorer: ``(prefix or None, text) -> (sum of log-probs of text's tokens, number of text tokens)``.
    """
    if len(generated) != len(contexts):
        raise ValueError(f"{len(generated)} sentences but {len(contexts)} contexts")
    total, tokens = 0.0, 0
    for sentence, ctx in zip(generated, contexts):
        prefix = " ".join(list(ctx)[-k:]) if k > 0 and len(ctx) else None
        cond, n = scorer(prefix, sentence)
        uncond, n2 = scorer(None, sentence)
        if n != n2:
            raise ValueError("the scorer counted the sentence's tokens differently with and without a prefix")
        total += cond - uncond
        tokens += n
    return total, tokens


class CausalLMScorer:
    """``(prefix, text) -> (log p(text | prefix), |text|)`` under a Hugging Face causal LM (reference:
    GPT-2-medium; any local causal LM works offline).

    As in the reference scorer the scored text is ``"\\n" + text + "\\n"`` and the prefix is the context sentences
    joined with spaces. Both sequences start with the tokenizer's BOS (else EOS) token, so the first text token
    is also predicted without a prefix.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, device: str | torch.device | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a sequence with")
        self.start = int(start)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def __call__(self, prefix: str | None, text: str) -> tuple[float, int]:
        target = self._ids("\n" + text + "\n")
        context = [self.start] + (self._ids(prefix) if prefix else [])
        ids = torch.tensor([context + target], device=self.device)
        logits = self.model(input_ids=ids).logits[0, len(context) - 1:-1].float()
        logp = logits.log_softmax(-1).gather(-1, ids[0, len(context):].unsqueeze(-1))
        return float(logp.sum()), len(target)


# ------------------------------------------------------------------------------------------------ text
def rouge_l(prediction: str, reference: str, *, summary_level: bool = False) -> float:
    """ROUGE-L F-measure in [0, 1] (``rouge-score``, no stemming). ``summary_level`` = ROUGE-Lsum over
    newline-separated sentences (split the texts with ``"\\n"`` yourself; no NLTK data is needed)."""
    kind = "rougeLsum" if summary_level else "rougeL"
    return float(_rouge_scorer(kind).score(reference, prediction)[kind].fmeasure)


@functools.lru_cache(maxsize=2)
def _rouge_scorer(kind: str):
    """One scorer per kind (building one logs an absl INFO line each time; it is silenced here)."""
    import logging

    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)
    return rouge_scorer.RougeScorer([kind], use_stemmer=False, split_summaries=False)


_WORD = re.compile(r"\w+")


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """Word ``n``-grams of ``text`` (lower-cased ``\\w+`` words), in order, with repeats."""
    words = _WORD.findall(text.lower())
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def ovl3(output: str, source: str) -> float:
    """OVL-3 (paper): the fraction of the source's distinct word 3-grams that occur in the output (0 when the
    source has none)."""
    src = set(word_ngrams(source, 3))
    return len(src & set(word_ngrams(output, 3))) / len(src) if src else 0.0


def rep4(output: str) -> float:
    """REP-4 (paper, Welleck et al. 2019): the portion of duplicated word 4-grams, ``1 - distinct / total``
    (0 when the output has none)."""
    grams = word_ngrams(output, 4)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def char_ngrams_1_4(text: str) -> list[str]:
    """Every character n-gram of lengths 1..4, in order (what the reference code enumerates on a string)."""
    return [text[i:i + n] for n in range(1, 5) for i in range(len(text) - n + 1)]


def ngram_overlap_char14(output: str, source: str) -> float:
    """The reference code's ``ngram_overlap`` (published as OVL-3): ``|set(out) & set(src)| / max(1, |set(src)|)``
    over character 1-4-grams."""
    src = set(char_ngrams_1_4(source))
    return len(set(char_ngrams_1_4(output)) & src) / max(1, len(src))


def repetition_char14(output: str) -> float:
    """The reference code's ``repetition_4`` (published as REP-4): ``total / max(1, distinct) - 1`` over
    character 1-4-grams (a ratio that can exceed 1)."""
    grams = char_ngrams_1_4(output)
    return len(grams) / max(1, len(set(grams))) - 1.0


def auto_bleu(originals: Sequence[str], reconstructions: Sequence[str]) -> float:
    """AutoBLEU: corpus BLEU (``sacrebleu``, 0-100) of ``decode(encode(w))`` against ``w`` over the segments."""
    import sacrebleu

    if len(originals) != len(reconstructions):
        raise ValueError(f"{len(originals)} originals but {len(reconstructions)} reconstructions")
    return float(sacrebleu.corpus_bleu(list(reconstructions), [list(originals)]).score)


def sentence_bleu(original: str, reconstruction: str) -> float:
    """Sentence BLEU (``sacrebleu`` default exponential smoothing, 0-100) of one reconstruction."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(reconstruction, [original]).score)


# ------------------------------------------------------------------------------------------------ fragility
def perturb_embeddings(x: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor, *,
                       normalize: Vectors = lambda v: v, denormalize: Vectors = lambda v: v) -> torch.Tensor:
    """Eq. 27: ``x_{a,e} = denormalize(sqrt(1 - a) normalize(x) + sqrt(a) e)``; ``x``, ``eps`` ``(N, D)``,
    ``alpha`` ``(N,)`` or a scalar."""
    a = torch.as_tensor(alpha, dtype=torch.float32, device=x.device)
    a = a.unsqueeze(-1) if a.ndim else a
    return denormalize((1 - a).sqrt() * normalize(x.float()) + a.sqrt() * eps)


def cosine_score(encode: Callable[[list[str]], torch.Tensor]) -> Callable[[str, str], float]:
    """A fragility score ``cos(enc(w), enc(w'))`` with an external sentence encoder (paper: mGTE)."""
    def score(original: str, perturbed: str) -> float:
        v = encode([original, perturbed]).float()
        return float(F.cosine_similarity(v[0], v[1], dim=0))
    return score


def fragility(sentences: Sequence[str], *, encode: Callable[[list[str]], torch.Tensor],
              decode: Callable[[torch.Tensor], list[str]], score: Callable[[str, str], float] = sentence_bleu,
              normalize: Vectors = lambda v: v, denormalize: Vectors = lambda v: v, n_samples: int = 1,
              alphas: Sequence[float] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 26: ``fragility(w) = -E_{a~U[0,1], e~N(0,I)} score(w, decode(x_{a,e}))`` per sentence -> ``(N,)``.

    A Monte-Carlo estimate with ``n_samples`` draws per sentence; with ``alphas`` (e.g. the paper's grid 0.1..0.9)
    every alpha is used ``n_samples`` times instead of drawing it. ``score`` defaults to sentence BLEU
    (auto-encoding BLEU); :func:`cosine_score` gives the external-encoder cosine variant.
    """
    x = encode(list(sentences)).float()
    n, d = x.shape
    grid = list(alphas) if alphas is not None else [None]
    totals = torch.zeros(n, dtype=torch.float64)
    draws = 0
    for a in grid:
        for _ in range(n_samples):
            alpha = (torch.rand(n, generator=generator) if a is None else torch.full((n,), float(a)))
            eps = torch.randn(n, d, generator=generator)
            noisy = perturb_embeddings(x, alpha.to(x.device), eps.to(x.device), normalize=normalize,
                                       denormalize=denormalize)
            texts = decode(noisy)
            totals += torch.tensor([score(w, w2) for w, w2 in zip(sentences, texts)], dtype=torch.float64)
            draws += 1
    return -(totals / draws)
