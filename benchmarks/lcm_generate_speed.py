"""Base-LCM generation speed: sentences/s with the KV cache vs recomputing the whole sequence every step.

A randomly initialised small Base-LCM (MiniLM width 384) continues a batch of prompts of different lengths for a
fixed number of sentences (stopping rules off, so both runs do the same work). Cached and uncached runs alternate
``--repeats`` times (the machines are noisy: the ratio of medians measured side by side is the number to quote);
the two outputs are also compared. Prints one JSON object.

    python benchmarks/lcm_generate_speed.py [--new 64] [--batch 8] [--layers 4] [--d-model 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from conceptlm.lcm.config import GenerationOptions, LCMSection
from conceptlm.lcm.generate import generate
from conceptlm.lcm.variants.base import BaseLCM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=64, help="sentences generated per document")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-min", type=int, default=8)
    ap.add_argument("--prompt-max", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (tiny matmuls gain little from more; a shared machine punishes them)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LCMSection(dim=a.dim, d_model=a.d_model, n_layers=a.layers, n_heads=a.d_model // 64, d_ff=3 * a.d_model,
                     dropout=0.0, max_sentences=a.prompt_max + a.new + 1)
    model = BaseLCM(cfg).to(a.device).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.linspace(a.prompt_min, a.prompt_max, a.batch).round().long().tolist()
    prompts = [torch.nn.functional.normalize(torch.randn(n, a.dim, generator=g), dim=-1).to(a.device)
               for n in lengths]
    opts = dict(max_new_sentences=a.new, eos_threshold=None, repetition_threshold=None)
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    outs = {}
    generate(model, prompts, options=GenerationOptions(**{**opts, "max_new_sentences": 2}))  # warm-up
    for _ in range(a.repeats):
        for name, cache in (("cached", True), ("uncached", False)):
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs[name] = generate(model, prompts, options=GenerationOptions(**opts, use_cache=cache))
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    n_sent = a.batch * a.new
    diff = max((x.vectors - y.vectors).abs().max().item() for x, y in zip(outs["cached"], outs["uncached"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "benchmark": "lcm_generate_speed", "device": a.device, "threads": a.threads,
        "model": {"dim": a.dim, "d_model": a.d_model, "layers": a.layers, "params_M": round(
            sum(p.numel() for p in model.parameters()) / 1e6, 3)},
        "batch": a.batch, "prompt_lengths": lengths, "new_sentences": a.new, "repeats": a.repeats,
        "sentences_per_s": {k: round(n_sent / v, 1) for k, v in med.items()},
        "speedup_cached": round(med["uncached"] / med["cached"], 2),
        "max_abs_diff_cached_vs_uncached": diff,
        "loadavg_1m": os.getloadavg()[0],
    }, indent=1))


if __name__ == "__main__":
    main()
