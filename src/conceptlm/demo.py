"""``conceptlm demo``: the main job on the offline defaults.

Trains two tiny Llama-architecture models from scratch on the built-in NL-RX-style generator (English description
-> regex), with the same data, batches and seed:

* ``ntp``: next-token prediction only (LLM-JEPA with λ = 0, which is the SFT baseline bit for bit);
* ``jepa``: LM loss + λ·JEPA loss (packed mode, k predictor tokens).

Each is evaluated by greedy generation on a disjoint generated test split (semantic regex equivalence and exact
match, with 95% Wilson intervals), and their training curves are plotted side by side. Everything runs offline on a
laptop CPU in a few minutes; the run folders hold configs, metrics, checkpoints, predictions and the plot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conceptlm.core.config import load_config

__all__ = ["DEMO_OVERRIDES", "DEMO_ARMS", "run_demo"]

DEMO_OVERRIDES = [
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
    "schedule.kind=cosine",
    "schedule.warmup_steps=30",
    "schedule.min_lr_ratio=0.1",
    "train.max_steps=400",
    "train.micro_batch_size=32",
    "train.eval_every=100",
    "train.log_every=10",
    "jepa.mode=packed",
    "generate.scorer=regex",
    "generate.max_new_tokens=64",
    "generate.batch_size=64",
]
DEMO_ARMS = {
    "ntp": ["jepa.lam=0", "jepa.num_predictors=0"],
    "jepa": ["jepa.lam=1", "jepa.num_predictors=1"],
}


def run_demo(*, out_dir: str = "runs", steps: int | None = None) -> dict:
    """Run the demo; returns (and prints) its summary. The demo's run folders are recreated each time."""
    from conceptlm.eval.stats import accuracy_ci
    from conceptlm.jepa.config import JepaConfig
    from conceptlm.jepa.recipe import evaluate, train
    from conceptlm.plots.curves import plot_curves

    root = Path(out_dir) / "demo"
    if root.exists():
        print(f"[demo] removing the previous demo runs in {root}")
        shutil.rmtree(root)
    summary: dict = {"arms": {}}
    for arm, extra in DEMO_ARMS.items():
        overrides = DEMO_OVERRIDES + extra + [f"run.out_dir={root}", f"run.name={arm}"]
        if steps:  # a shorter demo (e.g. a smoke test): warmup never longer than the run
            overrides += [f"train.max_steps={steps}", f"schedule.warmup_steps={min(30, steps)}"]
        cfg = load_config(JepaConfig, None, overrides)
        print(f"[demo] {arm}: tiny llama ({cfg.model.hidden_size}d x {cfg.model.num_layers} layers), "
              f"lambda={cfg.jepa.lam}, k={cfg.jepa.num_predictors}, {cfg.train.max_steps} steps -> {cfg.run_dir}")
        res = train(cfg, command=f"conceptlm demo  # arm {arm}")
        ev = evaluate(cfg)
        rows = [json.loads(line) for line in Path(ev["predictions"]).read_text(encoding="utf-8").splitlines()]
        exact = accuracy_ci([r["prediction"].strip() == r["reference"].strip() for r in rows])
        summary["arms"][arm] = {
            "lambda": cfg.jepa.lam, "k": cfg.jepa.num_predictors,
            "final_eval_lm_loss": res.last_eval.get("lm"),
            "semantic_regex_accuracy": {"value": ev["accuracy"], "ci95": [ev["ci_low"], ev["ci_high"]]},
            "exact_match": {"value": exact[0], "ci95": [exact[1], exact[2]]},
            "n_test": ev["n"], "predictions": ev["predictions"],
        }
        print(f"[demo] {arm}: semantic accuracy {100 * ev['accuracy']:.1f}% "
              f"[{100 * ev['ci_low']:.1f}, {100 * ev['ci_high']:.1f}], exact {100 * exact[0]:.1f}%")
        if arm == "jepa":
            print("[demo] examples:")
            for r in rows[:4]:
                print(f"  {r['prompt']!r}\n    reference  {r['reference']}\n    prediction {r['prediction']}")
    summary["plot"] = str(plot_curves({arm: root / arm for arm in DEMO_ARMS}, root / "curves.png",
                                      keys=("lm", "jepa"), title="conceptlm demo: NTP vs LLM-JEPA (tiny llama)"))
    print(json.dumps(summary, indent=2))
    return summary
