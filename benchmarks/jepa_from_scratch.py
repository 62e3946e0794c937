"""From-scratch NTP vs LLM-JEPA on NL-RX-SYNTH: train on synth_train, evaluate on synth_test, several seeds.

Both arms use the same config, data, batches and seeds; the NTP arm is ``jepa.lam=0 jepa.num_predictors=0`` (bit for
bit the SFT baseline). Every run is a real ``conceptlm jepa train`` + ``eval`` (semantic regex equivalence and exact
match, greedy decoding). Prints one JSON object (per-seed accuracies, mean ± sample std) and writes
``<out>/curves.png`` with the NTP and JEPA training curves.

    python benchmarks/jepa_from_scratch.py --seeds 0 1 2 --k 3 --lam 2 --steps 1000 --out runs/scratch

Needs ../shared/data/llm_jepa/synth_{train,test}.jsonl (or pass --train/--test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "llm_jepa"


def run(cmd: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "conceptlm", *cmd], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "CONCEPTLM_NO_PROGRESS": "1"})
    if r.returncode != 0:
        raise SystemExit(f"failed: conceptlm {' '.join(cmd)}\n{r.stderr[-4000:]}")
    return json.loads(r.stdout[r.stdout.index("{"):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=3, help="predictor tokens of the JEPA arm")
    ap.add_argument("--lam", type=float, default=2.0, help="λ of the JEPA arm")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--train", default=str(DATA / "synth_train.jsonl"))
    ap.add_argument("--test", default=str(DATA / "synth_test.jsonl"))
    ap.add_argument("--out", default="runs/scratch")
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for both arms")
    ap.add_argument("--jepa-extra", nargs="*", default=[], help="more key=value overrides for the JEPA arm only")
    ap.add_argument("--arms", nargs="+", default=["ntp", "jepa"], choices=["ntp", "jepa"])
    ap.add_argument("--tag", default="", help="suffix of the JEPA arm's run names (to keep several variants)")
    args = ap.parse_args()
    for f in (args.train, args.test):
        if not Path(f).is_file():
            raise SystemExit(f"missing data file {f} (the shared NL-RX data)")

    from conceptlm.eval.stats import accuracy_ci, mean_std
    from conceptlm.plots.curves import plot_curves

    common = [
        f"run.out_dir={args.out}", "run.resume=auto", f"data.train={args.train}", f"data.eval={args.test}",
        "data.max_length=160", "model.max_position_embeddings=160", "model.arch=llama",
        f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", "model.num_heads=4",
        "tokenizer.vocab_size=1024", f"optim.lr={args.lr}", "schedule.kind=cosine", "schedule.warmup_steps=50",
        "schedule.min_lr_ratio=0.1", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}",
        f"train.eval_every={max(args.steps // 10, 1)}", "train.eval_batch_size=128", "train.log_every=10",
        "train.progress=false", "generate.scorer=regex", "generate.max_new_tokens=64", "generate.batch_size=128",
        "jepa.mode=packed", *args.extra,
    ]
    if args.limit_test:
        common.append(f"data.limit_eval={args.limit_test}")
    all_arms = {"ntp": ["jepa.lam=0", "jepa.num_predictors=0"],
                "jepa": [f"jepa.lam={args.lam}", f"jepa.num_predictors={args.k}", *args.jepa_extra]}
    arms = {(a if a == "ntp" else f"jepa{args.tag}"): all_arms[a] for a in args.arms}
    results: dict[str, list[dict]] = {a: [] for a in arms}
    for seed in args.seeds:
        for arm, ov in arms.items():
            name = f"{arm}_s{seed}"
            cfg = [*common, *ov, f"run.name={name}", f"train.seed={seed}"]
            tr = run(["jepa", "train", *cfg])
            ev = run(["jepa", "eval", *cfg])
            rows = [json.loads(l) for l in open(ev["predictions"], encoding="utf-8")]
            exact = [r["prediction"].strip() == r["reference"].strip() for r in rows]
            res = {"seed": seed, "semantic": ev["accuracy"], "semantic_ci95": [ev["ci_low"], ev["ci_high"]],
                   "exact": accuracy_ci(exact)[0], "n": ev["n"], "eval_loss_lm": tr["eval"].get("lm"),
                   "eval_jepa": tr["eval"].get("jepa"), "run_dir": tr["run_dir"]}
            results[arm].append(res)
            print(json.dumps({arm: res}), file=sys.stderr, flush=True)
    summary = {}
    for arm, rs in results.items():
        sm, ss = mean_std([100 * r["semantic"] for r in rs])
        em, es = mean_std([100 * r["exact"] for r in rs])
        summary[arm] = {"semantic_mean": sm, "semantic_std": ss, "exact_mean": em, "exact_std": es}
    png = plot_curves({f"{a}_s{s}": Path(args.out) / f"{a}_s{s}" for s in args.seeds[:1] for a in arms},
                      Path(args.out) / "curves.png", keys=("lm", "jepa"),
                      title=f"NL-RX-SYNTH from scratch: NTP vs LLM-JEPA (k={args.k}, λ={args.lam})")
    print(json.dumps({"settings": vars(args), "summary": summary, "runs": results, "curves": str(png)}, indent=2))


if __name__ == "__main__":
    main()
