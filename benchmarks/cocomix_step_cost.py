"""Training-step time of a CoCoMix student (concept labels given, i.e. cached) with ``mix=add`` and
``mix=interleave`` against an NTP step of the same student, next to the analytic FLOP bound of each.

    python benchmarks/cocomix_step_cost.py                       # d=128, 4 layers, T=256, B=8, C in {4096, 32768}
    python benchmarks/cocomix_step_cost.py --concepts 4096 --repeats 9 --threads 2

A step is what the loop does per optimizer step: forward of the unit, ``ntp + lam * concept`` normalised by the
counts, backward, AdamW update, zero_grad. Arms run round-robin (one step of each per round) so machine noise hits
them alike; the median over rounds is reported, and the median over rounds of the time ratio to the NTP step of the same
round (``paired_ratio_vs_ntp``, less sensitive to load changes). FLOPs per token are
:func:`conceptlm.cocomix.student.flops_per_token` (matmul FLOPs x 3 for a training step: blocks
``4d² + 2·d·d_ff`` MACs per slot plus causal attention ``d·(S+1)`` per slot, two slots per token and ``S = 2T`` in the
blocks after the insertion with ``interleave``; concept head ``C·d + K·d``; LM head ``V·d``). The FLOP bound of an
arm's time ratio is its FLOP ratio to NTP; ``vs_bound = measured ratio / FLOP ratio`` (1.0 = as cheap as its FLOPs
allow). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from conceptlm.cocomix.model import StudentSection
from conceptlm.cocomix.student import CocomixSection, StudentUnit, flops_per_token


def make_batch(b: int, t: int, vocab: int, n_concepts: int, k_attr: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.arange(b), "input_ids": torch.randint(0, vocab, (b, t), generator=g),
            "concept_labels": torch.randint(0, n_concepts, (b, t, k_attr), generator=g),
            "concept_mask": torch.ones(b, t, dtype=torch.bool)}


class Arm:
    """One unit + optimizer; :meth:`step` runs one training step and returns its wall time."""

    def __init__(self, name: str, student: StudentSection, lam: float, k_attr: int, batch: dict):
        torch.manual_seed(0)
        self.name, self.student = name, student
        self.unit = StudentUnit(student, CocomixSection(lam=lam, k_attr=k_attr))
        self.opt = torch.optim.AdamW(self.unit.parameters(), lr=1e-4, weight_decay=0.1)
        self.batch = self.unit.prepare(dict(batch))
        self.counts = self.unit.counts(self.batch)
        self.times: list[float] = []

    def step(self) -> float:
        t0 = time.perf_counter()
        out = self.unit(self.batch)
        loss = sum(w * out[k] / self.counts[k] for k, w in self.unit.loss_weights.items())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    b, t = args.batch, args.seq_len
    results = {"config": {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads,
                          "seq_len": t, "batch": b, "vocab_size": args.vocab, "concept_k": args.k,
                          "k_attr": args.k_attr, "insert_layer": args.insert_layer, "style": args.style,
                          "dtype": "fp32", "threads": args.threads, "repeats": args.repeats,
                          "loadavg_start": os.getloadavg()[0]},
               "by_concepts": {}}
    for c in args.concepts:
        base = StudentSection(style=args.style, vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
                              n_heads=args.n_heads, max_len=t, n_concepts=c, concept_k=args.k,
                              insert_layer=args.insert_layer, mix="interleave", concept_head=True)
        batch = make_batch(b, t, args.vocab, c, args.k_attr)
        arms = [Arm("ntp", StudentSection(**{**base.__dict__, "mix": "none", "concept_head": False}), 0.0,
                    args.k_attr, batch),
                Arm("add", StudentSection(**{**base.__dict__, "mix": "add"}), 0.1, args.k_attr, batch),
                Arm("interleave", base, 0.1, args.k_attr, batch)]
        for arm in arms:  # warm-up
            for _ in range(args.warmup):
                arm.step()
        for _ in range(args.repeats):
            for arm in arms:
                arm.times.append(arm.step())
        ntp_time = statistics.median(arms[0].times)
        ntp_flops = flops_per_token(arms[0].student, t)["total"]
        row = {}
        for arm in arms:
            med = statistics.median(arm.times)
            flops = flops_per_token(arm.student, t)
            ratio, bound = med / ntp_time, flops["total"] / ntp_flops
            paired = statistics.median(a / n for a, n in zip(arm.times, arms[0].times))
            row[arm.name] = {"step_s_median": round(med, 4), "step_s_min": round(min(arm.times), 4),
                             "ratio_vs_ntp": round(ratio, 3), "paired_ratio_vs_ntp": round(paired, 3),
                             "flop_ratio_vs_ntp": round(bound, 3), "paired_vs_bound": round(paired / bound, 3),
                             "vs_bound": round(ratio / bound, 3),
                             "gflop_per_step": round(flops["total"] * b * t / 1e9, 3),
                             "gflop_per_s": round(flops["total"] * b * t / med / 1e9, 2),
                             "flops_per_token": {k: round(v / 1e6, 3) for k, v in flops.items()}}
        results["by_concepts"][str(c)] = row
    results["config"]["loadavg_end"] = os.getloadavg()[0]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concepts", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--insert-layer", type=int, default=1)
    p.add_argument("--style", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--k-attr", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    print(json.dumps(run(p.parse_args()), indent=1))


if __name__ == "__main__":
    main()
