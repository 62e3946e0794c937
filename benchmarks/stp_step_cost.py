"""Semantic Tube Prediction step cost as ratios to NTP, arms side by side in one process on the same micro-batches.

Arms (each its own model with the same initial weights and its own AdamW), all trained through
:class:`conceptlm.jepa.stp_unit.StpUnit` the way the trainer computes a step (``prepare`` = the span draws and
coefficient rows, ``counts``, forward, parts divided by the counts, backward, clip 1.0, AdamW step):

* ``ntp``: λ = 0 (the NTP forward, :func:`conceptlm.core.hf.causal_lm_loss_sum`, no span draws);
* ``stp``: λ = 0.02, ``random_span``, one span per example (the reference's defaults);
* ``stp_pred``: ``stp`` + the linear predictor;
* ``stp_r4``: ``stp`` with 4 spans per example;
* ``curvature``: the curvature ablation.

Step s runs every arm on batch s in a rotated order, so machine noise hits all arms alike; warm-up steps are
discarded; the ratio reported is the median over steps of the per-step ratio to NTP (``paired_ratio_median``).
Foreign CPU use is read from ``/proc/stat`` per round (ratios on the clean rounds too). Collation (identical for every
arm: the LM rows) is timed apart.

    python benchmarks/stp_step_cost.py --threads 1                      # tiny Llama on SYNTH chat records
    python benchmarks/stp_step_cost.py --threads 1 --text corpus.txt    # plain-text blocks instead of chat
    python benchmarks/stp_step_cost.py --model smollm2-135m --arms ntp,stp --batch 8 --steps 10 --warmup 2

Prints one JSON object; ``checks`` holds the STP / NTP paired median against the 1.05× target.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[0].parent / "shared" / "data" / "llm_jepa" / "synth_train.jsonl"
ALL_ARMS = ("ntp", "stp", "stp_pred", "stp_r4", "curvature")
TARGET = 1.05


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="chat JSONL (default: %(default)s)")
    ap.add_argument("--text", type=Path, default=None, help="a plain-text file: train on its token blocks instead")
    ap.add_argument("--records", type=int, default=2000, help="use the first N chat records (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=40, help="measured steps per arm (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="discarded warm-up steps (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="micro-batch size (default: %(default)s)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size (default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=512, help="model context / text block (default: %(default)s)")
    ap.add_argument("--arms", default="ntp,stp,stp_pred,curvature", help=f"comma list from {', '.join(ALL_ARMS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="a pretrained model (HF folder, .gguf, or smollm2-135m) instead "
                                                  "of the tiny Llama")
    args = ap.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if any(a not in ALL_ARMS for a in args.arms) or "ntp" not in args.arms:
        ap.error(f"--arms must include ntp and come from {', '.join(ALL_ARMS)}")
    if args.steps < 1 or args.warmup < 0:
        ap.error("need --steps >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from conceptlm.core.config import OptimSection
    from conceptlm.core.hf import build_tiny_model
    from conceptlm.core.rng import StepRandomness
    from conceptlm.core.sampling import BatchPlan
    from conceptlm.core.tokenizer import train_bpe_tokenizer
    from conceptlm.core.trainer import build_optimizer
    from conceptlm.data.text import TextDataset
    from conceptlm.jepa.config import JepaSection, StpSection
    from conceptlm.jepa.stp_batch import collate_stp
    from conceptlm.jepa.stp_data import StpChatDataset, StpTextDataset
    from conceptlm.jepa.stp_unit import StpUnit

    jsc = _sibling("jepa_step_cost")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_setup = time.perf_counter()
    if args.text is None:
        records = jsc.load_records(args.data, args.records)
        texts = [m["content"] for r in records for m in r.get("messages", ()) if isinstance(m, dict)]
    else:
        from conceptlm.data.text import read_text_file

        texts = read_text_file(args.text).splitlines()
    if args.model:
        from conceptlm.core.hf import ensure_pad_token, load_causal_lm, load_tokenizer

        tok = load_tokenizer(args.model)
        pretrained = load_causal_lm(args.model).float()
        ensure_pad_token(tok, pretrained)
    else:
        tok = train_bpe_tokenizer(texts, vocab_size=args.vocab)
    if args.text is None:
        ds = StpChatDataset([r["messages"] for r in records], tok, max_length=args.max_length, name=str(args.data))
    else:
        ds = StpTextDataset(TextDataset(args.text, tok, block_size=args.max_length), source=str(args.text))
    plan = BatchPlan(ds.lengths, micro_batch_size=args.batch, grad_accum=1, seed=args.seed)
    n_steps = args.warmup + args.steps
    batch_idx = [plan.micro_batches(s % plan.steps_per_epoch)[0] for s in range(n_steps)]

    sections = {"ntp": JepaSection(objective="stp", lam=0.0), "stp": JepaSection(objective="stp"),
                "stp_pred": JepaSection(objective="stp", stp=StpSection(linear_predictor=True)),
                "stp_r4": JepaSection(objective="stp", stp=StpSection(spans_per_example=4)),
                "curvature": JepaSection(objective="stp", stp=StpSection(variant="curvature"))}
    units, opts = {}, {}
    for arm in args.arms:
        if args.model:
            import copy

            model = copy.deepcopy(pretrained)
        else:
            model = build_tiny_model("llama", len(tok), hidden_size=args.hidden, num_layers=args.layers,
                                     num_heads=args.heads, max_position_embeddings=args.max_length,
                                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, seed=args.seed)
        units[arm] = StpUnit(model, sections[arm], seed=args.seed, max_steps=n_steps).train()
        opts[arm] = build_optimizer(units[arm], OptimSection(lr=1e-3))  # the trainer's AdamW and groups
    setup_s = time.perf_counter() - t_setup

    def run_step(arm: str, s: int, batch) -> float:
        unit, opt = units[arm], opts[arm]
        t0 = time.perf_counter()
        unit.begin_step(s)
        unit.step_rng = StepRandomness(seed=args.seed, step=s)
        with torch.no_grad():
            batch = unit.prepare(batch)
        counts = unit.counts(batch)
        out = unit(batch)
        loss = sum(unit.loss_weights[k] * out[k].float() / counts[k]
                   for k in unit.loss_weights if float(counts.get(k, 0)) > 0 and k in out)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in unit.parameters() if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times = {a: [] for a in args.arms}
    coll: list[float] = []
    foreign: list[float | None] = []
    meter = jsc.CpuMeter()
    t_run = time.perf_counter()
    for s in range(n_steps):
        t0 = time.perf_counter()
        batch = collate_stp([ds[i] for i in batch_idx[s]], pad_token_id=tok.pad_token_id, pad_to_multiple_of=8)
        tc = time.perf_counter() - t0
        order = args.arms[s % len(args.arms):] + args.arms[: s % len(args.arms)]
        meter.read()
        for arm in order:
            dt = run_step(arm, s, batch)
            if s >= args.warmup:
                times[arm].append(dt)
        f = meter.read()
        if s >= args.warmup:
            foreign.append(f)
            coll.append(tc)
    run_s = time.perf_counter() - t_run

    rounds = list(range(args.steps))
    clean = [r for r in rounds if foreign[r] is not None and foreign[r] < jsc.CLEAN_FOREIGN]
    step = jsc.ratio_stats(times, rounds)
    f_known = [f for f in foreign if f is not None]
    checks = {a: {"paired_ratio_median": step[a]["paired_ratio_median"],
                  f"le_{TARGET}x": step[a]["paired_ratio_median"] <= TARGET} for a in args.arms if a != "ntp"}
    out = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "settings": {"data": str(args.text or args.data), "kind": "text" if args.text else "chat",
                     "examples": len(ds), "model": args.model or
                     f"llama d{args.hidden} L{args.layers} H{args.heads} V{len(tok)}", "precision": "fp32",
                     "device": "cpu", "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                     "arms": args.arms, "seed": args.seed,
                     "mean_tokens_per_example": statistics.fmean(ds.lengths[i] for b in batch_idx for i in b)},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "setup_s": round(setup_s, 2), "run_s": round(run_s, 2),
        "foreign_cpu": {"mean": statistics.fmean(f_known) if f_known else None,
                        "max": max(f_known) if f_known else None, "clean_rounds": len(clean)},
        "step": step,
        "step_clean_rounds": jsc.ratio_stats(times, clean) if len(clean) >= max(5, args.steps // 4) else None,
        "collate_ms_mean": 1e3 * statistics.fmean(coll),
        "checks": checks,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
