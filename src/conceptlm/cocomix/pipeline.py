"""The CoCoMix pipeline: teacher -> SAE -> labels -> students -> report, each stage reused only when what it would
make now is what it made before.

``conceptlm cocomix pipeline --config configs/cocomix/tiny_cpu.yaml`` runs, in ``{run.out_dir}/{run.name}``:

1. ``teacher/``: a tiny teacher trained on the corpus (``teacher.path: null``), with its BPE tokenizer in
   ``teacher/tokenizer/``; else the given teacher is used;
2. ``sae/``: the TopK SAE on block ``teacher.layer``, a run of its own (its ``config.yaml``, ``metrics.jsonl`` and
   checkpoints are there, next to the SAE);
3. ``labels/{train,val}``: the concept-label caches (``pipeline.labels: cached``);
4. ``students/{arm}-s{seed}/``: one student run per arm and seed, all on the same windows, batches, optimizer and
   schedule (the ``train`` / ``optim`` / ``schedule`` sections), evaluated in eval mode at the same cadence;
5. ``report/``: validation loss against tokens and against training FLOPs for every arm (PNG), and
   ``report.md`` / ``report.json`` built from each student's own saved config, metrics and recorded costs
   (:mod:`conceptlm.cocomix.report`).

The run folder's own ``config.yaml`` is the pipeline's config (written when every stage has run); each stage's run
has its own config in its folder.

Every output folder holds an ``artifact.json`` (:mod:`conceptlm.cocomix.identity`): the fingerprint of the
settings that shaped it and of its inputs by content (the teacher's weights, the documents and token ids, the
SAE's weights, the label caches), and the sha256 of its files. A stage reuses its output (and logs so) only when
that fingerprint equals the one it would compute now; an unfinished stage with the same fingerprint continues from
its newest checkpoint (``run.resume=auto`` is implied). Otherwise ``pipeline.on_change: refuse`` (the default)
stops with one line naming what changed, e.g. ``students/ntp-s0: student.d_model 32 -> 48; rerun with
pipeline.on_change=rebuild``, before anything is written, and ``rebuild`` removes and rebuilds exactly the
stages whose fingerprint changed (each logged), i.e. those downstream of the change.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from conceptlm.cocomix.config import CocomixConfig
from conceptlm.cocomix.identity import (
    LABELS_KIND,
    log_to_stderr,
    on_change_of,
    run_stage,
    student_identity,
    tiny_teacher_identity,
    windows_digest,
    world_size,
)
from conceptlm.cocomix.report import STUDENTS_DIR, build_report, student_runs
from conceptlm.core.artifact import Identity, begin, fingerprint_of, write_manifest
from conceptlm.core.config import config_text
from conceptlm.core.errors import ConfigError
from conceptlm.core.io import atomic_write_text

__all__ = ["pipeline", "train", "report", "check_arms"]

log = logging.getLogger(__name__)

def _resumable(cfg: CocomixConfig) -> CocomixConfig:
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume="auto"))


def check_arms(cfg: CocomixConfig) -> None:
    """Resolve every arm of ``pipeline.arms`` (:func:`~conceptlm.cocomix.arms.make_arm`) before any stage runs,
    so an arm that cannot be built is refused before the teacher is trained."""
    from conceptlm.cocomix.arms import make_arm

    for arm in cfg.pipeline.arms:
        make_arm(arm, cfg.student, cfg.cocomix, seq_len=cfg.corpus.window)


def _student_config(cfg: CocomixConfig, arm: str, seed: int, vocab_size: int) -> CocomixConfig:
    from conceptlm.cocomix.arms import make_arm

    base = dataclasses.replace(cfg.student, vocab_size=vocab_size)
    student, cocomix = make_arm(arm, base, cfg.cocomix, seq_len=cfg.corpus.window)
    run = dataclasses.replace(cfg.run, out_dir=str(Path(cfg.run_dir) / STUDENTS_DIR), name=f"{arm}-s{seed}",
                              resume="auto")
    return dataclasses.replace(cfg, student=student, cocomix=cocomix, run=run,
                               train=dataclasses.replace(cfg.train, seed=seed))


def _uses_labels(sub: CocomixConfig) -> bool:
    """The student reads concept labels (its concept head's loss, or its metric when lam = 0)."""
    return bool(sub.student.concept_head)


class _Stages:
    """The pipeline's stages over one config; each loads what it needs lazily, once."""

    def __init__(self, cfg: CocomixConfig, command: str | None):
        self.cfg, self.command = cfg, command
        self.run_dir = Path(cfg.run_dir)
        self.on_change = on_change_of(cfg)
        self._teacher = self._teacher_fp = self._sae = self._sae_fp = self._documents = None
        self._splits = self._digests = None
        self.verify_seconds: float | None = None

    # -------------------------------------------------------------------------------------- inputs
    def documents(self) -> tuple[list[str], list[str]] | None:
        """The ``(train, val)`` documents; None for a token-shard corpus (its windows are read from the shards)."""
        from conceptlm.cocomix.corpus import is_shard_corpus, load_documents, split_documents

        c = self.cfg.corpus
        if self._documents is None and not is_shard_corpus(c):
            self._documents = split_documents(load_documents(c), c.val_fraction, c.seed)
        return self._documents

    def teacher(self):
        """``(teacher model, tokenizer)`` of the run (the tiny one trained by the SAE stage, or ``teacher.path``)."""
        if self._teacher is None:
            from conceptlm.cocomix.labels import resolve_teacher
            from conceptlm.cocomix.teacher import load_teacher

            self._teacher = load_teacher(self.cfg.teacher, path=resolve_teacher(self.cfg))
        return self._teacher

    def teacher_fingerprint(self) -> str:
        if self._teacher_fp is None:
            from conceptlm.cocomix.identity import weights_fingerprint

            self._teacher_fp = weights_fingerprint(self.teacher()[0])
        return self._teacher_fp

    def sae_module(self):
        if self._sae is None:
            from conceptlm.cocomix.labels import resolve_sae_dir
            from conceptlm.cocomix.sae import load_sae

            self._sae = load_sae(resolve_sae_dir(self.cfg))
        return self._sae

    def sae_fingerprint(self) -> str:
        if self._sae_fp is None:
            from conceptlm.cocomix.identity import weights_fingerprint

            self._sae_fp = weights_fingerprint(self.sae_module())
        return self._sae_fp

    def splits(self):
        if self._splits is None:
            from conceptlm.cocomix.corpus import build_corpus

            self._splits = build_corpus(self.cfg.corpus, self.teacher()[1], documents=self.documents())
        return self._splits

    def window_digests(self) -> dict[str, str | None]:
        if self._digests is None:
            s = self.splits()
            self._digests = {"train": windows_digest(s.train.windows),
                             "val": windows_digest(s.val.windows) if s.val is not None else None}
        return self._digests

    def _forget(self) -> None:
        """A stage rewrote the teacher or the SAE: reload them when next needed."""
        self._teacher = self._teacher_fp = self._sae = self._sae_fp = self._splits = self._digests = None

    # -------------------------------------------------------------------------------------- concept space
    def _teacher_reusable(self) -> bool:
        """The tiny teacher can be used as it is (refused here, before anything is written, when it differs and
        ``pipeline.on_change=refuse``); always true for ``teacher.path``."""
        from conceptlm.cocomix.teacher import TINY_TEACHER_DIR

        if self.cfg.teacher.path is not None:
            return True
        identity = tiny_teacher_identity(self.cfg.corpus, self.cfg.teacher, self.documents(), world_size())
        if run_stage(self.run_dir / TINY_TEACHER_DIR, identity, on_change=self.on_change, what=TINY_TEACHER_DIR,
                     remove=False) != "skip":
            return False
        log.info("%s: reused (tiny teacher %s)", TINY_TEACHER_DIR, identity.fingerprint[:12])
        return True

    def sae(self) -> dict[str, Any]:
        from conceptlm.cocomix.identity import sae_identity
        from conceptlm.cocomix.sae_train import SAE_DIR, sae_run_config, train_sae

        out = self.run_dir / SAE_DIR
        if self.cfg.labels.sae_path:  # a given SAE (ours or sparsify / SAELens / OpenAI): nothing to train
            log.info("%s: not trained, labels.sae_path=%s is used", SAE_DIR, self.cfg.labels.sae_path)
            return {"sae": str(self.cfg.labels.sae_path), "skipped": True, "given": True}
        if self._teacher_reusable():
            identity = sae_identity(sae_run_config(self.cfg), self.teacher_fingerprint(),
                                    self.window_digests()["train"], world_size())
            if run_stage(out, identity, on_change=self.on_change, what=SAE_DIR, remove=False) == "skip":
                log.info("%s: reused (SAE %s)", SAE_DIR, identity.fingerprint[:12])
                return {"sae": str(out), "skipped": True}
        self._forget()
        res = train_sae(_resumable(self.cfg), command=self.command)
        return {"sae": str(out), "skipped": False, "eval": res.last_eval}

    def labels(self) -> dict[str, Any]:
        from conceptlm.cocomix.labels import label

        return label(self.cfg)

    def datasets(self):
        """``(train, val)`` datasets for the students: windows with cached labels (the caches' checksums verified,
        their header's teacher and SAE checked against the current ones), or bare windows (online)."""
        from conceptlm.cocomix.labels import label_cache_dir, open_labeled_windows

        splits = self.splits()
        if self.cfg.pipeline.labels == "online":
            return splits.train, splits.val
        cache = label_cache_dir(self.cfg)
        kw = {"k_attr": self.cfg.labels.k_attr, "n_latents": self.cfg.sae.n_latents,
              "teacher": self.teacher_fingerprint(), "sae": self.sae_fingerprint()}
        start = time.perf_counter()
        val = open_labeled_windows(cache / "val", splits.val.windows, **kw) if splits.val is not None else None
        train = open_labeled_windows(cache / "train", splits.train.windows, **kw)
        self.verify_seconds = time.perf_counter() - start
        log.info("label caches in %s: checksums, teacher and SAE verified in %.3f s", cache, self.verify_seconds)
        return train, val

    def labeler(self):
        from conceptlm.cocomix.attribution import ConceptLabeler
        from conceptlm.cocomix.labels import check_sae_settings, resolve_sae_dir

        teacher, _ = self.teacher()
        check_sae_settings(self.cfg, self.sae_module(), resolve_sae_dir(self.cfg))
        return ConceptLabeler(teacher, self.sae_module(), self.cfg.teacher.layer, self.cfg.labels)

    # -------------------------------------------------------------------------------------- students
    def student_identity(self, sub: CocomixConfig) -> Identity:
        """What the student run ``sub`` is made from (:func:`conceptlm.cocomix.identity.student_identity`)."""
        from conceptlm.cocomix.labels import label_cache_dir

        online = self.cfg.pipeline.labels == "online"
        reads = _uses_labels(sub)
        windows = {k: v for k, v in self.window_digests().items() if v is not None}
        labels = None
        if reads and not online:
            cache = label_cache_dir(self.cfg)
            labels = {split: fingerprint_of(cache / split, kind=LABELS_KIND) for split in windows}
        needs_teacher = sub.cocomix.kd_weight > 0 or (online and reads)
        return student_identity(
            sub, windows=windows, labels=labels, teacher=self.teacher_fingerprint() if needs_teacher else None,
            sae=self.sae_fingerprint() if (online and reads) else None,
            online_labels={**self.cfg.labels.describe(), "layer": self.cfg.teacher.layer} if (online and reads)
            else None, n_processes=world_size())

    def costs(self, sub: CocomixConfig) -> dict[str, float]:
        """FLOPs per training token the student owes to its teacher (KD) and to its labels
        (:func:`conceptlm.cocomix.costs.owed_flops_per_token`), recorded in its ``artifact.json`` for the report."""
        from conceptlm.cocomix.costs import owed_flops_per_token

        return owed_flops_per_token(sub.student, sub.cocomix, teacher=self.teacher()[0], layer=self.cfg.teacher.layer,
                                    labels=self.cfg.labels, sae=self.sae_module)

    def run_student(self, sub: CocomixConfig, train_ds, val_ds, *, skip_finished: bool = True) -> dict[str, Any]:
        """One student run with its ``artifact.json`` (identity recorded at the start, files at the end)."""
        from conceptlm.cocomix.student import train_student

        what = f"{STUDENTS_DIR}/{sub.run.name}"
        identity = self.student_identity(sub)
        state = run_stage(sub.run_dir, identity, on_change=self.on_change, what=what, remove=_is_main())
        if state == "skip" and skip_finished:
            log.info("%s: reused (student %s)", what, identity.fingerprint[:12])
            return {"skipped": True, "identity": identity, "state": state, "result": None}
        cost = self.costs(sub)
        if _is_main() and state != "skip":  # (a finished run of the same identity stays marked finished)
            begin(sub.run_dir, identity, extra={"cost": cost})
        log.info("%s: d=%d, %d layers, mix=%s, lam=%g, kd=%g (%s)", what, sub.student.d_model, sub.student.n_layers,
                 sub.student.mix, sub.cocomix.lam, sub.cocomix.kd_weight, state)
        online = self.cfg.pipeline.labels == "online" and sub.student.concept_head
        teacher = self.teacher()[0] if sub.cocomix.kd_weight > 0 else None
        start = time.perf_counter()
        res = train_student(sub, command=self.command, train_ds=train_ds, eval_ds=val_ds, teacher=teacher,
                            labeler=self.labeler() if online else None)
        seconds = time.perf_counter() - start
        if _is_main():
            _finish_student(sub.run_dir, identity, cost, res)
        return {"skipped": False, "identity": identity, "state": state, "eval": res.last_eval,
                "seconds": seconds, "result": res}

    def students(self) -> dict[str, Any]:
        _, tokenizer = self.teacher()
        train_ds, val_ds = self.datasets()
        done: dict[str, Any] = {}
        # seed-major: a pipeline stopped part-way leaves every arm with the same seeds done (a usable report)
        subs = [_student_config(self.cfg, arm, seed, len(tokenizer))
                for seed in self.cfg.pipeline.seeds for arm in self.cfg.pipeline.arms]
        if self.on_change == "refuse":  # refuse a changed student before training any other
            for sub in subs:
                run_stage(sub.run_dir, self.student_identity(sub), on_change="refuse",
                          what=f"{STUDENTS_DIR}/{sub.run.name}", remove=False)
        for sub in subs:
            out = self.run_student(sub, train_ds, val_ds)
            out.pop("result")
            done[sub.run.name] = out
        return done

    def expected_students(self) -> dict[str, Identity]:
        """The identity every student of ``pipeline.arms`` x ``pipeline.seeds`` would have now."""
        _, tokenizer = self.teacher()
        return {f"{arm}-s{seed}": self.student_identity(_student_config(self.cfg, arm, seed, len(tokenizer)))
                for seed in self.cfg.pipeline.seeds for arm in self.cfg.pipeline.arms}


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _finish_student(run_dir: Path, identity: Identity, cost: dict[str, float], res) -> None:
    """Complete a student's manifest: its config, metrics and final checkpoint, with their sha256."""
    files = [n for n in ("config.yaml", "metrics.jsonl") if (run_dir / n).is_file()]
    extra: dict[str, Any] = {"cost": cost}
    if res.checkpoint is not None:
        ckpt = Path(res.checkpoint)
        files += [p.relative_to(run_dir).as_posix() for p in sorted(ckpt.rglob("*")) if p.is_file()]
        extra["checkpoint"] = ckpt.relative_to(run_dir).as_posix()
    write_manifest(run_dir, identity, files=files, extra=extra)


def pipeline(cfg: CocomixConfig, *, output: str | None = None,
             command: str | None = "conceptlm cocomix pipeline") -> dict[str, Any]:
    """Run every stage (reusing those whose output has the fingerprint they would make now) and write the
    report; returns the report's summary. See the module docstring for ``pipeline.on_change``."""
    log_to_stderr()
    check_arms(cfg)
    stages = _Stages(cfg, command)
    summary: dict[str, Any] = {"run_dir": str(cfg.run_dir), "sae": stages.sae()}
    if cfg.pipeline.labels == "cached":
        lab = stages.labels()
        summary["labels"] = {k: lab[k] for k in ("path", "windows", "tokens", "tokens_per_s")}
    students = stages.students()
    summary["students"] = {k: {n: v[n] for n in ("skipped", "eval") if n in v} for k, v in students.items()}
    timed = [v["seconds"] for v in students.values() if "seconds" in v]
    if stages.verify_seconds is not None and timed:
        summary["label_cache_verification"] = {"seconds": stages.verify_seconds, "students_seconds": sum(timed),
                                               "fraction": stages.verify_seconds / sum(timed)}
    if _is_main():
        atomic_write_text(Path(cfg.run_dir) / "config.yaml", config_text(cfg, header=command))
    summary["report"] = build_report(cfg, output=output, expected={k: v["identity"] for k, v in students.items()},
                                     downstream=_downstream(cfg))
    return summary


def _downstream(cfg: CocomixConfig) -> dict[str, Any] | None:
    """lm-eval summaries of every trained student when ``harness.tasks`` names tasks (reusing stored ones)."""
    if not cfg.harness.tasks or not _is_main():
        return None
    from conceptlm.cocomix.harness import evaluate_students

    return {name: r["summary"] for name, r in evaluate_students(cfg).items()}


def train(cfg: CocomixConfig, *, command: str | None = None):
    """``conceptlm cocomix train``: one student exactly as configured (``student`` + ``cocomix``), on the label
    cache of the run (made by ``label``) or with online labels (``pipeline.labels: online``), in
    ``{run_dir}/students/{run.name}``, with its ``artifact.json`` (a run of other settings or inputs there is
    refused, or rebuilt with ``pipeline.on_change=rebuild``)."""
    log_to_stderr()
    stages = _Stages(cfg, command)
    _, tokenizer = stages.teacher()
    train_ds, val_ds = stages.datasets()
    sub = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, vocab_size=len(tokenizer)),
                              run=dataclasses.replace(cfg.run, out_dir=str(Path(cfg.run_dir) / STUDENTS_DIR)))
    return stages.run_student(sub, train_ds, val_ds, skip_finished=False)["result"]


def report(cfg: CocomixConfig, *, output: str | None = None) -> dict[str, Any]:
    """``conceptlm cocomix report``: rebuild the report from the student runs that exist (``--output`` folder),
    each from its own saved config, metrics and recorded costs. A student whose ``artifact.json`` does not match
    what the current config would train is refused (``pipeline.on_change=refuse``) or flagged in the report
    (``rebuild``: the report cannot retrain it; rerun the pipeline for that)."""
    from conceptlm.core.artifact import read_manifest

    log_to_stderr()
    expected = None
    if any(read_manifest(d) is not None for dirs in student_runs(cfg).values() for d in dirs if d.is_dir()):
        expected = _Stages(cfg, None).expected_students()
    summary = build_report(cfg, output=output, expected=expected, downstream=_downstream(cfg))
    if not summary["arms"]:
        raise ConfigError(f"no student of {cfg.run_dir / STUDENTS_DIR} has evaluation metrics yet; run the "
                          "pipeline first", field="pipeline.arms")
    return summary
