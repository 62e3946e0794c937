"""What the LCM variants share: concept sequences as training data, the normalized model base, scored positions
and the teacher-forced metrics.

Data. Any dataset whose items are documents ``{"id": ..., "vectors": FloatTensor (n, D), ...}`` works.
:class:`DocumentChunks` cuts every document into consecutive chunks of at most ``max_sentences`` sentences (the
reference's ``len_to_wrap_long_seq``: no packing of several documents into one row); a chunk shorter than
``min_length`` (default 2: one context sentence and one target) is dropped and the number dropped is reported.
Optional ``suffix`` vectors (e.g. the embedding of "End of text.") are appended to each document *before* cutting,
as in the reference, so only a document's last chunk ends with them. :func:`collate_documents` right-pads a list
of chunks into ``vectors (B, T, D)`` with ``mask (B, T)`` (and ``sentences``, the texts, when the documents have
them).

Batches hold a fixed number of chunks per micro-batch (the shared loop's length-bucketed plan) instead of the
reference's "at most ``max_tokens`` sentence slots"; the loss is normalised by the number of targets either way.

Instruction data: a document item with ``loss_from`` (the index of its answer's first sentence, after the
"[MODEL]:" marker) is trained on its answer only: chunks carry it over (relative to their start) and the batch gets
``loss_mask (B, T)`` = real positions ``>= loss_from`` (documents without one: every position). Every variant
restricts its loss and its scored positions to it (:func:`scored_positions`).

Models. :class:`NormalizedModel` holds the normalizer as frozen buffers (every variant is one);
:class:`CausalSentenceModel` adds the reference's causal sentence tower (the Base-LCM's decoder, the Two-Tower's
contextualizer).

Evaluation. Every variant reports :data:`TEACHER_FORCED_METRICS` (:func:`teacher_forced_metrics`, the paper's
Table 3 metrics of teacher-forced predictions); :class:`TeacherForcedEval` is the ``eval_metrics`` of a unit that
predicts every position from its true context with ``teacher_forced(batch)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from conceptlm.core.modules import Decoder, KVCache
from conceptlm.lcm import metrics as M
from conceptlm.lcm.config import LCMSection

__all__ = ["DocumentChunks", "collate_documents", "target_mask", "scored_positions", "teacher_forced_metrics",
           "TEACHER_FORCED_METRICS", "TeacherForcedEval", "NormalizedModel", "CausalSentenceModel",
           "LEARNED_POSITION_STD"]

TEACHER_FORCED_METRICS = ("l2", "l2_prev", "l2_r", "cos", "ca", "par")
"""The eval metrics every LCM variant reports (:func:`teacher_forced_metrics`)."""

log = logging.getLogger(__name__)


class DocumentChunks:
    """A view of a document dataset as chunks of at most ``max_sentences`` sentences.

    Args:
        documents: dataset of ``{"id", "vectors": (n, D)}`` items (``__len__``/``__getitem__``).
        max_sentences: chunk length (documents longer than this are cut into consecutive chunks).
        min_length: chunks with fewer sentences are dropped (counted in ``self.dropped``).
        suffix: ``(k, D)`` vectors appended to every document before cutting (e.g. the end-of-text embedding).

    Items are ``{"id": chunk index, "doc": document index, "start": first sentence, "vectors": (m, D)}``;
    ``lengths`` lists the chunk lengths (for the batch plan's bucketing).
    """

    def __init__(self, documents, *, max_sentences: int, min_length: int = 2,
                 suffix: torch.Tensor | None = None):
        if max_sentences < 1 or min_length < 1:
            raise ValueError("max_sentences and min_length must be >= 1")
        self.documents, self.max_sentences, self.suffix = documents, max_sentences, suffix
        doc_lengths = getattr(documents, "lengths", None)
        if doc_lengths is None:
            doc_lengths = [len(documents[i]["vectors"]) for i in range(len(documents))]
        extra = 0 if suffix is None else len(suffix)
        # the index is three numpy arrays (document, start, length), not a Python tuple per chunk, so it costs
        # 16 bytes per chunk however many documents there are
        n = np.asarray(doc_lengths, dtype=np.int64).reshape(-1) + extra
        per_doc = -(-n // max_sentences)  # chunks of each document (ceil)
        doc = np.repeat(np.arange(len(n), dtype=np.int64), per_doc)
        first = np.cumsum(per_doc) - per_doc
        start = (np.arange(len(doc), dtype=np.int64) - np.repeat(first, per_doc)) * max_sentences
        length = np.minimum(max_sentences, n[doc] - start)
        keep = length >= min_length
        self.dropped = int((~keep).sum())
        self._doc, self._start = doc[keep], start[keep].astype(np.int32)
        if self.dropped:
            log.info("%d chunk(s) shorter than %d sentences dropped (of %d documents)", self.dropped, min_length,
                     len(n))
        self.lengths: list[int] = length[keep].tolist()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        d, start, m = int(self._doc[i]), int(self._start[i]), self.lengths[i]
        doc = self.documents[d]
        vectors = torch.as_tensor(doc["vectors"]).float()
        if self.suffix is not None:
            vectors = torch.cat([vectors, self.suffix.to(vectors)], dim=0)
        item = {"id": i, "doc": d, "start": start, "vectors": vectors[start:start + m]}
        if "sentences" in doc and self.suffix is None:  # the texts (a likelihood-trained LCM scores their tokens)
            item["sentences"] = list(doc["sentences"][start:start + m])
        if "loss_from" in doc:
            item["loss_from"] = max(0, int(doc["loss_from"]) - start)
        return item


def collate_documents(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad documents: ``{"ids": (B,), "vectors": (B, T, D) (zeros after a document), "mask": (B, T) bool,
    "lengths": (B,)}``, plus ``loss_mask`` (B, T) when an item has ``loss_from`` (instruction data) and
    ``sentences`` (B lists of texts) when every item has its sentences."""
    if not items:
        raise ValueError("empty batch")
    vecs = [torch.as_tensor(it["vectors"]).float() for it in items]
    lengths = torch.tensor([len(v) for v in vecs])
    b, t, dim = len(vecs), int(lengths.max()), vecs[0].shape[-1]
    out = torch.zeros(b, t, dim)
    for i, v in enumerate(vecs):
        if v.ndim != 2 or v.shape[-1] != dim:
            raise ValueError(f"document {items[i].get('id')}: vectors of shape {tuple(v.shape)}, expected (n, {dim})")
        out[i, :len(v)] = v
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    batch = {"ids": torch.tensor([int(it["id"]) for it in items]), "vectors": out, "mask": mask, "lengths": lengths}
    if all("sentences" in it for it in items):
        batch["sentences"] = [list(it["sentences"]) for it in items]
    if any("loss_from" in it for it in items):
        start = torch.tensor([int(it.get("loss_from", 0)) for it in items])
        batch["loss_mask"] = mask & (torch.arange(t).unsqueeze(0) >= start.unsqueeze(1))
    return batch


def target_mask(mask: torch.Tensor, min_context: int) -> torch.Tensor:
    """Bool ``(B, T)``: real positions ``t >= max(1, min_context)`` (the sentences that are predicted)."""
    out = mask.clone()
    out[:, :max(1, min_context)] = False
    return out


def scored_positions(batch: dict, min_context: int) -> torch.Tensor:
    """Bool ``(B, T)``: the positions teacher-forced metrics score -- :func:`target_mask`, restricted to the
    answer (``loss_mask``) for instruction data."""
    tm = target_mask(batch["mask"], min_context)
    return tm & batch["loss_mask"] if "loss_mask" in batch else tm


def teacher_forced_metrics(pred: torch.Tensor, x: torch.Tensor, tm: torch.Tensor,
                           round_trip: M.Vectors | None = None) -> dict[str, tuple[Any, Any]]:
    """The Table 3 metrics of teacher-forced predictions as ``(sum, count)`` pairs (the shared loop's format).

    Args:
        pred: raw predictions ``(B, T, D)`` aligned with their targets (``pred[:, t]`` predicts ``x[:, t]``).
        x: raw targets ``(B, T, D)``.
        tm: bool ``(B, T)``, the positions scored (:func:`target_mask`; never position 0).
        round_trip: ``encode(decode(v))`` for ``l2_r`` (omitted without it).

    Returns ``l2``, ``l2_prev`` (the repeat-the-previous-sentence baseline), ``cos``, ``ca`` (negatives: the other
    documents of the batch), ``par`` and, with ``round_trip``, ``l2_r``.
    """
    x, pred = x.float(), pred.float()
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    doc = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(tm)[tm]
    out = {"l2": M.as_sum_count(M.l2_distance(pred[tm], x[tm])),
           "l2_prev": M.as_sum_count(M.l2_distance(prev[tm], x[tm])),
           "cos": M.as_sum_count(torch.nn.functional.cosine_similarity(pred[tm], x[tm], dim=-1)),
           "ca": M.as_sum_count(M.contrastive_accuracy(pred[tm], x[tm], doc)),
           "par": M.as_sum_count(M.paraphrasing_score(pred, x, tm))}
    if round_trip is not None:
        out["l2_r"] = M.as_sum_count(M.round_trip_l2(pred[tm], x[tm], round_trip))
    return out


class TeacherForcedEval:
    """``eval_metrics`` of a unit that has ``teacher_forced(batch)`` (normalized predictions aligned with their
    targets), ``model.denormalize``, ``cfg.min_context`` and ``round_trip``: :func:`teacher_forced_metrics` at
    :func:`scored_positions`, of predictions the unit computes from the batch itself. Mixed into every LCM unit
    (before :class:`~conceptlm.core.unit.TrainUnit`)."""

    metric_names = TEACHER_FORCED_METRICS
    throughput_unit = "sentences"

    @torch.no_grad()
    def predictions(self, batch: dict) -> torch.Tensor:
        """Raw teacher-forced predictions ``(B, T, D)`` (float32), ``[:, t]`` predicting sentence ``t``."""
        return self.model.denormalize(self.teacher_forced(batch)).float()

    @torch.no_grad()
    def eval_metrics(self, batch: dict) -> dict[str, tuple[Any, Any]]:
        return teacher_forced_metrics(self.predictions(batch), batch["vectors"],
                                      scored_positions(batch, self.cfg.min_context), self.round_trip)


LEARNED_POSITION_STD = 0.006
"""Init std of learned positions in the reference frontend (the SONAR per-dimension std)."""


class NormalizedModel(nn.Module):
    """Base of every LCM variant: the normalizer as frozen buffers ``center``/``scale``/``clip_min``/``clip_max``
    ``(D,)`` (checkpointed with the weights) and ``cfg`` (:class:`LCMSection`)."""

    def __init__(self, cfg: LCMSection) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("clip_min", torch.full((dim,), -math.inf))
        self.register_buffer("clip_max", torch.full((dim,), math.inf))

    # ----------------------------------------------------------------------------------------- normalizer
    @torch.no_grad()
    def set_normalizer(self, center: torch.Tensor, scale: torch.Tensor, clip_min: torch.Tensor | None = None,
                       clip_max: torch.Tensor | None = None) -> None:
        """Copy normalizer statistics ``(D,)`` into the buffers (clip bounds: none = unbounded)."""
        dim = self.cfg.dim
        for name, v in (("center", center), ("scale", scale), ("clip_min", clip_min), ("clip_max", clip_max)):
            if v is None:
                continue
            v = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
            if v.numel() != dim:
                raise ValueError(f"normalizer {name} has {v.numel()} values, the model's dim is {dim}")
            getattr(self, name).copy_(v)
        if not bool((self.scale > 0).all()):
            raise ValueError("normalizer scale must be > 0 in every dimension")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw ``(..., D)`` -> normalized ``(..., D)``."""
        z = (x - self.center) / self.scale
        return torch.maximum(torch.minimum(z, self.clip_max), self.clip_min)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized ``(..., D)`` -> raw ``(..., D)`` (clamped to the clip bounds first)."""
        z = torch.maximum(torch.minimum(z, self.clip_max), self.clip_min)
        return z * self.scale + self.center


class CausalSentenceModel(NormalizedModel):
    """A normalized model with the reference's causal sentence tower: PreNet (``D -> d``, optionally scaled by
    ``sqrt(d)``, plus learned positions) and a causal :class:`~conceptlm.core.modules.Decoder` with a final norm.
    The Base-LCM's decoder and the Two-Tower's contextualizer."""

    def _build_causal_tower(self, name: str) -> None:
        """Create ``prenet``, ``position`` and the decoder as attribute ``name``. Reference init: attention output
        projections xavier-uniform with zero bias (the PreNet keeps the ``nn.Linear`` init; the other decoder
        weights keep the shared blocks' init)."""
        cfg = self.cfg
        self.prenet = nn.Linear(cfg.dim, cfg.d_model)
        self.position = None
        if cfg.positions == "learned":
            self.position = nn.Embedding(cfg.max_sentences, cfg.d_model)
            nn.init.normal_(self.position.weight, std=LEARNED_POSITION_STD)
        tower = Decoder(cfg.decoder_config())
        for layer in tower.layers:
            nn.init.xavier_uniform_(layer.attn.o_proj.weight)
            nn.init.zeros_(layer.attn.o_proj.bias)
        setattr(self, name, tower)
        self._tower = name

    def _run_causal_tower(self, z: torch.Tensor, *, positions: torch.Tensor | None = None,
                          key_padding_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Normalized ``z`` ``(B, T, D)`` -> tower outputs ``(B, T, d)`` (positions default to ``past + arange(T)``,
        ``past`` = the cache length)."""
        b, t, _ = z.shape
        if positions is None:
            past = cache.length() if cache is not None else 0
            positions = torch.arange(past, past + t, device=z.device).unsqueeze(0).expand(b, t)
        if self.position is not None and int(positions.max()) >= self.cfg.max_sentences:
            raise ValueError(f"sentence position {int(positions.max())} >= lcm.max_sentences="
                             f"{self.cfg.max_sentences} (the learned position table)")
        h = self.prenet(z)
        if self.cfg.scale_embeddings:
            h = h * math.sqrt(self.cfg.d_model)
        if self.position is not None:
            h = h + self.position(positions)
        return getattr(self, self._tower)(h, positions=positions, key_padding_mask=key_padding_mask, cache=cache)
