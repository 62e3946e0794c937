"""The CoCoMix report: validation loss of every arm against training tokens and training FLOPs, built only from
what each student run saved — its own ``config.yaml``, its ``metrics.jsonl`` and the costs its ``artifact.json``
records — never from the current config.

Each student's ``artifact.json`` is compared with the identity the current config would give it (when the caller
passes those): a run made from other settings or inputs is refused with one line (``pipeline.on_change=refuse``)
or flagged in the report (``rebuild``), and a run without a manifest (an older version) is flagged "unverified".
Its config and metrics are checked against their recorded sha256.

FLOPs per training token (see :mod:`conceptlm.cocomix.costs`): the student's matmuls
(:func:`~conceptlm.cocomix.costs.flops_per_token`), plus the teacher's forward for KD arms, plus the label
extraction (teacher forward and backward to the SAE layer, and the SAE) for arms trained on concept labels, cached
or not. "FLOPs to reach NTP" is the ratio of these totals at the token counts where the curves reach NTP's final
loss. The one-off costs of the run (tiny teacher training, SAE training, the label pass over the cached windows)
are listed in their own table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from conceptlm.core.artifact import (
    Identity,
    StaleArtifactError,
    damaged_file,
    diff_identity,
    is_complete,
    read_manifest,
    write_manifest,
)
from conceptlm.core.errors import DataError
from conceptlm.core.io import atomic_write_text

__all__ = ["build_report", "reach_point", "student_runs", "STUDENTS_DIR", "REPORT_DIR", "BASELINE_ARM", "VAL_KEY"]

log = logging.getLogger(__name__)

STUDENTS_DIR = "students"
REPORT_DIR = "report"
BASELINE_ARM = "ntp"
VAL_KEY = "ntp"
"""The eval column compared across arms: next-token CE per predicted token (the same for every arm)."""


def student_runs(cfg: Any) -> dict[str, list[Path]]:
    """arm -> its run folders, one per seed (``students/{arm}-s{seed}``)."""
    root = Path(cfg.run_dir) / STUDENTS_DIR
    return {arm: [root / f"{arm}-s{seed}" for seed in cfg.pipeline.seeds] for arm in cfg.pipeline.arms}


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


# ------------------------------------------------------------------------------------------------ one run
def _own_config(run_dir: Path) -> dict[str, Any]:
    """The run's own saved config (``config.yaml``) as a dict."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise DataError("the student run has metrics but no config.yaml; it cannot be reported", path=path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DataError(f"unreadable ({type(e).__name__})", path=path) from None
    if not isinstance(data, dict):
        raise DataError("not a mapping", path=path)
    return data


def _section(cls: type, data: Any) -> Any:
    """A config section from a saved config's mapping (defaults for keys it lacks; unknown keys ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (data or {}).items() if k in names})


def _check_run(run_dir: Path, name: str, expected: dict[str, Identity] | None, on_change: str
               ) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, note)`` of one student run; refuses a damaged one and, with ``on_change="refuse"``, one whose
    identity differs from ``expected[name]``."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        return None, f"{name}: unverified (no artifact.json: made by an older version)"
    listed = set(manifest.get("files") or {})
    problem = damaged_file(run_dir, manifest, [n for n in ("config.yaml", "metrics.jsonl") if n in listed])
    if problem is not None:
        raise DataError(problem)
    want = (expected or {}).get(name)
    if want is not None and manifest.get("fingerprint") != want.fingerprint:
        changes = "; ".join(diff_identity(manifest, want))
        if on_change != "rebuild":
            raise StaleArtifactError(f"{STUDENTS_DIR}/{name}: {changes}; rerun with pipeline.on_change=rebuild")
        return manifest, f"{name}: stale, not what the current config trains ({changes})"
    if not is_complete(manifest):
        return manifest, f"{name}: unfinished"
    return manifest, None


def _run_costs(run_dir: Path, own: dict[str, Any], manifest: dict[str, Any] | None, window_default: int
               ) -> dict[str, Any]:
    from conceptlm.cocomix.config import StudentSection
    from conceptlm.cocomix.costs import arm_costs

    student = _section(StudentSection, own.get("student"))
    window = int((own.get("corpus") or {}).get("window", window_default))
    return {**arm_costs(student, window, (manifest or {}).get("cost")), "window": window}


def _one_off(cfg: Any) -> dict[str, Any]:
    """The run's one-off costs, as recorded by the teacher, SAE and label stages' manifests."""
    from conceptlm.cocomix.labels import SPLITS, label_cache_dir
    from conceptlm.cocomix.sae_train import SAE_DIR
    from conceptlm.cocomix.teacher import TINY_TEACHER_DIR

    def cost_of(directory: Path) -> dict[str, Any] | None:
        m = read_manifest(directory) if directory.is_dir() else None
        return m.get("cost") if m is not None and is_complete(m) else None

    run = Path(cfg.run_dir)
    teacher = cost_of(run / TINY_TEACHER_DIR) if cfg.teacher.path is None else None
    sae = cost_of(run / SAE_DIR)
    labels = [c for c in (cost_of(label_cache_dir(cfg) / s) for s in SPLITS) if c]
    out: dict[str, Any] = {
        "teacher_training": {"tokens": teacher["train_tokens"], "flops": teacher["train_flops"]} if teacher else None,
        "sae_training": {"tokens": sae["train_tokens"], "flops": sae["train_flops"]} if sae else None,
        "label_pass": ({"tokens": sum(c["tokens"] for c in labels), "flops": sum(c["flops"] for c in labels)}
                       if labels else None),
    }
    if cfg.teacher.path is not None:
        out["teacher_training"] = "external"
    return out


# ------------------------------------------------------------------------------------------------ the report
def build_report(cfg: Any, *, output: str | Path | None = None, expected: dict[str, Identity] | None = None,
                 downstream: dict[str, dict[str, dict[str, float]]] | None = None) -> dict[str, Any]:
    """Curves and tables over the students that have metrics; returns the summary written to ``report.json``
    less each arm's mean ``curve`` (kept in the file only: the returned summary is what the CLI prints).

    Args:
        expected: run name (``ntp-s0``) -> the identity the current config would give that student; each run's
            ``artifact.json`` must match it (see the module docstring).
        downstream: run name -> lm-eval task -> metric -> value (``harness.tasks``,
            :func:`conceptlm.cocomix.harness.evaluate_students`): each arm gains ``downstream`` (task -> the mean over
            its seeds of ``harness.metric``) and the table one column per task.
    """
    from conceptlm.cocomix.identity import on_change_of, report_identity

    on_change = on_change_of(cfg)
    out = Path(output or Path(cfg.run_dir) / REPORT_DIR)
    runs = student_runs(cfg)
    arms: dict[str, Any] = {}
    fingerprints: dict[str, str | None] = {}
    first_dirs: dict[str, Path] = {}
    notes: list[str] = []
    for arm, dirs in runs.items():
        curves, arm_costs = [], None
        for d in dirs:
            curve = _eval_curve(d)
            if not curve:
                continue
            manifest, note = _check_run(d, d.name, expected, on_change)
            fingerprints[d.name] = manifest.get("fingerprint") if manifest else None
            notes += [note] if note else []
            costs = _run_costs(d, _own_config(d), manifest, cfg.corpus.window)
            if arm_costs is None:
                arm_costs, first_dirs[arm] = costs, d
            elif costs != arm_costs:
                notes.append(f"{d.name}: other sizes or costs than {first_dirs[arm].name} (its own config differs)")
            curves.append(curve)
        if not curves:
            continue
        finals = [c[-1][1] for c in curves]
        arms[arm] = {
            "seeds": len(curves), "final_val_loss": statistics.fmean(finals),
            "final_val_loss_sd": statistics.stdev(finals) if len(finals) > 1 else None,  # undefined for 1 seed
            "final_val_loss_per_seed": finals, "tokens": curves[0][-1][0],
            **{k: v for k, v in arm_costs.items() if k != "window"},
            "curve": _mean_curve(curves), "runs": [str(d) for d in dirs],
        }
        if downstream:
            arms[arm]["downstream"] = _downstream([downstream.get(d.name) for d in dirs], cfg.harness)
    base = arms.get(BASELINE_ARM)
    for a in arms.values():
        a["tokens_to_baseline"] = a["tokens_fraction_of_baseline"] = a["flops_fraction_of_baseline"] = None
        if base is None:
            continue
        reached = reach_point(a["curve"], base["final_val_loss"])
        if reached is not None:
            a["tokens_to_baseline"] = reached
            a["tokens_fraction_of_baseline"] = reached / base["tokens"]
            a["flops_fraction_of_baseline"] = (reached * a["train_flops_per_token"]
                                               / (base["tokens"] * base["train_flops_per_token"]))
    for note in notes:
        log.warning("report: %s", note)
    summary = {"baseline": BASELINE_ARM if base else None, "metric": f"eval {VAL_KEY} (nats per token)",
               "arms": arms, "one_off": _one_off(cfg), "notes": notes}
    if downstream:
        summary["downstream"] = {"tasks": list(cfg.harness.tasks), "metric": cfg.harness.metric}
    if arms:
        _write(out, summary, first_dirs)
        write_manifest(out, report_identity(list(cfg.pipeline.arms), list(cfg.pipeline.seeds), fingerprints))
        summary["markdown"] = str(out / "report.md")
    for a in arms.values():  # the curves stay in report.json; the returned summary is what the CLI prints
        del a["curve"]
    return summary


def _downstream(per_seed: list[dict[str, dict[str, float]] | None], section: Any) -> dict[str, Any]:
    """task -> ``{"metric", "value"}``: the mean over the seeds that were evaluated of ``section.metric`` (a task
    without it: its first metric); ``value`` None when no seed has the task."""
    out: dict[str, Any] = {}
    for task in section.tasks:
        rows = [s[task] for s in per_seed if s and s.get(task)]
        metric = section.metric if rows and section.metric in rows[0] else (next(iter(rows[0])) if rows else None)
        values = [r[metric] for r in rows if metric in r]
        out[task] = {"metric": metric, "value": statistics.fmean(values) if values else None, "seeds": len(values)}
    return out


def _write(out: Path, summary: dict[str, Any], first_dirs: dict[str, Path]) -> None:
    from conceptlm.plots.curves import plot_curves

    out.mkdir(parents=True, exist_ok=True)
    arms = summary["arms"]
    dirs = {first_dirs[arm].name: first_dirs[arm] for arm in arms}
    scale = {first_dirs[arm].name: arms[arm]["train_flops_per_token"] for arm in arms}
    summary["plots"] = [
        str(plot_curves(dirs, out / "val_loss_vs_tokens.png", keys=(VAL_KEY,), x="tokens_seen",
                        x_label="training tokens", splits=("eval",), title="validation loss vs tokens")),
        str(plot_curves(dirs, out / "val_loss_vs_flops.png", keys=(VAL_KEY,), x="tokens_seen", x_scale=scale,
                        x_label="training FLOPs (student; + teacher forward for KD; + label extraction for "
                        "concept arms)", splits=("eval",), title="validation loss vs FLOPs")),
    ]
    atomic_write_text(out / "report.md", _markdown(summary))
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2))


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "not reached"
    return f"{100 * x:.1f}%" if pct else f"{x:.4g}"


def _mflop(x: float | None) -> str:
    return "?" if x is None else f"{x / 1e6:.4g}"


def _task_cell(arm: dict[str, Any], task: str, metric: str) -> str:
    d = (arm.get("downstream") or {}).get(task) or {}
    if d.get("value") is None:
        return "–"
    return f"{d['value']:.4g}" + ("" if d["metric"] == metric else f" ({d['metric']})")


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# CoCoMix students", "",
        f"Validation metric: {summary['metric']}; mean over seeds (± sample sd, from two seeds on). Sizes and costs "
        "come from each run's own config.yaml and artifact.json. Train FLOPs per token = the student's matmuls + "
        "the teacher's forward (KD arms) + the label extraction, i.e. teacher forward, backward to the SAE layer and "
        "SAE, charged per training token to the arms trained on concept labels (cached or not). 'to reach NTP' = "
        "the fraction of the NTP baseline's training tokens (and training FLOPs) at which the arm's mean validation "
        "curve first reaches the baseline's final loss (linear interpolation between evaluations).", "",
        "| arm | seeds | active params | train MFLOP/token | of which teacher + labels | final val loss "
        "| tokens to reach NTP | FLOPs to reach NTP | final val loss per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tasks = (summary.get("downstream") or {}).get("tasks") or []
    if tasks:  # lm-eval columns (harness.tasks), after the existing ones
        lines[-2] += "".join(f" {t} |" for t in tasks)
        lines[-1] += "---|" * len(tasks)
        lines.insert(-2, f"Downstream columns: lm-evaluation-harness, {summary['downstream']['metric']} (else the "
                     "task's first metric, named in brackets), mean over the evaluated seeds.")
        lines.insert(-2, "")
    for name, a in summary["arms"].items():
        sd = "" if a["final_val_loss_sd"] is None else f" ± {a['final_val_loss_sd']:.4f}"
        side = None if a["teacher_flops_per_token"] is None else a["teacher_flops_per_token"] + a[
            "label_flops_per_token"]
        lines.append(f"| {name} | {a['seeds']} | {a['active_parameters']:,} | {_mflop(a['train_flops_per_token'])} "
                     f"| {_mflop(side)} | {a['final_val_loss']:.4f}{sd} "
                     f"| {_fmt(a['tokens_fraction_of_baseline'], True)} "
                     f"| {_fmt(a['flops_fraction_of_baseline'], True)} "
                     f"| {', '.join(f'{x:.4f}' for x in a['final_val_loss_per_seed'])} |"
                     + "".join(f" {_task_cell(a, t, summary['downstream']['metric'])} |" for t in tasks))
    one = summary.get("one_off") or {}
    rows = [("tiny teacher training", one.get("teacher_training")), ("SAE training", one.get("sae_training")),
            ("label pass (cached train + val windows)", one.get("label_pass"))]
    lines += ["", "One-off costs of this run (shared by every student; not in the per-token column):", "",
              "| stage | tokens | FLOPs |", "|---|---|---|"]
    for label, c in rows:
        if c == "external":
            lines.append(f"| {label} | external teacher | not counted |")
        elif c:
            lines.append(f"| {label} | {c['tokens']:,} | {c['flops']:.4g} |")
        else:
            lines.append(f"| {label} | – | not recorded |")
    if summary.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"
