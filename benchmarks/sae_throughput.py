"""SAE training-step throughput: conceptlm's TopKSAE vs EleutherAI sparsify's SparseCoder, side by side.

Both train on the same random activations with the same sizes and Adam; one step = forward, loss, backward,
optimizer step, decoder renormalization (sparsify also removes the decoder-parallel gradient, which ours does in a
gradient hook). AuxK is idle in both (no latent is dead). Rounds alternate between the implementations and the
median tokens/s of each is reported with the ratio, as JSON.

    python benchmarks/sae_throughput.py --d-in 128 --n-latents 2048 --k 16 --batch 1024 --steps 10 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _ours_step(normalize: bool, d: int, c: int, k: int, device: str):
    from conceptlm.cocomix.sae import TopKSAE, mse_sum

    sae = TopKSAE(d, c, k, normalize_input=normalize, seed=0).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> None:
        sae.commit_firing()
        out = sae(x)
        loss = mse_sum(out) / x.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.normalize_decoder()

    return step


def _sparsify_step(d: int, c: int, k: int, device: str):
    import sparsify

    coder = sparsify.SparseCoder(d, sparsify.SparseCoderConfig(num_latents=c, k=k), device=device)
    opt = torch.optim.Adam(coder.parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> None:
        out = coder(x, dead_mask=None)
        opt.zero_grad(set_to_none=True)
        out.fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        coder.set_decoder_norm_to_unit_norm()

    return step


def _time(step, xs: list[torch.Tensor], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x in xs:
        step(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return sum(x.shape[0] for x in xs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=128)
    ap.add_argument("--n-latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1024, help="tokens per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(a.batch, a.d_in, generator=g).to(a.device) for _ in range(a.steps)]
    steps = {"ours_ln": _ours_step(True, a.d_in, a.n_latents, a.k, a.device),
             "ours_no_ln": _ours_step(False, a.d_in, a.n_latents, a.k, a.device),
             "sparsify": _sparsify_step(a.d_in, a.n_latents, a.k, a.device)}
    for step in steps.values():  # warm-up
        step(xs[0])
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(a.rounds):
        for name, step in steps.items():
            rates[name].append(_time(step, xs, a.device))
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(json.dumps({
        "config": {**vars(a), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                   "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "tokens_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "ratio_ours_no_ln_vs_sparsify": round(med["ours_no_ln"] / med["sparsify"], 3),
        "ratio_ours_ln_vs_sparsify": round(med["ours_ln"] / med["sparsify"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
