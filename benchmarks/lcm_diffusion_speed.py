"""Generation speed of the diffusion LCMs: cached vs uncached, and vs the number of diffusion steps, in one run.

A Two-Tower (and a One-Tower) LCM of the given size continues ``--docs`` prompt documents of ``--prompt``
sentences by ``--new`` sentences each (stopping rules off, so every configuration generates exactly the same
number of sentences) with classifier-free guidance (the paper's g = 3, rescale 0.7). For each number of steps S the
same batch is generated with the caches (contextualizer KV cache, cross-attention K/V of the context, per-timestep
AdaLN table, the unconditional branch's constant cross-attention; One-Tower: the clean prefix's KV cache) and
without them (everything recomputed at every diffusion step), the outputs are compared, and sentences/s are
reported. Weights are random with non-zero AdaLN modulation (speed does not depend on training; equality needs
a denoiser that uses its context).

    python benchmarks/lcm_diffusion_speed.py --out runs/bench/lcm_diffusion_speed.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from conceptlm.core.io import atomic_write_text
from conceptlm.lcm.config import DiffusionSection, GenerationOptions, LCMSection, SamplerOptions
from conceptlm.lcm.generate import generate
from conceptlm.lcm.variants import build_unit


def _model(kind: str, args) -> torch.nn.Module:
    cfg = LCMSection(model=kind, dim=384, d_model=args.d_model, n_layers=args.layers,
                     n_denoiser_layers=args.layers, n_heads=4, d_ff=3 * args.d_model, dropout=0.0,
                     max_sentences=args.prompt + args.new + 1, diffusion=DiffusionSection())
    cfg.validate()
    torch.manual_seed(0)
    unit = build_unit(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a denoiser that uses its context (AdaLN-zero at init would ignore it)
        for name, p in unit.model.named_parameters():
            if "modulation" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return unit.model.eval()


def _time(model, prompts, opts: GenerationOptions, repeats: int) -> tuple[float, list[torch.Tensor]]:
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        docs = generate(model, prompts, options=opts)
        best = min(best, time.perf_counter() - t0)
        out = [d.vectors for d in docs]
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4, help="contextualizer and denoiser blocks (each)")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=4)
    ap.add_argument("--steps", default="10,20,40", help="diffusion steps S to compare")
    ap.add_argument("--models", default="two_tower,one_tower")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.nn.functional.normalize(torch.randn(args.prompt, 384, generator=g), dim=-1)
               for _ in range(args.docs)]
    rows = []
    for kind in args.models.split(","):
        model = _model(kind, args)
        n_params = sum(p.numel() for p in model.parameters())
        for s in (int(x) for x in args.steps.split(",")):
            base = dict(max_new_sentences=args.new, eos_threshold=None, repetition_threshold=None,
                        diffusion=SamplerOptions(inference_steps=s, guidance_scale=3.0, guidance_rescale=0.7))
            t_c, out_c = _time(model, prompts, GenerationOptions(**base), args.repeats)
            t_u, out_u = _time(model, prompts, GenerationOptions(**base, use_cache=False), args.repeats)
            n = sum(len(o) for o in out_c)
            diff = max(float((a - b).abs().max()) for a, b in zip(out_c, out_u))
            row = {"model": kind, "params": n_params, "steps": s, "sentences": n,
                   "cached_sent_per_s": n / t_c, "uncached_sent_per_s": n / t_u, "speedup": t_u / t_c,
                   "max_abs_diff": diff}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| model | S | cached sent/s | uncached sent/s | speed-up | max abs diff |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['steps']} | {r['cached_sent_per_s']:.2f} | {r['uncached_sent_per_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |")
    result = {"command": "python benchmarks/lcm_diffusion_speed.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
        "torch_threads": args.threads, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
