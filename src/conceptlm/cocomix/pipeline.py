"""The CoCoMix pipeline: teacher -> SAE -> labels -> students -> report, each stage resumable and skipped when done.

``conceptlm cocomix pipeline --config configs/cocomix/tiny_cpu.yaml`` runs, in ``{run.out_dir}/{run.name}``:

1. ``teacher/``: a tiny teacher trained on the corpus (``teacher.path: null``), else the given teacher is used;
2. ``sae/``: the TopK SAE on block ``teacher.layer`` (the folder's own ``metrics.jsonl`` and checkpoints are the
   SAE run's);
3. ``labels/{train,val}``: the concept-label caches (``pipeline.labels: cached``);
4. ``students/{arm}-s{seed}/``: one student run per arm and seed, all on the same windows, batches, optimizer and
   schedule (the ``train`` / ``optim`` / ``schedule`` sections), evaluated in eval mode at the same cadence;
5. ``report/``: validation loss against tokens and against training FLOPs for every arm (PNG), and
   ``report.md`` / ``report.json`` with the final losses and the tokens (and FLOPs) each arm needs to reach the
   NTP baseline's final validation loss.

A stage whose output exists is skipped; an interrupted stage continues from its newest checkpoint
(``run.resume=auto`` is implied for the stages).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from conceptlm.cocomix.config import CocomixConfig
from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core.errors import ConfigError
from conceptlm.core.io import atomic_write_text

__all__ = ["pipeline", "train", "report", "student_runs", "build_report", "reach_point", "STUDENTS_DIR", "REPORT_DIR"]

log = logging.getLogger(__name__)

STUDENTS_DIR = "students"
REPORT_DIR = "report"
BASELINE_ARM = "ntp"
VAL_KEY = "ntp"
"""The eval column compared across arms: next-token CE per predicted token (the same for every arm)."""


def _resumable(cfg: CocomixConfig) -> CocomixConfig:
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume="auto"))


def student_runs(cfg: CocomixConfig) -> dict[str, list[Path]]:
    """arm -> its run folders, one per seed (``students/{arm}-s{seed}``)."""
    root = Path(cfg.run_dir) / STUDENTS_DIR
    return {arm: [root / f"{arm}-s{seed}" for seed in cfg.pipeline.seeds] for arm in cfg.pipeline.arms}


def _student_config(cfg: CocomixConfig, arm: str, seed: int, vocab_size: int) -> CocomixConfig:
    from conceptlm.cocomix.student import make_arm

    base = dataclasses.replace(cfg.student, vocab_size=vocab_size)
    student, cocomix = make_arm(arm, base, cfg.cocomix, seq_len=cfg.corpus.window)
    run = dataclasses.replace(cfg.run, out_dir=str(Path(cfg.run_dir) / STUDENTS_DIR), name=f"{arm}-s{seed}",
                              resume="auto")
    return dataclasses.replace(cfg, student=student, cocomix=cocomix, run=run,
                               train=dataclasses.replace(cfg.train, seed=seed))


class _Stages:
    """The pipeline's stages over one config; each loads what it needs lazily."""

    def __init__(self, cfg: CocomixConfig, command: str | None):
        self.cfg, self.command = cfg, command
        self.run_dir = Path(cfg.run_dir)
        self._teacher = None

    # -------------------------------------------------------------------------------------- concept space
    def sae(self) -> dict[str, Any]:
        from conceptlm.cocomix.labels import SAE_DIR
        from conceptlm.cocomix.sae import SAE_CONFIG
        from conceptlm.cocomix.sae_train import train_sae

        out = self.run_dir / SAE_DIR
        if (out / SAE_CONFIG).is_file():
            log.info("SAE: %s exists, skipped", out)
            return {"sae": str(out), "skipped": True}
        res = train_sae(_resumable(self.cfg), command=self.command)
        return {"sae": str(out), "skipped": False, "eval": res.last_eval}

    def labels(self) -> dict[str, Any]:
        from conceptlm.cocomix.labels import label

        return label(self.cfg)

    def teacher(self):
        """``(teacher model, tokenizer)`` of the run (the tiny one trained by the SAE stage, or ``teacher.path``)."""
        if self._teacher is None:
            from conceptlm.cocomix.labels import resolve_teacher
            from conceptlm.cocomix.teacher import load_teacher

            self._teacher = load_teacher(self.cfg.teacher, path=resolve_teacher(self.cfg))
        return self._teacher

    def datasets(self):
        """``(train, val)`` datasets for the students: windows with cached labels, or bare windows (online)."""
        from conceptlm.cocomix.corpus import build_corpus
        from conceptlm.cocomix.labels import label_cache_dir, open_labeled_windows

        _, tokenizer = self.teacher()
        splits = build_corpus(self.cfg.corpus, tokenizer)
        if self.cfg.pipeline.labels == "online":
            return splits.train, splits.val
        cache = label_cache_dir(self.cfg)
        kw = {"k_attr": self.cfg.labels.k_attr, "n_latents": self.cfg.sae.n_latents}
        val = open_labeled_windows(cache / "val", splits.val.windows, **kw) if splits.val is not None else None
        return open_labeled_windows(cache / "train", splits.train.windows, **kw), val

    def labeler(self):
        from conceptlm.cocomix.attribution import ConceptLabeler
        from conceptlm.cocomix.labels import resolve_sae_dir
        from conceptlm.cocomix.sae import load_sae

        teacher, _ = self.teacher()
        return ConceptLabeler(teacher, load_sae(resolve_sae_dir(self.cfg)), self.cfg.teacher.layer, self.cfg.labels)

    # -------------------------------------------------------------------------------------- students
    def students(self) -> dict[str, Any]:
        from conceptlm.cocomix.student import train_student

        teacher, tokenizer = self.teacher()
        train_ds, val_ds = self.datasets()
        online = self.cfg.pipeline.labels == "online"
        done: dict[str, Any] = {}
        # seed-major: a pipeline stopped part-way leaves every arm with the same seeds done (a usable report)
        for seed in self.cfg.pipeline.seeds:
            for arm in self.cfg.pipeline.arms:
                sub = _student_config(self.cfg, arm, seed, len(tokenizer))
                if ckpt_lib.run_finished(sub.run_dir, sub.train.max_steps):
                    log.info("student %s: finished, skipped", sub.run.name)
                    done[sub.run.name] = {"skipped": True}
                    continue
                log.info("student %s: d=%d, %d layers, mix=%s, lam=%g, kd=%g", sub.run.name, sub.student.d_model,
                         sub.student.n_layers, sub.student.mix, sub.cocomix.lam, sub.cocomix.kd_weight)
                labeler = self.labeler() if (online and sub.student.concept_head) else None
                res = train_student(sub, command=self.command, train_ds=train_ds, eval_ds=val_ds,
                                    teacher=teacher if sub.cocomix.kd_weight > 0 else None, labeler=labeler)
                done[sub.run.name] = {"skipped": False, "eval": res.last_eval}
        return done


def pipeline(cfg: CocomixConfig, *, checkpoint: str | None = None, output: str | None = None,
             command: str | None = "conceptlm cocomix pipeline") -> dict[str, Any]:
    """Run every stage (skipping finished ones) and write the report; returns the report's summary."""
    if checkpoint is not None:
        raise ConfigError("the pipeline takes no --checkpoint (it continues its own run folder)", field="checkpoint")
    stages = _Stages(cfg, command)
    summary: dict[str, Any] = {"run_dir": str(cfg.run_dir), "sae": stages.sae()}
    if cfg.pipeline.labels == "cached":
        lab = stages.labels()
        summary["labels"] = {k: lab[k] for k in ("path", "windows", "tokens", "tokens_per_s")}
    summary["students"] = stages.students()
    summary["report"] = build_report(cfg, output=output)
    return summary


def train(cfg: CocomixConfig, *, command: str | None = None):
    """``conceptlm cocomix train``: one student exactly as configured (``student`` + ``cocomix``), on the label
    cache of the run (made by ``label``) or with online labels (``pipeline.labels: online``), in
    ``{run_dir}/students/{run.name}``."""
    from conceptlm.cocomix.student import train_student

    stages = _Stages(cfg, command)
    teacher, tokenizer = stages.teacher()
    train_ds, val_ds = stages.datasets()
    sub = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, vocab_size=len(tokenizer)),
                              run=dataclasses.replace(cfg.run, out_dir=str(Path(cfg.run_dir) / STUDENTS_DIR)))
    online = cfg.pipeline.labels == "online" and sub.student.concept_head
    return train_student(sub, command=command, train_ds=train_ds, eval_ds=val_ds,
                         teacher=teacher if sub.cocomix.kd_weight > 0 else None,
                         labeler=stages.labeler() if online else None)


# ------------------------------------------------------------------------------------------------ report
def report(cfg: CocomixConfig, *, checkpoint: str | None = None, output: str | None = None) -> dict[str, Any]:
    """``conceptlm cocomix report``: rebuild the report from the student runs that exist (``--output`` folder)."""
    if checkpoint is not None:
        raise ConfigError("report takes no --checkpoint (it reads the run folder's students)", field="checkpoint")
    summary = build_report(cfg, output=output)
    if not summary["arms"]:
        raise ConfigError(f"no student of {cfg.run_dir / STUDENTS_DIR} has evaluation metrics yet; run the "
                          "pipeline first", field="pipeline.arms")
    return summary


def reach_point(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first x at which the piecewise-linear ``curve`` of ``(x, loss)`` reaches ``loss <= target``
    (interpolated between eval points; ``None`` when it never does)."""
    prev = None
    for x, y in curve:
        if y <= target:
            if prev is None or prev[1] == y:
                return x
            (x0, y0) = prev
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
        prev = (x, y)
    return None


def _eval_curve(run_dir: Path) -> list[tuple[float, float]]:
    from conceptlm.core.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [(r["tokens_seen"], r[VAL_KEY]) for r in read_metrics(path)
            if r.get("split") == "eval" and VAL_KEY in r and "tokens_seen" in r]


def _mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Mean over seeds at the x values every seed logged."""
    common = set.intersection(*(set(x for x, _ in c) for c in curves)) if curves else set()
    return [(x, statistics.fmean(dict(c)[x] for c in curves)) for x in sorted(common)]


def _teacher_forward_flops(cfg: CocomixConfig) -> float:
    """Forward FLOPs per token of the teacher (2 x its non-embedding parameters; for KD arms, which run it on every
    training batch)."""
    from conceptlm.cocomix.labels import resolve_teacher
    from conceptlm.cocomix.teacher import load_teacher

    model, _ = load_teacher(cfg.teacher, path=resolve_teacher(cfg))
    emb = model.get_input_embeddings().weight.numel()
    return 2.0 * (sum(p.numel() for p in model.parameters()) - emb) + 2.0 * emb  # + the LM head (tied or not)


def build_report(cfg: CocomixConfig, *, output: str | Path | None = None) -> dict[str, Any]:
    """Curves and tables over the students that have metrics; returns the summary written to ``report.json``
    less each arm's mean ``curve`` (kept in the file only: the returned summary is what the CLI prints)."""
    from conceptlm.cocomix.student import count_parameters, flops_per_token
    from conceptlm.plots.curves import plot_curves

    out = Path(output or Path(cfg.run_dir) / REPORT_DIR)
    runs = student_runs(cfg)
    vocab = _vocab_of_runs(runs) or cfg.student.vocab_size
    arms: dict[str, Any] = {}
    kd_flops = None
    for arm, dirs in runs.items():
        curves = [c for c in (_eval_curve(d) for d in dirs) if c]
        if not curves:
            continue
        sub = _student_config(cfg, arm, cfg.pipeline.seeds[0], vocab)
        fpt = flops_per_token(sub.student, cfg.corpus.window)["total"]
        if sub.cocomix.kd_weight > 0:
            kd_flops = kd_flops if kd_flops is not None else _teacher_forward_flops(cfg)
            fpt += kd_flops
        finals = [c[-1][1] for c in curves]
        arms[arm] = {
            "seeds": len(curves), "final_val_loss": statistics.fmean(finals),
            "final_val_loss_sd": statistics.stdev(finals) if len(finals) > 1 else None,  # undefined for 1 seed
            "final_val_loss_per_seed": finals,
            "tokens": curves[0][-1][0], "train_flops_per_token": fpt,
            "active_parameters": count_parameters(sub.student)["active"],
            "curve": _mean_curve(curves), "runs": [str(d) for d in dirs],
        }
    base = arms.get(BASELINE_ARM)
    for name, a in arms.items():
        a["tokens_to_baseline"] = a["tokens_fraction_of_baseline"] = a["flops_fraction_of_baseline"] = None
        if base is None:
            continue
        reached = reach_point(a["curve"], base["final_val_loss"])
        if reached is not None:
            a["tokens_to_baseline"] = reached
            a["tokens_fraction_of_baseline"] = reached / base["tokens"]
            a["flops_fraction_of_baseline"] = (reached * a["train_flops_per_token"]
                                               / (base["tokens"] * base["train_flops_per_token"]))
    summary = {"baseline": BASELINE_ARM if base else None, "metric": f"eval {VAL_KEY} (nats per token)",
               "window": cfg.corpus.window, "arms": arms}
    if arms:
        out.mkdir(parents=True, exist_ok=True)
        dirs = {f"{arm}-s{cfg.pipeline.seeds[0]}": runs[arm][0] for arm in arms}
        scale = {f"{arm}-s{cfg.pipeline.seeds[0]}": arms[arm]["train_flops_per_token"] for arm in arms}
        summary["plots"] = [
            str(plot_curves(dirs, out / "val_loss_vs_tokens.png", keys=(VAL_KEY,), x="tokens_seen",
                            x_label="training tokens", splits=("eval",), title="validation loss vs tokens")),
            str(plot_curves(dirs, out / "val_loss_vs_flops.png", keys=(VAL_KEY,), x="tokens_seen", x_scale=scale,
                            x_label="training FLOPs (student matmuls; + teacher forward for KD)", splits=("eval",),
                            title="validation loss vs FLOPs")),
        ]
        atomic_write_text(out / "report.md", _markdown(summary))
        atomic_write_text(out / "report.json", json.dumps(summary, indent=2))
        summary["markdown"] = str(out / "report.md")
    for a in arms.values():  # the curves stay in report.json; the returned summary is what the CLI prints
        del a["curve"]
    return summary


def _vocab_of_runs(runs: dict[str, list[Path]]) -> int | None:
    """The students' vocabulary size, read back from a student's saved config (it is the teacher's)."""
    import yaml

    for dirs in runs.values():
        for d in dirs:
            path = d / "config.yaml"
            if path.is_file():
                return int(yaml.safe_load(path.read_text(encoding="utf-8"))["student"]["vocab_size"])
    return None


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "not reached"
    return f"{100 * x:.1f}%" if pct else f"{x:.4g}"


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# CoCoMix students", "",
        f"Validation metric: {summary['metric']}, window {summary['window']} tokens; mean over seeds "
        "(± sample sd, from two seeds on). 'to reach NTP' = the fraction of the NTP baseline's training tokens "
        "(and training FLOPs) at which the arm's mean validation curve first reaches the baseline's final loss "
        "(linear interpolation between evaluations).", "",
        "| arm | seeds | active params | train MFLOP/token | final val loss | tokens to reach NTP | FLOPs to reach NTP "
        "| final val loss per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, a in summary["arms"].items():
        sd = "" if a["final_val_loss_sd"] is None else f" ± {a['final_val_loss_sd']:.4f}"
        lines.append(f"| {name} | {a['seeds']} | {a['active_parameters']:,} | {a['train_flops_per_token'] / 1e6:.4g} "
                     f"| {a['final_val_loss']:.4f}{sd} "
                     f"| {_fmt(a['tokens_fraction_of_baseline'], True)} "
                     f"| {_fmt(a['flops_fraction_of_baseline'], True)} "
                     f"| {', '.join(f'{x:.4f}' for x in a['final_val_loss_per_seed'])} |")
    return "\n".join(lines) + "\n"
