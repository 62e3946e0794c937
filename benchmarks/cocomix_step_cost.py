"""Training-step time of a CoCoMix student with ``mix=add`` and ``mix=interleave``, with cached labels (given with
the batch) and with online labels (a frozen teacher + SAE run inside the step), against an NTP step of the same
student, next to the analytic FLOP bound of each.

    python benchmarks/cocomix_step_cost.py --threads 1           # the reference's setting: d=128, 4 layers, T=256,
                                                                 # B=8, GPT-2's vocabulary (50,257), C=32,768
    python benchmarks/cocomix_step_cost.py --vocab 1024 --concepts 4096 32768   # a tiny vocabulary (CPU configs)

Online arms (``online_add``, ``online_interleave``; ``--no-online`` drops them): the teacher is a Llama of the
student's width, depth and vocabulary (``d_ff = 4d``), the SAE a TopK SAE with C latents and k = ``--k`` on the
residual after teacher block ``--teacher-layer``; labels by post-activation attribution
(:class:`conceptlm.cocomix.attribution.ConceptLabeler`: frozen teacher, activation gradients only, the k active
decoder rows). Their FLOP bound adds the labeler's FLOPs per token: the teacher forward, the activation-only
backward from the loss down to the SAE's layer (attention backward counted 2x its forward), and the SAE encoder.

A step is what the loop does per optimizer step: forward of the unit, ``ntp + lam * concept`` normalised by the
counts, backward, AdamW update, zero_grad. Arms run round-robin (one step of each per round) so machine noise hits
them alike; the median over rounds is reported, and the median over rounds of the time ratio to the NTP step of the same
round (``paired_ratio_vs_ntp``, less sensitive to load changes). FLOPs per token are
:func:`conceptlm.cocomix.costs.flops_per_token` (matmul FLOPs x 3 for a training step: blocks
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

from conceptlm.cocomix.attribution import ConceptLabeler
from conceptlm.cocomix.config import CocomixSection, LabelSection, StudentSection
from conceptlm.cocomix.costs import flops_per_token
from conceptlm.cocomix.sae import TopKSAE
from conceptlm.cocomix.student import StudentUnit
from conceptlm.core.hf import build_tiny_model


def make_batch(b: int, t: int, vocab: int, n_concepts: int, k_attr: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.arange(b), "input_ids": torch.randint(0, vocab, (b, t), generator=g),
            "concept_labels": torch.randint(0, n_concepts, (b, t, k_attr), generator=g),
            "concept_mask": torch.ones(b, t, dtype=torch.bool)}


class Arm:
    """One unit + optimizer; :meth:`step` runs one training step and returns its wall time. With a ``labeler`` the
    batch carries no labels and ``prepare`` (inside the timed step) computes them, as the loop does online."""

    def __init__(self, name: str, student: StudentSection, lam: float, k_attr: int, batch: dict, *,
                 labeler: ConceptLabeler | None = None, label_flops: float = 0.0):
        torch.manual_seed(0)
        self.name, self.student, self.label_flops = name, student, label_flops
        self.unit = StudentUnit(student, CocomixSection(lam=lam, k_attr=k_attr), labeler=labeler)
        self.opt = torch.optim.AdamW(self.unit.parameters(), lr=1e-4, weight_decay=0.1)
        self.online = labeler is not None
        if self.online:
            batch = {k: v for k, v in batch.items() if k not in ("concept_labels", "concept_mask")}
        self.raw = batch
        self.batch = None if self.online else self.unit.prepare(dict(batch))
        self.counts = None if self.online else self.unit.counts(self.batch)
        self.times: list[float] = []

    def step(self) -> float:
        t0 = time.perf_counter()
        batch, counts = self.batch, self.counts
        if self.online:
            batch = self.unit.prepare(dict(self.raw))
            counts = self.unit.counts(batch)
        out = self.unit(batch)
        loss = sum(w * out[k] / counts[k] for k, w in self.unit.loss_weights.items())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def labeler_flops_per_token(teacher: torch.nn.Module, layer: int, seq_len: int, n_concepts: int) -> float:
    """FLOPs per token of online labels: the teacher's forward (blocks + attention + LM head), the activation-only
    backward from the loss down to block ``layer``'s output (the same MACs as those ops' forward; attention 2x), and
    the SAE encoder (d x C). The k-row attribution and top-k are not counted."""
    cfg = teacher.config
    d, n_layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    blocks = teacher.model.layers
    block_macs = [sum(p.numel() for n, p in b.named_parameters() if p.dim() == 2) for b in blocks]
    attn = d * (seq_len + 1)  # causal QK^T + AV per token, as flops_per_token counts it
    forward = sum(block_macs) + n_layers * attn + vocab * d
    above = range(layer + 1, n_layers)
    backward = sum(block_macs[i] for i in above) + 2 * attn * len(above) + vocab * d
    return 2.0 * (forward + backward + d * n_concepts)


def make_labeler(args, n_concepts: int) -> tuple[ConceptLabeler, float]:
    teacher = build_tiny_model("llama", args.vocab, hidden_size=args.d_model, num_layers=args.n_layers,
                               num_heads=args.n_heads, intermediate_size=4 * args.d_model,
                               max_position_embeddings=args.seq_len, seed=1)
    sae = TopKSAE(args.d_model, n_concepts, args.k, seed=0)
    labeler = ConceptLabeler(teacher, sae, args.teacher_layer, LabelSection(k_attr=args.k_attr, mode="post"))
    return labeler, labeler_flops_per_token(teacher, args.teacher_layer, args.seq_len, n_concepts)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    b, t = args.batch, args.seq_len
    results = {"config": {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads,
                          "seq_len": t, "batch": b, "vocab_size": args.vocab, "concept_k": args.k,
                          "k_attr": args.k_attr, "insert_layer": args.insert_layer, "style": args.style,
                          "online": args.online, "teacher_layer": args.teacher_layer,
                          "dtype": "fp32", "threads": args.threads, "repeats": args.repeats,
                          "loadavg_start": os.getloadavg()[0]},
               "by_concepts": {}}
    for c in args.concepts:
        base = StudentSection(style=args.style, vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
                              n_heads=args.n_heads, max_len=t, n_concepts=c, concept_k=args.k,
                              insert_layer=args.insert_layer, mix="interleave", concept_head=True)
        batch = make_batch(b, t, args.vocab, c, args.k_attr)
        add = StudentSection(**{**base.__dict__, "mix": "add"})
        arms = [Arm("ntp", StudentSection(**{**base.__dict__, "mix": "none", "concept_head": False}), 0.0,
                    args.k_attr, batch),
                Arm("add", add, 0.1, args.k_attr, batch),
                Arm("interleave", base, 0.1, args.k_attr, batch)]
        if args.online:
            labeler, lab_flops = make_labeler(args, c)
            arms += [Arm("online_add", add, 0.1, args.k_attr, batch, labeler=labeler, label_flops=lab_flops),
                     Arm("online_interleave", base, 0.1, args.k_attr, batch, labeler=labeler,
                         label_flops=lab_flops)]
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
            if arm.label_flops:
                flops["labels"] = arm.label_flops
                flops["total"] += arm.label_flops
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
    p.add_argument("--concepts", type=int, nargs="+", default=[32768])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--insert-layer", type=int, default=1)
    p.add_argument("--style", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--vocab", type=int, default=50257, help="50,257 = GPT-2's, as the reference (default)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--k-attr", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher-layer", type=int, default=1, help="SAE layer of the online arms' teacher")
    p.add_argument("--no-online", dest="online", action="store_false", help="drop the online-label arms")
    print(json.dumps(run(p.parse_args()), indent=1))


if __name__ == "__main__":
    main()
