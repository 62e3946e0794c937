"""The Base-LCM training unit on the shared loop, and its data: documents cut into chunks, padded batches.

Data. Any dataset whose items are documents ``{"id": ..., "vectors": FloatTensor (n, D), ...}`` works.
:class:`DocumentChunks` cuts every document into consecutive chunks of at most ``max_sentences`` sentences (the
reference's ``len_to_wrap_long_seq``: no packing of several documents into one row); a chunk shorter than
``min_length`` (default 2: one context sentence and one target) is dropped and the number dropped is reported.
Optional ``suffix`` vectors (e.g. the embedding of "End of text.") are appended to each document *before* cutting,
as in the reference, so only a document's last chunk ends with them. :func:`collate_documents` right-pads a list
of chunks into ``vectors (B, T, D)`` with ``mask (B, T)``.

Batches hold a fixed number of chunks per micro-batch (the shared loop's length-bucketed plan) instead of the
reference's "at most ``max_tokens`` sentence slots"; the loss is normalised by the number of targets either way.

Instruction data: a document item with ``loss_from`` (the index of its answer's first sentence, after the
"[MODEL]:" marker) is trained on its answer only: chunks carry it over (relative to their start) and the batch gets
``loss_mask (B, T)`` = real positions ``>= loss_from`` (documents without one: every position). Every variant
restricts its loss and its scored positions to it (:func:`scored_positions`).

Objective (spec §3.2, recipes' ``compute_rmse: false``, ``reduction: sum``): the part ``mse`` is
``sum over targets of ||y_{t-1} - z_t||^2`` in normalized space, a target being every real position
``t >= max(1, min_context)``; its count is the number of targets, so the trainer optimises the mean squared error
per predicted sentence over the global batch (the reference's gradient normalisation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from conceptlm.core.unit import THROUGHPUT_KEY, TrainUnit
from conceptlm.lcm import metrics as M
from conceptlm.lcm.config import LCMSection
from conceptlm.lcm.model import BaseLCM

__all__ = ["DocumentChunks", "collate_documents", "BaseLCMUnit", "TeacherForcedEval", "target_mask",
           "scored_positions",
           "teacher_forced_metrics",
           "TEACHER_FORCED_METRICS"]

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
        self.index: list[tuple[int, int, int]] = []  # (document, start, length)
        self.dropped = 0
        for d, n in enumerate(doc_lengths):
            n = int(n) + extra
            for start in range(0, n, max_sentences):
                m = min(max_sentences, n - start)
                if m >= min_length:
                    self.index.append((d, start, m))
                else:
                    self.dropped += 1
        if self.dropped:
            log.info("%d chunk(s) shorter than %d sentences dropped (of %d documents)", self.dropped, min_length,
                     len(doc_lengths))
        self.lengths = [m for _, _, m in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        d, start, m = self.index[i]
        doc = self.documents[d]
        vectors = torch.as_tensor(doc["vectors"]).float()
        if self.suffix is not None:
            vectors = torch.cat([vectors, self.suffix.to(vectors)], dim=0)
        item = {"id": i, "doc": d, "start": start, "vectors": vectors[start:start + m]}
        if "loss_from" in doc:
            item["loss_from"] = max(0, int(doc["loss_from"]) - start)
        return item


def collate_documents(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad documents: ``{"ids": (B,), "vectors": (B, T, D) (zeros after a document), "mask": (B, T) bool,
    "lengths": (B,)}``, plus ``loss_mask`` (B, T) when an item has ``loss_from`` (instruction data)."""
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
    :func:`scored_positions`. Mixed into the diffusion and Quant-LCM units (before :class:`TrainUnit`)."""

    metric_names = TEACHER_FORCED_METRICS
    throughput_unit = "sentences"

    @torch.no_grad()
    def eval_metrics(self, batch: dict) -> dict[str, tuple[Any, Any]]:
        pred = self.model.denormalize(self.teacher_forced(batch)).float()
        return teacher_forced_metrics(pred, batch["vectors"], scored_positions(batch, self.cfg.min_context),
                                      self.round_trip)

    def sampler_noise(self, purpose: str, ids: torch.Tensor, n_sentences: int, n_steps: int, eta: float,
                      device: torch.device) -> torch.Tensor:
        """The fixed standard-normal noise of a teacher-forced diffusion sampler run: ``(B, 1, N, D)`` (the initial
        latent), or ``(B, S + 1, N, D)`` with ``eta > 0`` (plus each of the S steps' noise). Drawn per example at
        ``cfg.max_sentences`` rows and sliced to ``n_sentences``, from the eval step of the run's seed, so a
        document's noise depends neither on the other documents of its batch (eval batch size, ranks) nor on the
        batch's padded length, and is the same at every evaluation."""
        from conceptlm.core.rng import EVAL_STEP, StepRandomness

        rng = StepRandomness(seed=self.step_rng.seed if self.step_rng is not None else 0, step=EVAL_STEP)
        draws = n_steps + 1 if eta > 0 else 1
        return rng.per_example(purpose, ids, (draws, self.cfg.max_sentences, self.cfg.dim),
                               device=device)[:, :, :n_sentences]


class BaseLCMUnit(TrainUnit):
    """Base-LCM (MSE next-sentence regression) as a :class:`~conceptlm.core.unit.TrainUnit`.

    Loss part ``mse`` (module docstring). Evaluation metrics, teacher-forced, in raw embedding space:
    ``l2`` (ℓ2 of the prediction), ``l2_prev`` (ℓ2 of the "repeat the previous sentence" baseline), ``cos``
    (cosine to the target), ``ca`` (contrastive accuracy against the other documents of the eval batch, as the
    reference code), ``par`` (paraphrasing score) and, given a ``round_trip``, ``l2_r`` (round-trip ℓ2).

    Args:
        cfg: the architecture.
        round_trip: optional ``(N, D) -> (N, D)`` = ``encode(decode(v))`` (a frozen decoder and encoder, not part
            of the unit's weights), for ``l2_r``.
    """

    metric_names = TEACHER_FORCED_METRICS
    throughput_unit = "sentences"

    def __init__(self, cfg: LCMSection, *, round_trip: M.Vectors | None = None):
        super().__init__()
        self.cfg = cfg
        self.loss_weights = {"mse": 1.0}
        self.model = BaseLCM(cfg)
        self.round_trip = round_trip

    def counts(self, batch: dict) -> dict:
        return {"mse": scored_positions(batch, self.cfg.min_context).sum(), THROUGHPUT_KEY: batch["mask"].sum()}

    def _predict(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized inputs ``z`` and predictions ``y`` aligned with their targets: ``y[:, t]`` predicts
        ``z[:, t]`` (``y[:, 0]`` is a zero placeholder)."""
        z = self.model.normalize(batch["vectors"])
        y = self.model.forward_normalized(z)  # right padding: no key-padding mask needed
        return z, torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], dim=1)

    def forward(self, batch: dict) -> dict:
        z, y = self._predict(batch)
        tm = scored_positions(batch, self.cfg.min_context)
        se = ((y.float() - z.float()) ** 2).sum(-1)
        if not self.training:
            batch["_pred_normalized"] = y.detach()  # reused by eval_metrics (no second forward pass)
        return {"mse": se[tm].sum()}

    @torch.no_grad()
    def teacher_forced(self, batch: dict) -> torch.Tensor:
        """Normalized predictions ``(B, T, D)``, ``[:, t]`` predicting sentence ``t`` from the true sentences before
        it (``[:, 0]`` is a placeholder; it is never scored)."""
        return self._predict(batch)[1]

    @torch.no_grad()
    def eval_metrics(self, batch: dict) -> dict[str, tuple[Any, Any]]:
        y = batch.pop("_pred_normalized", None)
        if y is None:
            y = self._predict(batch)[1]
        pred = self.model.denormalize(y).float()
        return teacher_forced_metrics(pred, batch["vectors"], scored_positions(batch, self.cfg.min_context),
                                      self.round_trip)

    def sampler_noise(self, purpose: str, ids: torch.Tensor, n_sentences: int, n_steps: int, eta: float,
                      device: torch.device) -> torch.Tensor:
        """The fixed standard-normal noise of a teacher-forced diffusion sampler run: ``(B, 1, N, D)`` (the initial
        latent), or ``(B, S + 1, N, D)`` with ``eta > 0`` (plus each of the S steps' noise). Drawn per example at
        ``cfg.max_sentences`` rows and sliced to ``n_sentences``, from the eval step of the run's seed, so a
        document's noise depends neither on the other documents of its batch (eval batch size, ranks) nor on the
        batch's padded length, and is the same at every evaluation."""
        from conceptlm.core.rng import EVAL_STEP, StepRandomness

        rng = StepRandomness(seed=self.step_rng.seed if self.step_rng is not None else 0, step=EVAL_STEP)
        draws = n_steps + 1 if eta > 0 else 1
        return rng.per_example(purpose, ids, (draws, self.cfg.max_sentences, self.cfg.dim),
                               device=device)[:, :, :n_sentences]
