"""``conceptlm demo``: the main job on the offline defaults.

Trains a tiny Llama-architecture model from scratch (byte-level BPE trained on the fly) on the built-in NL-RX-style
generator (English description -> regex), evaluates it by greedy generation on a disjoint generated test split
(exact match and semantic regex equivalence, with 95% intervals), and plots its training curves. Everything runs
offline on a laptop CPU in a few minutes; the run folder holds the config, metrics, checkpoint and plot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conceptlm.core.config import load_config

__all__ = ["DEMO_OVERRIDES", "run_demo"]

DEMO_OVERRIDES = [
    "run.name=demo_sft",
    "data.train=generate:nlrx",
    "data.generator_train_size=4000",
    "data.generator_test_size=300",
    "data.max_length=128",
    "tokenizer.vocab_size=1024",
    "model.arch=llama",
    "model.hidden_size=128",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.max_position_embeddings=128",
    "optim.lr=3e-3",
    "optim.weight_decay=0.1",
    "schedule.kind=cosine",
    "schedule.warmup_steps=30",
    "schedule.min_lr_ratio=0.1",
    "train.max_steps=500",
    "train.micro_batch_size=32",
    "train.eval_every=100",
    "train.log_every=10",
    "generate.max_new_tokens=64",
    "generate.batch_size=64",
]


def run_demo(*, out_dir: str = "runs", steps: int | None = None) -> dict:
    """Run the demo; returns (and prints) its summary. The demo's own run folder is recreated each time."""
    from conceptlm.eval.scorers import score
    from conceptlm.eval.stats import accuracy_ci
    from conceptlm.plots.curves import plot_curves
    from conceptlm.sft.config import SFTConfig
    from conceptlm.sft.recipe import evaluate, train

    overrides = DEMO_OVERRIDES + [f"run.out_dir={out_dir}"] + ([f"train.max_steps={steps}"] if steps else [])
    cfg = load_config(SFTConfig, None, overrides)
    if cfg.run_dir.exists():
        print(f"[demo] removing the previous demo run {cfg.run_dir}")
        shutil.rmtree(cfg.run_dir)
    print(f"[demo] training a tiny llama ({cfg.model.hidden_size}d x {cfg.model.num_layers} layers) on generated "
          f"NL-RX pairs for {cfg.train.max_steps} steps -> {cfg.run_dir}")
    res = train(cfg, command="conceptlm demo")
    print("[demo] evaluating by greedy generation on the held-out generated split")
    ev = evaluate(cfg)
    rows = [json.loads(line) for line in Path(ev["predictions"]).read_text(encoding="utf-8").splitlines()]
    semantic = [score("regex", r["prediction"], r["reference"]) for r in rows]
    s_acc, s_lo, s_hi = accuracy_ci(semantic)
    png = plot_curves({"sft": cfg.run_dir}, cfg.run_dir / "curves.png", keys=("loss",),
                      title="conceptlm demo: tiny llama, NL-RX generator")
    summary = {
        "run_dir": str(cfg.run_dir),
        "steps": res.step,
        "final_train_loss": res.last_train.get("loss"),
        "final_eval_loss": res.last_eval.get("loss"),
        "exact_match": {"accuracy": ev["accuracy"], "ci95": [ev["ci_low"], ev["ci_high"]], "n": ev["n"]},
        "semantic_regex": {"accuracy": s_acc, "ci95": [s_lo, s_hi], "n": len(semantic)},
        "predictions": ev["predictions"],
        "plot": str(png),
    }
    print("[demo] examples:")
    for r in rows[:5]:
        print(f"  {r['prompt']!r}\n    reference  {r['reference']}\n    prediction {r['prediction']}")
    print(json.dumps(summary, indent=2))
    return summary
