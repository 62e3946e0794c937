"""LLM-JEPA step cost as ratios to NTP, all arms side by side in one process on the same micro-batches.

Arms (each its own tiny Llama with the same initial weights and its own AdamW), all trained through
:class:`conceptlm.jepa.unit.JepaUnit` the way the trainer computes a step (parts summed, divided by the counts,
backward, grad clipping, AdamW step):

* ``ntp``: λ = 0 (plain SFT, the LM rows only);
* ``separate``: k = 1, three forwards (LM, Text, Code);
* ``packed``: k = 1, one forward over ``[F | R_T | C]`` rows with the tree mask;
* ``packed_r25``: ``packed`` with ``jepa_ratio = 0.25`` (per-step draw by ``jepa_step_active``);
* ``packed_k0``: packed with k = 0 (drop it with ``--arms``).

Every arm sees the same example sets (one ``BatchPlan`` over the LM lengths). Step s runs every arm on batch s in a
rotated order, so machine noise hits all arms alike; warm-up steps are discarded. Collation is timed apart from the
step. Foreign CPU use (other processes) is read from ``/proc/stat`` per round; ratios are also given on the clean
rounds only.

Token-count bounds: packed (LM + |R_T| + Code up to Enc) / LM tokens, separate (LM + Text + Code) / LM tokens.
Padding waste: token slots processed / real tokens, per arm, and for a fixed-512 padding reference.

    python benchmarks/jepa_step_cost.py                       # defaults: 2000 records, 40 steps + 5 warm-up
    python benchmarks/jepa_step_cost.py --text-view user_only --steps 60
    python benchmarks/jepa_step_cost.py --threads 1            # steadier when other processes share the cores
    python benchmarks/jepa_step_cost.py --model smollm2-135m --arms ntp,packed --batch 8 --steps 10 --warmup 2

Prints one JSON object. Read ``checks`` (packed vs its bound and 1.6x, on the paired median of per-step ratios),
``step`` (and ``step_clean_rounds``), ``token_bound`` and ``padding``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llm_jepa" / "synth_train.jsonl"
ALL_ARMS = ("ntp", "separate", "packed", "packed_r25", "packed_k0")
CLEAN_FOREIGN = 0.10  # a round is "clean" when other processes used less than this fraction of the CPUs


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="chat JSONL (default: %(default)s)")
    ap.add_argument("--records", type=int, default=2000, help="use the first N records (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=40, help="measured steps per arm (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="discarded warm-up steps (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="micro-batch size (default: %(default)s)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size (default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=512, help="model context (default: %(default)s)")
    ap.add_argument("--pad-to-multiple-of", type=int, default=8, help="as the recipe (default: %(default)s)")
    ap.add_argument("--text-view", choices=("context", "user_only"), default="context")
    ap.add_argument("--arms", default=",".join(ALL_ARMS), help=f"comma list from {', '.join(ALL_ARMS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None,
                    help="a pretrained model instead of the tiny Llama: HF folder, .gguf or a named offline model "
                         "(smollm2-135m); its own tokenizer and chat template are used (--vocab/--hidden/... ignored)")
    args = ap.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ALL_ARMS]
    if bad or "ntp" not in arms:
        ap.error(f"--arms must include ntp and come from {', '.join(ALL_ARMS)}; got {args.arms!r}")
    args.arms = arms
    if args.steps < 1 or args.warmup < 0 or args.records < args.batch:
        ap.error("need --steps >= 1, --warmup >= 0 and --records >= --batch")
    return args


class CpuMeter:
    """Fraction of all CPUs used by OTHER processes between two ``read()`` calls (from /proc/stat)."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.ncpu = os.cpu_count() or 1
        self.ok = Path("/proc/stat").is_file()
        self._last = self._sample()

    def _sample(self):
        busy = 0.0
        if self.ok:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(v[:8]) - v[3] - v[4]) / self.hz  # all but idle and iowait (guest is inside user)
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system

    def read(self) -> float | None:
        now = self._sample()
        (w0, b0, o0), (w1, b1, o1) = self._last, now
        self._last = now
        if not self.ok or w1 <= w0:
            return None
        return max(0.0, ((b1 - b0) - (o1 - o0)) / (self.ncpu * (w1 - w0)))


def load_records(path: Path, n: int) -> list[dict]:
    from conceptlm.core.errors import DataError
    from conceptlm.data.chat import iter_jsonl_objects

    if not path.is_file():
        sys.exit(f"error: {path} not found. The LLM-JEPA synthetic data lives in ../shared/data/llm_jepa/ next to "
                 "the repository; pass --data FILE (chat JSONL with a 'messages' list per line).")
    try:
        records = [rec for _, rec in iter_jsonl_objects(path, limit=n)]
    except DataError as e:
        sys.exit(f"error: {e}")
    if len(records) < n:
        print(f"warning: {path} has only {len(records)} records (asked for {n})", file=sys.stderr)
    return records


def token_bounds(examples) -> dict:
    """Token-count bounds over a list of JepaExample: tokens one JEPA step processes per LM token."""
    lm = sum(len(ex.lm_ids) for ex in examples)
    packed = sum(ex.packed_len for ex in examples)
    sep = sum(len(ex.lm_ids) + len(ex.text_ids) + len(ex.code_ids) for ex in examples)
    return {"lm_tokens": lm, "packed_tokens": packed, "separate_tokens": sep, "packed_bound": packed / lm,
            "separate_bound": sep / lm,
            "mean_lm_len": lm / len(examples), "mean_text_remainder": sum(len(ex.text_remainder) for ex in examples)
            / len(examples), "mean_code_block": sum(ex.code_enc + 1 for ex in examples) / len(examples)}


def ratio_stats(times: dict[str, list[float]], rounds: list[int]) -> dict:
    """Median/mean step time per arm over ``rounds`` and ratios to NTP (mean/mean, median/median, paired)."""
    out = {}
    ntp = [times["ntp"][r] for r in rounds]
    for arm, ts in times.items():
        sel = [ts[r] for r in rounds]
        paired = [a / b for a, b in zip(sel, ntp)]
        out[arm] = {"median_ms": 1e3 * statistics.median(sel), "mean_ms": 1e3 * statistics.fmean(sel),
                    "ratio_mean": statistics.fmean(sel) / statistics.fmean(ntp),
                    "ratio_median": statistics.median(sel) / statistics.median(ntp),
                    "paired_ratio_median": statistics.median(paired), "paired_ratio_mean": statistics.fmean(paired)}
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from conceptlm.core.config import OptimSection
    from conceptlm.core.errors import DataError
    from conceptlm.core.hf import build_tiny_model
    from conceptlm.core.sampling import BatchPlan
    from conceptlm.core.tokenizer import train_bpe_tokenizer
    from conceptlm.core.trainer import build_optimizer
    from conceptlm.jepa.config import JepaSection, ViewConfig
    from conceptlm.jepa.data import JepaDataset
    from conceptlm.jepa.packing import collate_packed, collate_separate, pad_sequences
    from conceptlm.jepa.unit import JepaUnit, jepa_step_active
    from conceptlm.jepa.views import predictor_token

    if args.threads:
        torch.set_num_threads(args.threads)
    t_setup = time.perf_counter()
    records = load_records(args.data, args.records)
    texts = [m["content"] for r in records for m in r.get("messages", ()) if isinstance(m, dict)
             and isinstance(m.get("content"), str)]
    if args.model:
        from conceptlm.core.hf import ensure_pad_token, load_causal_lm, load_tokenizer
        from conceptlm.jepa.views import add_predictor_tokens

        tok = load_tokenizer(args.model)
        pretrained = load_causal_lm(args.model).float()
        ensure_pad_token(tok, pretrained)
        add_predictor_tokens(tok, pretrained, 1)
    else:
        tok = train_bpe_tokenizer(texts, vocab_size=args.vocab, extra_special_tokens=[predictor_token(1)])
    try:
        datasets = {k: JepaDataset(records, tok, ViewConfig(num_predictors=k, text_view=args.text_view),
                                   max_length=args.max_length, name=str(args.data))
                    for k in ((1, 0) if "packed_k0" in args.arms else (1,))}
    except DataError as e:
        sys.exit(f"error: {e}")
    ds = datasets[1]
    for k, other in datasets.items():  # the LM sequence does not depend on k: same examples, same order
        assert [ex.lm_ids for ex in other.examples] == [ex.lm_ids for ex in ds.examples], k
    plan = BatchPlan([len(ex.lm_ids) for ex in ds.examples], micro_batch_size=args.batch, grad_accum=1,
                     seed=args.seed)
    n_steps = args.warmup + args.steps
    if n_steps > plan.steps_per_epoch:
        print(f"note: {n_steps} steps > {plan.steps_per_epoch} batches per epoch; batches repeat", file=sys.stderr)
    batch_idx = [plan.micro_batches(s)[0] for s in range(n_steps)]
    pad = dict(pad_token_id=tok.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of)

    def collate(arm: str, idx):
        if arm == "separate":
            return collate_separate([ds[i] for i in idx], **pad)
        return collate_packed([datasets[0 if arm == "packed_k0" else 1][i] for i in idx], **pad)

    sections = {"ntp": JepaSection(lam=0.0), "separate": JepaSection(mode="separate"), "packed": JepaSection(),
                "packed_r25": JepaSection(jepa_ratio=0.25), "packed_k0": JepaSection(num_predictors=0)}
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
        units[arm] = JepaUnit(model, sections[arm], seed=args.seed).train()
        opts[arm] = build_optimizer(units[arm], OptimSection(lr=1e-3))  # the trainer's AdamW and groups
    setup_s = time.perf_counter() - t_setup

    def run_step(arm: str, s: int, batch) -> tuple[float, dict]:
        unit, opt = units[arm], opts[arm]
        t0 = time.perf_counter()
        unit.begin_step(s)
        counts = unit.counts(batch)
        out = unit(batch)
        loss = sum(unit.loss_weights[k] * out[k].float() / counts[k]
                   for k in unit.loss_weights if counts.get(k, 0) > 0 and k in out)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in unit.parameters() if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        return dt, {"loss": float(loss.detach()), "jepa": "jepa" in out}

    def processed(arm: str, batch, active: bool) -> tuple[int, int]:
        """(slots, real tokens) the arm's step processed on this batch."""
        if arm == "ntp" or not active:
            return batch.lm.slots, batch.lm.real_tokens
        return batch.slots, batch.real_tokens

    times = {a: [] for a in args.arms}
    coll = {a: [] for a in args.arms}
    slots = {a: [0, 0] for a in args.arms}
    active_steps = {a: 0 for a in args.arms}
    losses = {a: [] for a in args.arms}
    foreign: list[float | None] = []
    meter = CpuMeter()
    t_run = time.perf_counter()
    for s in range(n_steps):
        order = args.arms[s % len(args.arms):] + args.arms[: s % len(args.arms)]
        meter.read()
        for arm in order:
            t0 = time.perf_counter()
            if arm == "ntp":  # time what an SFT run collates (the LM rows only); the unit reads batch.lm
                pad_sequences([ds[i].lm_ids for i in batch_idx[s]], labels=[ds[i].lm_labels for i in batch_idx[s]],
                              **pad)
                tc = time.perf_counter() - t0
                batch = collate(arm, batch_idx[s])
            else:
                batch = collate(arm, batch_idx[s])
                tc = time.perf_counter() - t0
            dt, info = run_step(arm, s, batch)
            if s >= args.warmup:
                times[arm].append(dt)
                coll[arm].append(tc)
                sl, real = processed(arm, batch, info["jepa"])
                slots[arm][0] += sl
                slots[arm][1] += real
                active_steps[arm] += int(info["jepa"])
                losses[arm].append(info["loss"])
        f = meter.read()
        if s >= args.warmup:
            foreign.append(f)
    run_s = time.perf_counter() - t_run

    rounds = list(range(args.steps))
    clean = [r for r in rounds if foreign[r] is not None and foreign[r] < CLEAN_FOREIGN]
    step_all = ratio_stats(times, rounds)
    with_coll = ratio_stats({a: [t + c for t, c in zip(times[a], coll[a])] for a in args.arms}, rounds)

    measured = [ds[i] for s in range(args.warmup, n_steps) for i in batch_idx[s]]
    b1 = token_bounds(measured)
    bounds = {"ntp": 1.0, "separate": b1["separate_bound"], "packed": b1["packed_bound"]}
    if "packed_r25" in args.arms:
        draws = [jepa_step_active(args.seed, s, 0.25) for s in range(args.warmup, n_steps)]
        assert sum(draws) == active_steps["packed_r25"], "the unit's per-step draw differs from jepa_step_active"
        bounds["packed_r25"] = 1.0 + sum(draws) / args.steps * (b1["packed_bound"] - 1.0)
        if "packed" in args.arms:  # what the r25 arm should cost: the packed step on drawn steps, NTP otherwise
            mix = [times["packed"][r] if d else times["ntp"][r] for r, d in enumerate(draws)]
            step_all["packed_r25"]["expected_ratio_mean_from_arms"] = statistics.fmean(mix) / statistics.fmean(
                times["ntp"])
    if "packed_k0" in args.arms:
        bounds["packed_k0"] = token_bounds([datasets[0][i] for s in range(args.warmup, n_steps)
                                            for i in batch_idx[s]])["packed_bound"]
    lm_real = sum(len(ex.lm_ids) for ex in measured)
    sep_real = b1["separate_tokens"]
    padding = {a: {"slots": slots[a][0], "real_tokens": slots[a][1], "slots_per_real": slots[a][0] / slots[a][1]}
               for a in args.arms}
    padding["fixed512_lm"] = {"slots": args.max_length * len(measured), "real_tokens": lm_real,
                              "slots_per_real": args.max_length * len(measured) / lm_real}
    padding["fixed512_reference_3pass"] = {"slots": 3 * args.max_length * len(measured), "real_tokens": sep_real,
                                           "slots_per_real": 3 * args.max_length * len(measured) / sep_real}

    checks = {}
    if "packed" in args.arms:  # the paired median resists noise spikes; ratio_mean is in "step"
        r, bnd = step_all["packed"]["paired_ratio_median"], bounds["packed"]
        checks = {"statistic": "packed paired_ratio_median", "packed_ratio": r, "packed_bound": bnd,
                  "packed_ratio_over_bound": r / bnd, "packed_le_1.6x_ntp": r <= 1.6,
                  "packed_within_10pct_of_bound": r <= 1.1 * bnd,
                  "packed_slots_per_real_le_1.15": padding["packed"]["slots_per_real"] <= 1.15}
    f_known = [f for f in foreign if f is not None]
    out = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "settings": {"data": str(args.data), "records": len(records), "examples": len(ds), "text_view":
                     args.text_view,
                     "model": args.model or f"llama d{args.hidden} L{args.layers} H{args.heads} V{len(tok)}",
                     "precision": "fp32", "device": "cpu", "batch": args.batch, "pad_to_multiple_of":
                     args.pad_to_multiple_of, "steps": args.steps, "warmup": args.warmup, "arms": args.arms,
                     "seed": args.seed, "optimizer": "AdamW lr 1e-3 betas (0.9, 0.95) wd 0.1, clip 1.0"},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "setup_s": round(setup_s, 2), "run_s": round(run_s, 2),
        "foreign_cpu": {"mean": statistics.fmean(f_known) if f_known else None,
                        "max": max(f_known) if f_known else None, "clean_rounds": len(clean),
                        "clean_threshold": CLEAN_FOREIGN},
        "step": step_all,
        "step_clean_rounds": ratio_stats(times, clean) if len(clean) >= max(5, args.steps // 4) else None,
        "step_plus_collate": with_coll,
        "collate_ms_mean": {a: 1e3 * statistics.fmean(coll[a]) for a in args.arms},
        "jepa_active_steps": active_steps,
        "token_bound": bounds,
        "token_stats_measured": b1,
        "token_stats_dataset": token_bounds(ds.examples),
        "padding": padding,
        "checks": checks,
        "final_loss": {a: losses[a][-1] for a in args.arms},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
