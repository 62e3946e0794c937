"""Base-LCM on real multi-sentence text: Yelp reviews (``../shared/data/llm_jepa/yelp_test.jsonl``, 2000 reviews).

The whole ``conceptlm lcm`` workflow on ``configs/lcm/tiny_cpu.yaml`` with the reviews as documents: ``prepare``
(rule splitter, MiniLM, Parquet; shards that are up to date are reused, others rebuilt), ``train-decoder`` (a
retrieval bank over the sentences of the training reviews only: the prepared train split), ``train``
(Base-LCM), ``evaluate`` (teacher-forced ℓ2 vs the copy-previous baseline, contrastive accuracy, paraphrasing,
round-trip ℓ2, MI with SmolLM2-135M as the scoring LM, and ROUGE-L / OVL-3 / REP-4 of continuations), then
generation speed with and without the KV cache on the validation documents (same outputs checked).

    python benchmarks/lcm_yelp.py                                   # ~10 minutes on 2 CPU cores
    python benchmarks/lcm_yelp.py --steps 2000 --out runs/bench/lcm_yelp.json train.micro_batch_size=32

Extra ``key=value`` arguments are config overrides. Prints (and writes with ``--out``) one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CONCEPTLM_NO_PROGRESS", "1")

import torch  # noqa: E402

from conceptlm.core.config import load_config  # noqa: E402
from conceptlm.core.io import atomic_write_text  # noqa: E402
from conceptlm.lcm import recipe  # noqa: E402
from conceptlm.lcm.config import LCMConfig  # noqa: E402
from conceptlm.lcm.generate import generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
YELP = REPO.parent / "shared" / "data" / "llm_jepa" / "yelp_test.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/bench/lcm_yelp")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--mi-model", default="smollm2-135m", help="scoring LM for MI ('' = skip MI)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if not YELP.is_file():
        raise SystemExit(f"{YELP} not found (the shared data folder is needed)")
    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    overrides = [f"run.out_dir={run.parent}", f"run.name={run.name}", f"prepare.out_dir={run}/data",
                 f"docs.source={YELP}", "docs.text_field=messages.1.content", "docs.unescape=true",
                 "prepare.max_sentences=32", "prepare.val_fraction=0.1", "lcm.d_model=256", "lcm.n_layers=4",
                 "lcm.d_ff=768", "lcm.dropout=0.1", f"train.max_steps={args.steps}", "train.eval_every=250",
                 "train.micro_batch_size=16", "schedule.warmup_steps=100", "optim.lr=5e-4", "run.resume=auto",
                 "evaluate.documents=200", "evaluate.generate_documents=32", "evaluate.mi_sentences=200",
                 "decoder_train.max_sentences=100000", "train.progress=false", "prepare.on_change=rebuild",
                 "decoder_train.on_change=rebuild",
                 f"evaluate.mi_model={args.mi_model or 'null'}", *args.overrides]
    cfg = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml", overrides)
    res: dict = {"command": "python benchmarks/lcm_yelp.py " + " ".join(
        [f"--steps {args.steps}"] + args.overrides), "data": str(YELP)}
    t = time.perf_counter()
    res["prepare"] = recipe.prepare(cfg)
    res["prepare"]["wall_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    dec = recipe.train_decoder(cfg)  # an identical bank is reused; an older (leaky) one is rebuilt
    res["decoder_eval"] = dec.last_eval
    res["decoder_wall_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    tr = recipe.train(cfg)
    res["train"] = {"step": tr.step, "wall_s": round(time.perf_counter() - t, 1), "last_eval": tr.last_eval}
    t = time.perf_counter()
    res["evaluate"] = recipe.evaluate(cfg)
    res["evaluate"]["wall_s"] = round(time.perf_counter() - t, 1)
    res["generate"] = recipe.generate(cfg, output=str(run / "generate_examples.json"))

    # generation speed: the same validation prompts, with and without the KV cache (no decoding)
    loaded = recipe.load_run(cfg, need_decoder=False)
    docs = recipe._validation_documents(cfg, 64)
    prompts = [d["vectors"][:4] for d in docs if len(d["vectors"]) > 5]
    eot = recipe._eot(cfg, loaded.encoder)
    speed = {}
    outs = {}
    for cached in (True, False):
        opts = cfg.generate.options()
        opts.use_cache, opts.max_new_sentences = cached, 16
        opts.eos_threshold = opts.repetition_threshold = None  # every document generates 16 sentences
        generate(loaded.model, prompts[:2], eot=eot, options=opts)  # warm-up
        t = time.perf_counter()
        outs[cached] = generate(loaded.model, prompts, eot=eot, options=opts)
        secs = time.perf_counter() - t
        n = sum(len(o.vectors) for o in outs[cached])
        speed["cached" if cached else "uncached"] = {"sentences": n, "seconds": round(secs, 3),
                                                     "sentences_per_s": round(n / secs, 1)}
    diff = max(float((a.vectors - b.vectors).abs().max()) for a, b in zip(outs[True], outs[False]))
    speed["max_abs_diff"] = diff
    speed["speedup"] = round(speed["cached"]["sentences_per_s"] / speed["uncached"]["sentences_per_s"], 2)
    res["generation_speed"] = speed
    text = json.dumps(res, indent=2, ensure_ascii=False, default=str)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
