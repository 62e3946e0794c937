"""``conceptlm demo``: the main job on the offline defaults, one part per method.

* **LLM-JEPA**: two tiny Llama-architecture models trained from scratch on the built-in NL-RX-style generator
  (English description -> regex), with the same data, batches and seed: ``ntp`` (next-token prediction only, LLM-JEPA
  with λ = 0, the SFT baseline bit for bit) and ``jepa`` (LM loss + λ·JEPA loss, packed mode). Each is evaluated by
  greedy generation on a disjoint test split (semantic regex equivalence and exact match, 95% Wilson intervals);
  their training curves are plotted side by side.
* **CoCoMix**: tiny teacher -> TopK SAE -> cached attribution labels -> NTP and CoCoMix students, with the report
  table (validation loss vs tokens and FLOPs).
* **Base-LCM**: generated stories segmented into sentences, embedded with MiniLM, a Base-LCM trained on the
  sentence vectors, continuations of validation documents decoded by nearest-neighbour retrieval, and the
  teacher-forced / text metrics.

Everything runs offline on a laptop CPU; the run folders hold configs, metrics, checkpoints, predictions and plots.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conceptlm.core.config import load_config

__all__ = ["DEMO_OVERRIDES", "DEMO_ARMS", "COCOMIX_DEMO_OVERRIDES", "LCM_DEMO_OVERRIDES",
           "LCM_DIFFUSION_DEMO_OVERRIDES", "run_demo"]

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


COCOMIX_DEMO_OVERRIDES = [
    "corpus.source=generated", "corpus.n_documents=1500", "corpus.window=64",
    "teacher.layer=1", "teacher.arch=llama", "teacher.hidden_size=96", "teacher.num_layers=3", "teacher.num_heads=4",
    "teacher.steps=300", "teacher.vocab_size=512", "teacher.lr=3e-3",
    "sae.n_latents=512", "sae.k=8", "sae.steps=150", "sae.batch_size=16", "sae.lr=1e-3",
    "labels.k_attr=4", "cocomix.k_attr=4", "cocomix.lam=0.1",
    "student.style=gpt2", "student.d_model=96", "student.n_layers=3", "student.n_heads=4", "student.max_len=64",
    "student.insert_layer=1", "student.n_concepts=512", "student.concept_k=8", "student.mix=interleave",
    "pipeline.arms=[ntp,cocomix]", "optim.lr=2e-3", "schedule.kind=cosine", "schedule.warmup_steps=10",
    "schedule.min_lr_ratio=0.1", "train.max_steps=200", "train.micro_batch_size=16", "train.eval_every=50",
    "train.log_every=10",
]
"""A smaller ``configs/cocomix/tiny_cpu.yaml`` (spelled out: the demo needs no config file), about two minutes
on 2 CPU cores."""


LCM_DEMO_OVERRIDES = [
    "docs.source=generated", "docs.n_documents=300", "segment.backend=rule", "encoder.name=minilm",
    "prepare.shard_size=100", "prepare.max_sentences=32", "prepare.val_fraction=0.1",
    "lcm.dim=384", "lcm.d_model=128", "lcm.n_layers=2", "lcm.n_heads=4", "lcm.d_ff=384", "lcm.dropout=0",
    "lcm.max_sentences=32", "lcm_data.source=prepared", "decoder.kind=retrieval",
    "decoder_train.eval_sentences=64", "decoder_train.decode_eval=64", "generate.prompt_sentences=4",
    "generate.documents=2", "generate.max_new_sentences=8", "evaluate.documents=30", "evaluate.generate_documents=8",
    "optim.lr=1e-3", "optim.weight_decay=0.01", "schedule.kind=cosine", "schedule.warmup_steps=20",
    "train.max_steps=300", "train.micro_batch_size=16", "train.eval_every=100", "train.log_every=20",
]
"""A smaller ``configs/lcm/tiny_cpu.yaml`` (spelled out: the demo needs no config file), about a minute and a half
on 2 CPU cores, most of it embedding sentences with MiniLM."""


def run_demo(*, out_dir: str = "runs", steps: int | None = None) -> dict:
    """Run the demo (LLM-JEPA, CoCoMix, Base-LCM); returns (and prints) its summary. Its run folders are recreated each
    time."""
    root = Path(out_dir) / "demo"
    if root.exists():
        print(f"[demo] removing the previous demo runs in {root}")
        shutil.rmtree(root)
    summary = {"jepa": _jepa_demo(root, steps), "cocomix": _cocomix_demo(root, steps),
               "lcm": _lcm_demo(root, steps)}
    print(json.dumps(summary, indent=2))
    return summary


def _cocomix_demo(root: Path, steps: int | None) -> dict:
    """Tiny teacher -> SAE -> cached concept labels -> NTP and CoCoMix students, with the report table."""
    from conceptlm.cocomix.config import CocomixConfig
    from conceptlm.cocomix.pipeline import pipeline

    overrides = COCOMIX_DEMO_OVERRIDES + [f"run.out_dir={root}", "run.name=cocomix"]
    if steps:  # a smoke run: every stage as short as the students
        overrides += [f"train.max_steps={steps}", f"teacher.steps={steps}", f"sae.steps={steps}",
                      f"schedule.warmup_steps={min(10, steps)}", f"teacher.warmup_steps={min(10, steps)}",
                      f"train.eval_every={steps}", "corpus.n_documents=300"]
    cfg = load_config(CocomixConfig, None, overrides)
    print(f"[demo] cocomix: tiny teacher ({cfg.teacher.hidden_size}d x {cfg.teacher.num_layers}) -> TopK SAE "
          f"({cfg.sae.n_latents} latents, k={cfg.sae.k}) on block {cfg.teacher.layer} -> attribution labels -> "
          f"students {cfg.pipeline.arms}, {cfg.train.max_steps} steps -> {cfg.run_dir}")
    res = pipeline(cfg, command="conceptlm demo  # cocomix")
    print(Path(res["report"]["markdown"]).read_text(encoding="utf-8"))
    arms = res["report"]["arms"]
    return {"report": res["report"]["markdown"], "plots": res["report"].get("plots", []),
            "final_val_loss": {a: v["final_val_loss"] for a, v in arms.items()},
            "tokens_fraction_of_ntp": {a: v["tokens_fraction_of_baseline"] for a, v in arms.items()}}


LCM_DIFFUSION_DEMO_OVERRIDES = [
    "lcm.model=two_tower", "lcm.n_layers=2", "lcm.n_denoiser_layers=2", "generate.diffusion.inference_steps=20",
    "train.eval_every=0", "evaluate.documents=16", "evaluate.generate_documents=4", "evaluate.fragility_sentences=0",
]
"""The demo's diffusion part: a Two-Tower LCM of the same width on the same data (20 DDIM steps at generation)."""


def _lcm_demo(root: Path, steps: int | None) -> dict:
    """Generated stories -> MiniLM sentence embeddings -> Base-LCM and a Two-Tower diffusion LCM -> decoded
    continuations and Table 3 metrics."""
    from conceptlm.lcm import recipe
    from conceptlm.lcm.config import LCMConfig

    overrides = LCM_DEMO_OVERRIDES + [f"run.out_dir={root}", "run.name=lcm", f"prepare.out_dir={root}/lcm/data"]
    if steps:
        overrides += [f"train.max_steps={steps}", f"schedule.warmup_steps={min(20, steps)}",
                      f"train.eval_every={steps}", "docs.n_documents=60", "evaluate.documents=6",
                      "evaluate.generate_documents=2"]
    cfg = load_config(LCMConfig, None, overrides)
    print(f"[demo] lcm: {cfg.docs.n_documents} generated documents -> sentences ({cfg.segment.backend} splitter) -> "
          f"{cfg.encoder.name} embeddings -> Base-LCM ({cfg.lcm.d_model}d x {cfg.lcm.n_layers}), "
          f"{cfg.train.max_steps} steps -> {cfg.run_dir}")
    command = "conceptlm demo  # lcm"
    prep = recipe.prepare(cfg)
    recipe.train_decoder(cfg, command=command)
    res = recipe.train(cfg, command=command)
    print("[demo] lcm: continuations of validation documents (decoded by nearest-neighbour retrieval):")
    gen = recipe.generate(cfg)
    ev = recipe.evaluate(cfg)
    tf = ev["teacher_forced"]
    print(f"[demo] lcm: teacher-forced l2 {tf['l2']:.3f} vs copy-previous {tf['l2_prev']:.3f}, contrastive accuracy "
          f"{tf['ca']:.3f}, round-trip l2 {tf.get('l2_r', float('nan')):.3f}; continuations ROUGE-L "
          f"{ev.get('generation', {}).get('rouge_l', float('nan')):.3f}")
    out = {"sentences": prep["n_sentences"], "checkpoint": str(res.checkpoint), "teacher_forced": tf,
           "generation": {k: v for k, v in ev.get("generation", {}).items() if k != "example"},
           "generate": gen["output"], "evaluate": ev["output"]}
    # a diffusion LCM on the same sentences and decoder: Two-Tower, sampled with DDIM and classifier-free guidance
    diff = load_config(LCMConfig, None, overrides + LCM_DIFFUSION_DEMO_OVERRIDES
                       + ["run.name=lcm_two_tower", f"decoder.path={cfg.decoder_dir}"])
    print(f"[demo] lcm: Two-Tower diffusion LCM (contextualizer {diff.lcm.n_layers} + denoiser "
          f"{diff.lcm.n_denoiser_layers} blocks, {diff.lcm.diffusion.num_train_steps} noise levels, CFG dropout "
          f"{diff.lcm.diffusion.cfg_dropout}), {diff.train.max_steps} steps -> {diff.run_dir}")
    res2 = recipe.train(diff, command=command + " two_tower")
    d = diff.generate.diffusion
    print(f"[demo] lcm: Two-Tower continuations ({d.inference_steps} DDIM steps, guidance {d.guidance_scale}, "
          f"rescale {d.guidance_rescale}, initial noise {d.initial_noise_scale}):")
    gen2 = recipe.generate(diff)
    ev2 = recipe.evaluate(diff)
    tf2 = ev2["teacher_forced"]
    print(f"[demo] lcm: Two-Tower teacher-forced l2 {tf2['l2']:.3f} vs copy-previous {tf2['l2_prev']:.3f}, "
          f"contrastive accuracy {tf2['ca']:.3f}, round-trip l2 {tf2.get('l2_r', float('nan')):.3f}")
    out["two_tower"] = {"checkpoint": str(res2.checkpoint), "teacher_forced": tf2, "generate": gen2["output"],
                        "evaluate": ev2["output"]}
    return out


def _jepa_demo(root: Path, steps: int | None) -> dict:
    """Two tiny Llamas (NTP, LLM-JEPA) on the NL-RX generator, scored by greedy generation."""
    from conceptlm.eval.stats import accuracy_ci
    from conceptlm.jepa.config import JepaConfig
    from conceptlm.jepa.recipe import evaluate, train
    from conceptlm.plots.curves import plot_curves

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
    return summary
