"""The paper's Table 3 on real multi-sentence text: every LCM variant on Yelp reviews, same budget, several seeds.

Data: ``../shared/data/llm_jepa/yelp_test.jsonl`` (2,000 reviews), prepared once (rule splitter, MiniLM, Parquet)
with a retrieval decoder over the sentences of the training reviews only (the prepared train split) -- the folders
of ``benchmarks/lcm_yelp.py`` are reused when they are up to date (``prepare`` reuses shards whose content
fingerprint matches; a decoder is reused only when its ``artifact.json`` says it learned from this folder's train
split, else it is rebuilt: decoders made before that learned from the validation reviews too). Each arm
(``lcm.model``) trains for the same number of steps on the same batches (``--steps`` x 16
documents), then ``conceptlm lcm evaluate`` measures, on all validation documents: teacher-forced ℓ2 (raw MiniLM
space), round-trip ℓ2 (retrieval decode, re-encode), contrastive accuracy, paraphrasing, and mutual information
with SmolLM2-135M as the scoring LM. Diffusion arms sample with the paper's settings (40 DDIM steps, guidance 3,
rescale 0.7, initial noise 0.6, epsilon scaling 1.00045); Quant-LCM arms pick units greedily (guidance 1).

    python benchmarks/lcm_table3.py --out runs/bench/lcm_table3.json              # all arms, seeds 0 1 2
    python benchmarks/lcm_table3.py --arms base,two_tower --seeds 0 --steps 100   # a quick look

Results are appended to ``--out`` as each run finishes (a rerun skips finished runs), then summarised as a markdown
table of mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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

REPO = Path(__file__).resolve().parents[1]
YELP = REPO.parent / "shared" / "data" / "llm_jepa" / "yelp_test.jsonl"

ARMS = {
    # same width; depth matched so every arm has 4 transformer blocks
    "base": ["lcm.model=base", "lcm.n_layers=4"],
    "one_tower": ["lcm.model=one_tower", "lcm.n_layers=4"],
    "two_tower": ["lcm.model=two_tower", "lcm.n_layers=2", "lcm.n_denoiser_layers=2"],
    "quant_c": ["lcm.model=quant_c", "lcm.n_layers=4"],
    "quant_d": ["lcm.model=quant_d", "lcm.n_layers=4"],
}
METRICS = ("l2", "l2_r", "par", "ca", "mi", "l2_prev")


def _shared(args, run_root: Path) -> list[str]:
    data = run_root / "data"
    return [f"run.out_dir={run_root}", f"prepare.out_dir={data}", f"docs.source={YELP}",
            "docs.text_field=messages.1.content", "docs.unescape=true", "prepare.max_sentences=32",
            "prepare.val_fraction=0.1", "decoder_train.max_sentences=100000", f"decoder.path={args.decoder}",
            "lcm.d_model=256", "lcm.d_ff=768", "lcm.dropout=0.1", "lcm.max_sentences=32",
            f"lcm.quant.n_codebooks={args.codebooks}", f"lcm.quant.codebook_size={args.codebook_size}",
            f"train.max_steps={args.steps}", "train.eval_every=0", "train.micro_batch_size=16",
            f"schedule.warmup_steps={min(50, args.steps // 4)}", "optim.lr=5e-4", "train.progress=false",
            "run.resume=auto",
            "evaluate.documents=1000", f"evaluate.mi_sentences={args.mi_sentences}", "evaluate.generate_documents=0",
            "evaluate.fragility_sentences=0", f"evaluate.mi_model={args.mi_model or 'null'}"]


def _clean_decoder(decoder: Path, data: Path) -> bool:
    """The decoder at ``decoder`` learned from the train split of the prepared folder ``data`` (its manifest)."""
    from conceptlm.core.artifact import fingerprint_of
    from conceptlm.core.errors import ConceptLMError
    from conceptlm.lcm.decoders import decoder_manifest

    try:
        manifest = decoder_manifest(decoder)
        return bool(manifest) and manifest["data"].get("split") == "train" and \
            manifest["data"].get("prepared") == fingerprint_of(data)
    except (ConceptLMError, KeyError):
        return False


def _summary(rows: list[dict]) -> str:
    lines = ["| arm | params | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for arm in ARMS:
        runs = [r for r in rows if r["arm"] == arm]
        if not runs:
            continue
        cells = []
        for m in METRICS:
            vals = [r["metrics"][m] for r in runs if r["metrics"].get(m) is not None]
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}")
        lines.append(f"| {arm} (n={len(runs)}) | {runs[0]['params'] / 1e6:.2f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--root", default="runs/bench/lcm_table3")
    ap.add_argument("--data", default="runs/bench/lcm_yelp/data", help="prepared Yelp folder (made if missing)")
    ap.add_argument("--decoder", default="runs/bench/lcm_yelp/decoder", help="retrieval decoder (made if missing)")
    ap.add_argument("--codebooks", type=int, default=8)
    ap.add_argument("--codebook-size", type=int, default=256)
    ap.add_argument("--mi-model", default="smollm2-135m")
    ap.add_argument("--mi-sentences", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench/lcm_table3.json")
    args = ap.parse_args()
    if not YELP.is_file():
        raise SystemExit(f"{YELP} not found (the shared data folder is needed)")
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    shared = _shared(args, root)
    shared[1] = f"prepare.out_dir={args.data}"
    base_cfg = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml",
                           shared + ["run.name=prepare", "prepare.on_change=rebuild"])
    recipe.prepare(base_cfg)  # reuses every shard that is up to date
    if Path(args.decoder).exists() and not _clean_decoder(Path(args.decoder), Path(args.data)):
        print(f"{args.decoder}: not a decoder of this folder's training documents: rebuilding it", flush=True)
        shutil.rmtree(args.decoder)
    if not Path(args.decoder).exists():
        dec_cfg = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml",
                              [s for s in shared if not s.startswith("decoder.path")] + ["run.name=decoder_run"])
        recipe.train_decoder(dec_cfg)
        Path(args.decoder).parent.mkdir(parents=True, exist_ok=True)
        os.replace(dec_cfg.decoder_dir, args.decoder)
    out = Path(args.out)
    state = json.loads(out.read_text()) if out.is_file() else {"command": None, "rows": []}
    state["command"] = ("python benchmarks/lcm_table3.py --arms " + args.arms + " --seeds "
                        + " ".join(map(str, args.seeds)) + f" --steps {args.steps}")
    done = {(r["arm"], r["seed"], r["steps"]) for r in state["rows"]}
    for seed in args.seeds:
        for arm in args.arms.split(","):
            if (arm, seed, args.steps) in done:
                continue
            over = shared + ARMS[arm] + [f"run.name={arm}_s{seed}_n{args.steps}", f"train.seed={seed}"]
            cfg = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml", over)
            t0 = time.perf_counter()
            res = recipe.train(cfg)
            t_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            ev = recipe.evaluate(cfg)
            t_eval = time.perf_counter() - t0
            run = recipe.load_run(cfg, need_decoder=False)
            tf = ev["teacher_forced"]
            row = {"arm": arm, "seed": seed, "steps": args.steps, "final_step": res.step,
                   "params": sum(p.numel() for p in run.model.parameters()),
                   "metrics": {**{k: tf.get(k) for k in ("l2", "l2_r", "par", "ca", "cos", "l2_prev")},
                               "mi": ev.get("mi")},
                   "train_s": round(t_train, 1), "eval_s": round(t_eval, 1), "documents": ev["documents"]}
            state["rows"].append(row)
            state["table"] = _summary(state["rows"])
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps(state, indent=2) + "\n")
            print(json.dumps(row), flush=True)
    print(_summary(state["rows"]))


if __name__ == "__main__":
    main()
