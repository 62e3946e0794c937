"""Base-LCM (MSE) vs Two-Tower (diffusion) vs the likelihood-trained LCM (SONAR-LLM: token cross-entropy of the next
sentence through the frozen decoder) on the same data, budget and decoder, in an autoencoded concept space.

Data: Yelp reviews (``yelp_test.jsonl``) prepared with the autoencoder's encoder (``encoder.name: <autoencoder>``),
so every model predicts vectors of the same space; the text comes from the autoencoder's own decoder
(``decoder.kind: autoencoder``), which learned from training-split sentences only. Every model gets the same
architecture of its kind (d_model, layers), steps, batch and learning rate. Metrics (``conceptlm lcm evaluate`` on
the validation documents): teacher-forced ``l2`` / ``cos`` / ``ca`` (and the copy-previous baseline ``l2_prev``),
round-trip ``l2_r``, MI (``--mi-model``, optional), ROUGE-L of continuations generated from each document's first
half, and the training wall time.

    python benchmarks/lcm_likelihood.py --autoencoder runs/bench/ae/ae256 --out runs/bench/lik \\
        --steps 300 --seeds 0 1 2 --json runs/bench/lcm_likelihood.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from conceptlm.core.config import load_config
from conceptlm.core.io import atomic_write_text
from conceptlm.lcm import recipe
from conceptlm.lcm.autoencoder import AutoencoderEncoder, autoencoder_dir
from conceptlm.lcm.config import LCMConfig

REPO = Path(__file__).resolve().parents[1]
YELP = REPO.parent / "shared" / "data" / "llm_jepa" / "yelp_test.jsonl"
SUMMARY = ("l2", "l2_prev", "cos", "ca", "l2_r")


def config(args, model: str, seed: int, ae: Path, dim: int) -> LCMConfig:
    o = {"run.out_dir": args.out, "run.name": f"{model}_s{seed}", "run.resume": "auto",
         "docs.source": str(YELP), "docs.text_field": "messages.1.content", "docs.unescape": True,
         "docs.limit": args.n_docs, "encoder.name": str(ae), "prepare.out_dir": str(Path(args.out) / "data"),
         "prepare.max_sentences": 24, "prepare.val_fraction": 0.05, "prepare.shard_size": 500,
         "lcm.model": model, "lcm.dim": dim, "lcm.d_model": 128, "lcm.n_layers": 2, "lcm.n_heads": 4,
         "lcm.d_ff": 384, "lcm.dropout": 0.0, "lcm.max_sentences": 24, "lcm.n_denoiser_layers": 2,
         "decoder.kind": "autoencoder", "train.max_steps": args.steps, "train.micro_batch_size": args.batch,
         "train.seed": seed, "train.eval_every": 0, "train.log_every": 25, "train.progress": False,
         "optim.lr": args.lr, "optim.weight_decay": 0.01, "schedule.warmup_steps": min(50, args.steps // 10),
         "evaluate.documents": args.eval_docs, "evaluate.generate_documents": args.gen_docs,
         "evaluate.mi_sentences": args.mi_sentences, "generate.max_new_sentences": 8}
    if args.mi_model:
        o["evaluate.mi_model"] = args.mi_model
    if model == "likelihood":
        o["lcm.likelihood_decoder"] = str(ae)
    return load_config(LCMConfig, None, [f"{k}={v}" for k, v in o.items()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--autoencoder", required=True, help="a train-autoencoder folder (or its run folder)")
    ap.add_argument("--out", default="runs/bench/lcm_likelihood")
    ap.add_argument("--json", required=True)
    ap.add_argument("--models", nargs="+", default=["base", "two_tower", "likelihood"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16, help="documents per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-docs", type=int, default=1000, help="Yelp reviews read (5%% are validation)")
    ap.add_argument("--eval-docs", type=int, default=50)
    ap.add_argument("--gen-docs", type=int, default=16)
    ap.add_argument("--mi-model", default=None, help="e.g. smollm2-135m (slow on CPU); default: no MI")
    ap.add_argument("--mi-sentences", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ae = autoencoder_dir(args.autoencoder)
    if ae is None:
        raise SystemExit(f"{args.autoencoder}: no autoencoder folder")
    dim = AutoencoderEncoder(ae).dim
    out = {"command": "python benchmarks/lcm_likelihood.py " + " ".join(os.sys.argv[1:]), "autoencoder": str(ae),
           "loadavg_at_start": os.getloadavg(), "threads": torch.get_num_threads(), "runs": [], "summary": {}}
    t = time.time()
    recipe.prepare(config(args, "base", 0, ae, dim))
    out["prepare_s"] = time.time() - t
    for model in args.models:
        for seed in args.seeds:
            cfg = config(args, model, seed, ae, dim)
            t = time.time()
            recipe.train(cfg)
            train_s = time.time() - t
            t = time.time()
            res = recipe.evaluate(cfg)
            row = {"model": model, "seed": seed, "train_s": train_s, "evaluate_s": time.time() - t,
                   "teacher_forced": res["teacher_forced"], "mi": res.get("mi"),
                   "rouge_l": (res.get("generation") or {}).get("rouge_l"),
                   "example": (res.get("generation") or {}).get("example")}
            out["runs"].append(row)
            print(json.dumps({k: row[k] for k in ("model", "seed", "train_s", "mi", "rouge_l")}
                             | {k: row["teacher_forced"].get(k) for k in SUMMARY}), flush=True)
            rows = [r for r in out["runs"] if r["model"] == model]
            keys = [*SUMMARY, "mi", "rouge_l", "train_s"]
            vals = {k: [r["teacher_forced"].get(k) if k in SUMMARY else r[k] for r in rows] for k in keys}
            out["summary"][model] = {k: {"mean": statistics.fmean(v), "sd": statistics.pstdev(v), "n": len(v)}
                                     for k, v in vals.items() if v and all(x is not None for x in v)}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.json, json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
