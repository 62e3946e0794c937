"""One-Tower teacher-forced evaluation speed: the clean copies run once into a KV cache vs the whole interleaved
sequence at every sampler step (``OneTowerUnit.teacher_forced(..., use_cache=True | False)``), side by side.

A One-Tower of the Table 3 size (width 256, 4 blocks, SwiGLU 768, MiniLM's 384 dims) evaluates ``--docs`` documents
of ``--sentences`` sentences (the last ``--short`` documents half as long, so rows are padded) with the paper's
sampler (40 DDIM steps, guidance 3, rescale 0.7). Repeats alternate the two paths; reports the median seconds per
batch of each, the speed-up and the largest difference of the x0 they return. Prints (and with ``--out`` writes)
one JSON object.

    python benchmarks/lcm_teacher_forced_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from conceptlm.core.io import atomic_write_text
from conceptlm.lcm.config import DiffusionSection, LCMSection, SamplerOptions
from conceptlm.lcm.sequence import collate_documents
from conceptlm.lcm.variants.one_tower import OneTowerUnit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--sentences", type=int, default=32)
    ap.add_argument("--short", type=int, default=4, help="documents with half the sentences (padding)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = LCMSection(model="one_tower", dim=384, d_model=256, n_layers=4, n_heads=4, d_ff=768, dropout=0.0,
                     max_sentences=args.sentences, diffusion=DiffusionSection())
    cfg.validate()
    torch.manual_seed(0)
    unit = OneTowerUnit(cfg).eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randn(args.sentences // 2 if i >= args.docs - args.short else args.sentences, 384, generator=g)
            for i in range(args.docs)]
    batch = collate_documents([{"id": i, "vectors": d} for i, d in enumerate(docs)])
    opts = SamplerOptions(inference_steps=args.steps, guidance_scale=args.guidance, guidance_rescale=0.7)
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    outs = {}
    for r in range(args.repeats + 1):  # the first round warms up
        for name in (("cached", "uncached") if r % 2 == 0 else ("uncached", "cached")):
            t0 = time.perf_counter()
            outs[name] = unit.teacher_forced(batch, opts, use_cache=name == "cached")
            if r:
                times[name].append(time.perf_counter() - t0)
    keep = batch["mask"]
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"config": {"docs": args.docs, "sentences": args.sentences, "short": args.short, "steps": args.steps,
                         "guidance": args.guidance, "repeats": args.repeats, "threads": torch.get_num_threads(),
                         "torch": torch.__version__},
              "seconds_per_batch": med, "speedup": med["uncached"] / med["cached"],
              "max_abs_diff": float((outs["cached"][keep] - outs["uncached"][keep]).abs().max())}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
