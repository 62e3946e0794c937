"""The CoCoMix config: one file describes the whole pipeline, teacher -> SAE -> labels -> students -> report.

Sections:

* ``corpus`` (:class:`~conceptlm.cocomix.corpus.CorpusSection`): documents and token windows;
* ``teacher`` (:class:`~conceptlm.cocomix.teacher.TeacherSection`): the frozen teacher (a path, or a tiny one
  trained here) and the block whose output the SAE reads;
* ``sae`` (:class:`~conceptlm.cocomix.sae_train.SAESection`): the TopK SAE, with its own training length;
* ``labels`` (:class:`~conceptlm.cocomix.attribution.LabelSection`): how concept labels are chosen and cached;
* ``student`` (:class:`~conceptlm.cocomix.model.StudentSection`) and ``cocomix``
  (:class:`~conceptlm.cocomix.student.CocomixSection`): the student architecture and its objective;
* ``pipeline`` (:class:`PipelineSection`): which arms and seeds the ``pipeline`` verb trains, and what a stage
  does with an output made from other settings (``on_change: refuse | rebuild``);
* ``interpret`` (:class:`~conceptlm.cocomix.interpret.InterpretSection`): the ``concepts`` / ``explain`` /
  ``steer`` verbs;
* ``run`` / ``optim`` / ``schedule`` / ``train`` / ``dist``: the shared loop's sections, used by the students
  (the teacher and the SAE carry their own length and step size).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conceptlm.cocomix.attribution import LabelSection
from conceptlm.cocomix.corpus import CorpusSection
from conceptlm.cocomix.interpret import InterpretSection
from conceptlm.cocomix.model import StudentSection
from conceptlm.cocomix.sae_train import SAESection
from conceptlm.cocomix.student import ARMS, CocomixSection
from conceptlm.cocomix.teacher import TeacherSection
from conceptlm.core.config import RunConfig, check

__all__ = ["PipelineSection", "CocomixConfig"]


@dataclass(kw_only=True)
class PipelineSection:
    arms: list[str] = field(default_factory=lambda: ["ntp", "cocomix"])
    """Students to train, by name: ``cocomix``, ``ntp`` (matched active parameters), ``ntp_flops`` (matched
    training FLOPs), ``kd``, ``pause``, ``kd_pause``, ``mix_only`` (lam = 0), ``concept_only`` (no mixing),
    ``add`` (added instead of interleaved), ``cocomix_pos`` / ``pause_pos`` (the interleaved slot also gets the
    token's position embedding)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One student per arm and seed (``train.seed`` of that run)."""
    labels: str = "cached"
    """``cached``: students read the label cache (the teacher is not run while they train); ``online``: the
    teacher and SAE label every batch during training (same labels, for cost comparisons)."""
    on_change: str = "refuse"
    """What a stage does when its output folder holds one made from other settings or inputs (its
    ``artifact.json`` fingerprint differs from what it would make now): ``refuse`` stops with one line naming the
    change, before anything is written; ``rebuild`` removes and rebuilds it, and with it every stage downstream
    whose inputs change (each logged). Outputs of the same fingerprint are always reused."""

    def validate(self) -> None:
        check(bool(self.arms), "pipeline.arms", "name at least one arm")
        unknown = [a for a in self.arms if a not in ARMS]
        check(not unknown, "pipeline.arms", f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
        check(len(set(self.arms)) == len(self.arms), "pipeline.arms", "an arm is listed twice")
        check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "pipeline.seeds",
              "give at least one seed, each once")
        check(self.labels in ("cached", "online"), "pipeline.labels", "must be 'cached' or 'online'")
        check(self.on_change in ("refuse", "rebuild"), "pipeline.on_change", "must be 'refuse' or 'rebuild'")


@dataclass(kw_only=True)
class CocomixConfig(RunConfig):
    corpus: CorpusSection = field(default_factory=CorpusSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    sae: SAESection = field(default_factory=SAESection)
    labels: LabelSection = field(default_factory=LabelSection)
    student: StudentSection = field(default_factory=StudentSection)
    cocomix: CocomixSection = field(default_factory=CocomixSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    interpret: InterpretSection = field(default_factory=InterpretSection)

    def validate(self) -> None:
        super().validate()
        check(self.student.n_concepts == self.sae.n_latents, "student.n_concepts",
              f"{self.student.n_concepts} must equal sae.n_latents={self.sae.n_latents} (labels are SAE latents)")
        check(self.cocomix.k_attr == self.labels.k_attr, "cocomix.k_attr",
              f"{self.cocomix.k_attr} must equal labels.k_attr={self.labels.k_attr}")
        check(self.student.max_len >= self.corpus.window, "student.max_len",
              f"{self.student.max_len} is shorter than corpus.window={self.corpus.window}")
        check(self.cocomix.lam == 0 or self.student.concept_head, "cocomix.lam",
              f"{self.cocomix.lam} trains a concept head: set student.concept_head=true or cocomix.lam=0")
