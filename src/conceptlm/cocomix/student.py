"""Training a CoCoMix student and its baselines with the shared loop (paper §2.2, Eq. 4; the baselines of §3 and
App. A).

``L = L_NTP + lam * L_concept (+ kd_weight * L_KD)``; every arm of the comparison is the same unit with another
``student`` / ``cocomix`` section (:func:`conceptlm.cocomix.arms.make_arm`): CoCoMix, NTP with matched active
parameters or matched FLOPs, knowledge distillation, pause tokens, KD + pause, mixing only (lam = 0), concept loss
only (no mixing) and ``add``.

Batches are ``{"ids": (B,), "input_ids": (B, T)}`` plus, for the concept loss, ``"concept_labels"`` ``(B, T, A)``
(SAE latent indices) and ``"concept_mask"`` ``(B, T)`` (True = the labels count). Labels may instead be computed on
the device by a frozen ``labeler`` module (``labeler(input_ids) -> (labels, mask)``) in :meth:`StudentUnit.prepare`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from conceptlm.cocomix.config import CocomixSection, StudentSection, StudentTrainConfig
from conceptlm.cocomix.corpus import collate_windows
from conceptlm.cocomix.model import StudentLM
from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core.errors import ConfigError, DataError
from conceptlm.core.recipe import fit, make_plan
from conceptlm.core.run import run_session
from conceptlm.core.unit import THROUGHPUT_KEY, TrainUnit

__all__ = ["StudentUnit", "train_student", "load_student"]


# ------------------------------------------------------------------------------------------------ the unit
def _logits_of(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


class StudentUnit(TrainUnit):
    """A :class:`StudentLM` trained with ``ntp`` (+ ``concept``, weight lam) (+ ``kd``, weight kd_weight).

    Loss parts (sums; counts in brackets): ``ntp`` -- next-token CE [``B(T-1)`` predicted tokens]; ``concept`` --
    ``(1/A) sum_a CE(z_t, label_a)`` over valid rows [rows with ``concept_mask``]; ``kd`` --
    ``τ² KL(p_teacher(·|x_≤t) || p_student(·|x_≤t))`` [``B(T-1)``]. Metrics: ``concept_acc`` (arg-max concept is a
    label, over valid rows) and, when lam = 0, ``concept_ce``.

    Args:
        teacher: frozen module ``teacher(input_ids) -> logits (B, T, V)`` (or an output with ``.logits``), required
            when ``kd_weight > 0``; its log-probabilities are computed in :meth:`prepare`.
        labeler: frozen module ``labeler(input_ids) -> (labels (B, T, A) long, mask (B, T) bool)`` used when a
            batch carries no ``concept_labels``.
    """

    throughput_unit = "tokens"

    def __init__(self, student: StudentSection, cocomix: CocomixSection, *, teacher: nn.Module | None = None,
                 labeler: nn.Module | None = None) -> None:
        super().__init__()
        self.student_cfg, self.cocomix_cfg = student, cocomix
        self.model = StudentLM(student)
        self.loss_weights = {"ntp": 1.0}
        has_head = student.concept_head
        if has_head and cocomix.lam > 0:
            self.loss_weights["concept"] = cocomix.lam
        self.metric_names = (("concept_acc",) + (("concept_ce",) if cocomix.lam == 0 else ())) if has_head else ()
        if cocomix.kd_weight > 0:
            if teacher is None:
                raise ConfigError(f"{cocomix.kd_weight} needs a teacher model", field="cocomix.kd_weight")
            self.loss_weights["kd"] = cocomix.kd_weight
        self.teacher = self._frozen(teacher) if cocomix.kd_weight > 0 else None
        self.labeler = self._frozen(labeler) if (labeler is not None and has_head) else None

    @staticmethod
    def _frozen(module: nn.Module | None) -> nn.Module | None:
        if module is not None:
            module.requires_grad_(False)
            module.eval()
        return module

    def train(self, mode: bool = True) -> StudentUnit:
        super().train(mode)
        for m in (self.teacher, self.labeler):
            if m is not None:
                m.eval()
        return self

    def frozen_modules(self) -> list[str]:
        return [n for n in ("teacher", "labeler") if getattr(self, n) is not None]

    # ------------------------------------------------------------------------------------------- batches
    def prepare(self, batch: dict) -> dict:
        ids = batch["input_ids"]
        if self.student_cfg.concept_head:
            if batch.get("concept_labels") is None and self.labeler is not None:
                batch["concept_labels"], batch["concept_mask"] = self.labeler(ids)
            self._check_labels(batch)
        if self.teacher is not None:
            logits = _logits_of(self.teacher(ids)).float()
            if logits.shape != (*ids.shape, self.student_cfg.vocab_size):
                raise DataError(f"teacher logits have shape {tuple(logits.shape)}, expected "
                                f"{(*ids.shape, self.student_cfg.vocab_size)} (same vocabulary)", field="teacher")
            batch["teacher_logprobs"] = F.log_softmax(logits / self.cocomix_cfg.kd_temperature, dim=-1)
        return batch

    def _check_labels(self, batch: dict) -> None:
        labels = batch.get("concept_labels")
        if labels is None:
            if "concept" in self.loss_weights:
                raise DataError("the batch has no concept labels (cocomix.lam > 0): give concept_labels or a "
                                "labeler", field="concept_labels")
            return
        b, t = batch["input_ids"].shape
        want = (b, t, self.cocomix_cfg.k_attr)
        if tuple(labels.shape) != want:
            raise DataError(f"shape {tuple(labels.shape)}, expected {want} (B, T, cocomix.k_attr)",
                            field="concept_labels")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.student_cfg.n_concepts):
            raise DataError(f"indices must lie in [0, student.n_concepts={self.student_cfg.n_concepts})",
                            field="concept_labels")
        mask = batch.get("concept_mask")
        if mask is None:
            batch["concept_mask"] = torch.ones(b, t, dtype=torch.bool, device=labels.device)
        elif tuple(mask.shape) != (b, t):
            raise DataError(f"shape {tuple(mask.shape)}, expected {(b, t)}", field="concept_mask")

    def counts(self, batch: dict) -> dict:
        b, t = batch["input_ids"].shape
        out: dict[str, Any] = {"ntp": b * (t - 1), THROUGHPUT_KEY: b * t}
        if "concept" in self.loss_weights:
            out["concept"] = batch["concept_mask"].sum()
        if "kd" in self.loss_weights:
            out["kd"] = b * (t - 1)
        return out

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict) -> dict:
        ids = batch["input_ids"]
        labels = batch.get("concept_labels") if self.student_cfg.concept_head else None
        out = self.model(ids, concept_labels=labels, concept_mask=batch.get("concept_mask"),
                         concept_ce_grad="concept" in self.loss_weights)
        logits = out.logits[:, :-1].float()
        res: dict[str, Any] = {"ntp": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                      reduction="sum")}
        if out.concept is not None and labels is not None:
            if "concept" in self.loss_weights:
                res["concept"] = out.concept.ce_sum
            else:
                res["concept_ce"] = (out.concept.ce_sum.detach(), out.concept.rows)
            res["concept_acc"] = (out.concept.correct, out.concept.rows)
        if "kd" in self.loss_weights:
            tau = self.cocomix_cfg.kd_temperature
            log_p = batch["teacher_logprobs"][:, :-1]
            log_q = F.log_softmax(logits / tau, dim=-1)
            res["kd"] = (log_p.exp() * (log_p - log_q)).sum() * tau ** 2
        return res


# ------------------------------------------------------------------------------------------------ recipe
def train_student(cfg: StudentTrainConfig, *, command: str | None = None, train_ds=None, eval_ds=None,
                  teacher: nn.Module | None = None, labeler: nn.Module | None = None, on_eval=None):
    """Train the student of ``cfg`` on ``train_ds`` (items as in :func:`collate_windows`); returns the
    :class:`~conceptlm.core.trainer.TrainResult`. Checkpoints hold the unit's native safetensors."""
    if train_ds is None:
        raise ConfigError("no training windows given (pass train_ds: a dataset of token windows)", field="corpus")
    with run_session(cfg, command) as session:
        unit = StudentUnit(cfg.student, cfg.cocomix, teacher=teacher, labeler=labeler)
        plan = make_plan(cfg, session.info, train_ds)
        session.create_run_dir()
        name = getattr(train_ds, "name", type(train_ds).__name__)
        return fit(cfg, session.info, unit, train_ds=train_ds, eval_ds=eval_ds, collate_fn=collate_windows,
                   source_name=f"cocomix-windows:{name}", on_eval=on_eval, plan=plan)


def load_student(cfg: StudentTrainConfig, checkpoint: str | Path) -> StudentLM:
    """The :class:`StudentLM` of a checkpoint folder of :func:`train_student` (strict load), in eval mode."""
    unit = StudentUnit(cfg.student, dataclasses.replace(cfg.cocomix, kd_weight=0.0))
    ckpt_lib.load_unit_state(unit, Path(checkpoint))
    return unit.model.eval()
