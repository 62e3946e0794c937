"""NTP vs LLM-JEPA fine-tuning of SmolLM2-135M-Instruct: several arms x seeds, each arm one config file, run through
the CLI (``conceptlm jepa train``, ``eval``, ``analyze``), then one summary table.

    python benchmarks/jepa_smollm2_protocol.py --arms synth_ntp synth_jepa --seeds 0 1 2
    python benchmarks/jepa_smollm2_protocol.py --arms synth_ntp_lora synth_jepa_lora --seeds 0
    python benchmarks/jepa_smollm2_protocol.py --summarize          # the table of every run found so far
    # Semantic Tube Prediction, data efficiency: NTP and STP on all records and on the first 500 (1/16 of SYNTH)
    python benchmarks/jepa_smollm2_protocol.py --arms synth_ntp synth_stp synth_ntp:500 synth_stp:500 --seeds 0 1 2

An arm ``NAME`` is ``configs/jepa/smollm2_NAME.yaml``; a run is that config with ``train.seed=S`` and
``run.name=<config's name>_sS`` under ``--out`` (default ``runs/bench/jepa_smollm2``). ``NAME:N`` is the same config
on the first N training records (``data.limit_train=N``), named ``<config's name>_nN_sS`` (arm ``NAME_nN``).
Each stage is skipped when its output exists (``train``: ``train.json``, the verb's result; ``eval``: ``eval.json``;
``analyze``: ``analyze.json``), so an interrupted protocol resumes where it stopped (the train stage itself resumes
from its last checkpoint).

Per run it records: semantic accuracy (the config's scorer) with its 95 % Wilson interval, exact match (the ``exact``
scorer on the same predictions), the final eval LM loss, seconds per optimizer step (median over consecutive logged
steps), the packed token bound (:func:`token_bound`), and the collapse diagnostics of ``analyze`` (matched vs
mismatched distance, effective rank, Text->Code retrieval). The summary gives mean +- sample std over seeds per
arm, and for each pair of arms (a JEPA/STP arm vs its NTP arm; a variant vs the plain arm; an arm on part of the
data vs NTP on all of it, see
:func:`comparisons`) on their common seeds, the paired exact McNemar p-value over all pooled (seed, record) pairs
and the step-time ratio.
Writes ``summary.json`` and ``summary.md`` under ``--out`` (``summary_from<N>.*`` with ``--from-record N``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def arm_config(arm: str) -> Path:
    return ROOT / "configs" / "jepa" / f"smollm2_{arm}.yaml"


def parse_arm(spec: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:N`` (N training records) -> (config arm, N or None)."""
    name, _, limit = spec.partition(":")
    if limit and not (limit.isdigit() and int(limit) > 0):
        raise SystemExit(f"arm {spec!r}: the data limit after ':' must be a positive integer")
    return name, int(limit) if limit else None


def run_name(arm: str, seed: int) -> str:
    name, limit = parse_arm(arm)
    cfg = yaml.safe_load(arm_config(name).read_text())
    return f"{cfg['run']['name']}{'' if limit is None else f'_n{limit}'}_s{seed}"


def _cli(args: list[str], log: Path, threads: int) -> dict:
    """Run one ``conceptlm`` command; its stdout (the verb's JSON result) is parsed; output also goes to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "CONCEPTLM_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "conceptlm.cli", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ conceptlm {' '.join(args)}  # {time.time() - t0:.0f} s, rc {proc.returncode}\n")
        f.write(proc.stderr[-20000:])
    if proc.returncode != 0:
        raise SystemExit(f"conceptlm {' '.join(args)} failed (rc {proc.returncode}); see {log}")
    out = proc.stdout
    return json.loads(out[out.index("{"):]) if "{" in out else {}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def run_one(arm: str, seed: int, out: Path, threads: int, overrides: list[str] = ()) -> None:
    name = run_name(arm, seed)
    run_dir = out / name
    base, limit = parse_arm(arm)
    data = [] if limit is None else [f"data.limit_train={limit}"]
    common = ["--config", str(arm_config(base)), f"train.seed={seed}", f"run.name={name}", f"run.out_dir={out}",
              *data, *overrides]
    log = run_dir.parent / f"{name}.log"
    if not (run_dir / "train.json").exists():
        print(f"[{time.strftime('%H:%M:%S')}] train {name}", flush=True)
        _write_json(run_dir / "train.json", _cli(["jepa", "train", *common], log, threads))
    if not (run_dir / "eval.json").exists():
        print(f"[{time.strftime('%H:%M:%S')}] eval {name}", flush=True)
        _write_json(run_dir / "eval.json", _cli(["jepa", "eval", *common], log, threads))
    if not (run_dir / "analyze.json").exists():
        print(f"[{time.strftime('%H:%M:%S')}] analyze {name}", flush=True)
        _write_json(run_dir / "analyze.json", _cli(["jepa", "analyze", *common], log, threads))


# ---------------------------------------------------------------------------------------------- summary
def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().split("\n") if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def step_seconds(rows: list[dict]) -> float | None:
    """Median seconds per optimizer step over logged train rows (``log_every: 1``; ``time`` is the run clock)."""
    train = [r for r in rows if r.get("split") == "train" and "time" in r]
    secs = [b["time"] - a["time"] for a, b in zip(train, train[1:]) if b["step"] == a["step"] + 1]
    return statistics.median(secs) if secs else None


def token_bound(arm: str, run_dir: Path, n_records: int = 800) -> float | None:
    """Packed-mode token bound of a JEPA arm: packed row tokens / LM tokens over the first ``n_records`` training
    records (the run's own tokenizer and view settings; 800 = the reduced protocol's 100 steps x 8). None for NTP."""
    from transformers import AutoTokenizer

    from conceptlm.core.config import load_config
    from conceptlm.data.sources import resolve_source
    from conceptlm.jepa.config import JepaConfig
    from conceptlm.jepa.recipe import build_dataset

    cfg = load_config(JepaConfig, arm_config(_config_arm(arm)), [])
    if cfg.jepa.objective == "stp":
        return 1.0 if cfg.jepa.lam > 0 else None  # one forward over the LM tokens
    if cfg.jepa.lam == 0 or not (run_dir / "tokenizer").is_dir():
        return None
    tok = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    src = resolve_source(str(ROOT / cfg.data.train) if not Path(cfg.data.train).is_absolute() else cfg.data.train,
                         split="train", fmt=cfg.data.format, limit=n_records)
    ds = build_dataset(cfg, src, tok)
    exs = [ds[i] for i in range(len(ds))]
    return sum(ex.packed_len for ex in exs) / sum(len(ex.lm_ids) for ex in exs)


def _config_arm(arm: str) -> str:
    """The config of a summary arm name (``synth_stp_n500`` -> ``synth_stp``)."""
    stem, sep, n = arm.rpartition("_n")
    return stem if sep and n.isdigit() and arm_config(stem).exists() else arm


def final_eval_loss(rows: list[dict]) -> dict:
    ev = [r for r in rows if r.get("split") == "eval"]
    keys = ("loss", "lm", "jepa", "jepa_mismatch", "stp", "stp_mismatch")
    return {k: v for k, v in ev[-1].items() if k in keys} if ev else {}


def correct_lists(predictions: Path, from_record: int = 0) -> tuple[list[bool], list[bool]]:
    """Per-record outcomes of one predictions file: (the config's scorer, the ``exact`` scorer), of the records
    whose test-set index is ``>= from_record``, in index order; empty if absent."""
    from conceptlm.eval.scorers import exact_match

    if not predictions.exists():
        return [], []
    rows = [json.loads(line) for line in predictions.read_text().split("\n") if line.strip()]
    rows = sorted((r for r in rows if r["index"] >= from_record), key=lambda r: r["index"])
    return [bool(r["correct"]) for r in rows], [bool(exact_match(r["prediction"], r["reference"])) for r in rows]


def _mean_std(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def comparisons(arms: list[str]) -> list[tuple[str, str]]:
    """Pairs (a, b) of arms to compare: each JEPA or STP arm ``X_jepa[_Y]`` / ``X_stp[_Y]`` vs its NTP arm
    (``X_ntp_Y``, else ``X_ntp``), each variant ``X_jepa_Y`` / ``X_stp_Y`` of a full-fine-tuning arm vs ``X_jepa`` /
    ``X_stp`` itself (LoRA arms excluded), and each arm on part of the data (``_nN``) vs the NTP arm on all of it
    (the data-efficiency question: does X on N records reach NTP on all?)."""
    out = []
    for arm in sorted(arms):
        kind = "_stp" if "_stp" in arm else "_jepa" if "_jepa" in arm else None
        if kind is None:
            continue
        stem, _, suffix = arm.partition(kind)
        for base in (f"{stem}_ntp{suffix}", f"{stem}_ntp"):
            if base in arms:
                out.append((base, arm))
                break
        if suffix and "lora" not in suffix and f"{stem}{kind}" in arms:
            out.append((f"{stem}{kind}", arm))
        if "_n" in suffix and f"{stem}_ntp" in arms and (f"{stem}_ntp", arm) not in out:
            out.append((f"{stem}_ntp", arm))
    return out


def collect(out: Path, arms: list[str] | None, from_record: int = 0) -> dict:
    runs: dict[str, dict[int, dict]] = {}
    for ev in sorted(out.glob("*/eval.json")):
        run_dir = ev.parent
        stem, _, seed = run_dir.name.rpartition("_s")
        arm = stem.removeprefix("jepa_smollm2_")
        if arms and arm not in arms:
            continue
        res = json.loads(ev.read_text())
        sem, exact = correct_lists(Path(res["predictions"]), from_record)
        if from_record:  # the accuracy of the kept records only
            from conceptlm.eval.stats import accuracy_ci

            res["accuracy"], res["ci_low"], res["ci_high"] = accuracy_ci(sem)
            res["n"] = len(sem)
        rows = _rows(run_dir)
        an = json.loads((run_dir / "analyze.json").read_text()) if (run_dir / "analyze.json").exists() else {}
        runs.setdefault(arm, {})[int(seed)] = {
            "semantic": res["accuracy"], "ci": [res["ci_low"], res["ci_high"]], "n": res["n"],
            "exact": statistics.fmean(exact) if exact else None,
            "step_s": step_seconds(rows), "eval": final_eval_loss(rows),
            "token_bound": token_bound(arm, run_dir) if int(seed) == 0 else None,
            "analyze": {k: an.get(k) for k in ("jepa_matched", "jepa_mismatched", "enc_text_erank", "enc_code_erank",
                                               "retrieval_top1", "retrieval_top5") if k in an},
            "_sem": sem, "_exact": exact}
    summary: dict = {"arms": {}, "pairs": {}}
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        summary["arms"][arm] = {
            "seeds": seeds, "n_records": by_seed[seeds[0]]["n"],
            "semantic": _mean_std([by_seed[s]["semantic"] for s in seeds]),
            "exact": _mean_std([by_seed[s]["exact"] for s in seeds]),
            "step_s": _mean_std([by_seed[s]["step_s"] for s in seeds]),
            "token_bound": by_seed[seeds[0]]["token_bound"],
            "runs": {s: {k: v for k, v in by_seed[s].items() if not k.startswith("_")} for s in seeds}}
    from conceptlm.eval.stats import mcnemar_exact

    for a, b in comparisons(list(runs)):
        seeds = sorted(set(runs[a]) & set(runs[b]))
        if not seeds:
            continue
        pair: dict = {"seeds": seeds}
        for key in ("_sem", "_exact"):
            xa = [x for s in seeds for x in runs[a][s][key]]
            xb = [x for s in seeds for x in runs[b][s][key]]
            pair[key.strip("_")] = mcnemar_exact(xa, xb) | {"a_correct": sum(xa), "b_correct": sum(xb)}
        ratios = [runs[b][s]["step_s"] / runs[a][s]["step_s"] for s in seeds
                  if runs[a][s]["step_s"] and runs[b][s]["step_s"]]
        pair["step_ratio_b_vs_a"] = statistics.fmean(ratios) if ratios else None
        summary["pairs"][f"{a} vs {b}"] = pair
    return summary


def _pct(ms: dict) -> str:
    if ms["mean"] is None:
        return "-"
    return f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}" if ms["n"] > 1 else f"{100 * ms['mean']:.1f}"


def markdown(summary: dict) -> str:
    lines = ["| arm | seeds | test records | semantic acc. % | exact match % | s/step | packed token bound |",
             "|---|---|---|---|---|---|---|"]
    for arm, a in summary["arms"].items():
        step = "-" if a["step_s"]["mean"] is None else f"{a['step_s']['mean']:.2f}"
        bound = "-" if a["token_bound"] is None else f"{a['token_bound']:.2f}"
        lines.append(f"| {arm} | {len(a['seeds'])} | {a['n_records']} | {_pct(a['semantic'])} | {_pct(a['exact'])} | "
                     f"{step} | {bound} |")
    lines += ["", "| a vs b (pooled over seeds) | semantic: only a / only b, p | exact: only a / only b, p |"
              " step b / a |", "|---|---|---|---|"]
    for name, p in summary["pairs"].items():
        r = p["step_ratio_b_vs_a"]
        lines.append(f"| {name} | {p['sem']['only_a']} / {p['sem']['only_b']}, {p['sem']['p']:.3g} | "
                     f"{p['exact']['only_a']} / {p['exact']['only_b']}, {p['exact']['p']:.3g} | "
                     f"{'-' if r is None else f'{r:.2f}×'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=["synth_ntp", "synth_jepa"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "jepa_smollm2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summarize", action="store_true", help="only write the summary of the runs found")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run, e.g. generate.limit=400 data.limit_eval=400")
    p.add_argument("--from-record", type=int, default=0,
                   help="score only test records with index >= N (e.g. records not used in an earlier analysis)")
    args = p.parse_args()
    for arm in args.arms:
        if not arm_config(parse_arm(arm)[0]).exists():
            raise SystemExit(f"no config for arm {arm!r}: {arm_config(parse_arm(arm)[0])}")
    if not args.summarize:
        for seed in args.seeds:  # seed-major: a protocol stopped part-way leaves balanced arms
            for arm in args.arms:
                run_one(arm, seed, args.out, args.threads, args.overrides)
    names = [parse_arm(a)[0] + ("" if parse_arm(a)[1] is None else f"_n{parse_arm(a)[1]}") for a in args.arms]
    summary = collect(args.out, None if args.summarize else names, args.from_record)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"summary_from{args.from_record}" if args.from_record else "summary"
    _write_json(args.out / f"{stem}.json", summary)
    (args.out / f"{stem}.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
