"""CoCoMix label extraction throughput (tokens/s) on this machine: a tiny teacher and SmolLM2-135M.

For each teacher, side by side in one run (round-robin repeats, median time):

* ``forward``: the teacher's forward pass alone (no gradients) -- the floor;
* ``reference``: the reference code's recipe (CoCoMix paper §2.1, Eq. 1): teacher parameters require grad, a full
  ``loss.backward()`` (weight gradients included), dense ``(g @ W_dec^T) * c`` over all latents, top-k;
* ``post``: :func:`conceptlm.cocomix.attribution.concept_labels` with ``mode=post`` (frozen teacher,
  ``autograd.grad`` w.r.t. the residual only, the k active decoder rows gathered);
* ``pre``: the same with ``mode=pre`` (dense over all latents, in token chunks; paper Eq. 1);
* ``activation``: labels by SAE activation (the forward pass stops at the SAE's block, no backward);
* ``cache_write`` (tiny teacher only): ``write_label_cache`` of the same windows, ``post`` labels, to a temp dir.

The SAE is random (the throughput does not depend on its weights). Prints one JSON object.

    python benchmarks/label_throughput.py [--batch 8 --seq 128 --reps 3 --skip-smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CONCEPTLM_NO_PROGRESS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from conceptlm.cocomix.attribution import (  # noqa: E402
    ConceptLabeler,
    LabelSection,
    concept_labels,
    freeze,
)
from conceptlm.cocomix.label_cache import CacheSpec, write_label_cache  # noqa: E402
from conceptlm.cocomix.sae import TopKSAE  # noqa: E402
from conceptlm.cocomix.teacher import teacher_blocks  # noqa: E402
from conceptlm.core import hf  # noqa: E402


def reference_labels(teacher: nn.Module, sae: TopKSAE, ids: torch.Tensor, layer: int, k_attr: int) -> torch.Tensor:
    """The reference code's recipe: hooks cache the activation and its gradient, full backward, dense scores."""
    teacher.requires_grad_(True)
    cache: dict[str, torch.Tensor] = {}

    def fwd(_m, _a, out):
        out = out[0] if isinstance(out, tuple) else out
        cache["h"] = out.detach()
        out.register_hook(lambda g: cache.__setitem__("g", g.detach()))

    handle = teacher_blocks(teacher)[layer].register_forward_hook(fwd)
    try:
        loss, n = hf.causal_lm_loss_sum(teacher, ids, ids)
        (loss / n).backward()
    finally:
        handle.remove()
        teacher.zero_grad(set_to_none=True)
        teacher.requires_grad_(False)
    x, _, _ = sae.normalize(cache["h"])
    dense = sae.dense_activations(*sae.encode(x))
    return ((cache["g"] @ sae.W_dec.T) * dense).topk(k_attr, dim=-1).indices


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_teacher(name: str, teacher: nn.Module, layer: int, n_latents: int, k: int, args, *,
                  with_cache: bool) -> dict:
    freeze(teacher)
    width = teacher.config.hidden_size if hasattr(teacher.config, "hidden_size") else teacher.config.n_embd
    sae = freeze(TopKSAE(width, n_latents, k, seed=0))
    vocab = teacher.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    variants = {
        "forward": lambda: _forward(teacher, ids),
        "reference": lambda: reference_labels(teacher, sae, ids, layer, args.k_attr),
        "post": lambda: concept_labels(teacher, sae, ids, layer=layer, section=LabelSection(k_attr=args.k_attr)),
        "pre": lambda: concept_labels(teacher, sae, ids, layer=layer,
                                      section=LabelSection(k_attr=args.k_attr, mode="pre")),
        "activation": lambda: concept_labels(teacher, sae, ids, layer=layer,
                                             section=LabelSection(k_attr=args.k_attr, selection="activation")),
    }
    if with_cache:
        tmp = tempfile.mkdtemp(prefix="label_bench.")
        labeler = ConceptLabeler(teacher, sae, layer, LabelSection(k_attr=args.k_attr, batch_size=args.batch,
                                                                   chunk_windows=args.batch))
        windows = ids.repeat(4, 1)
        counter = iter(range(10**6))

        def cache_write():
            write_label_cache(os.path.join(tmp, str(next(counter))), windows, labeler,
                              CacheSpec(teacher={"name": name}, corpus={"name": "random"}, batch_size=args.batch,
                                        chunk_windows=args.batch), progress=False)

        variants["cache_write"] = cache_write
    tokens = {v: ids.numel() * (4 if v == "cache_write" else 1) for v in variants}
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.reps):
        for v, fn in variants.items():
            times[v].append(_time(fn))
    if with_cache:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"layer": layer, "width": width, "n_latents": n_latents, "k": k, "batch": args.batch, "seq": args.seq}
    base = statistics.median(times["forward"]) / tokens["forward"]
    for v, ts in times.items():
        med = statistics.median(ts)
        out[v] = {"tokens_per_s": round(tokens[v] / med, 1), "s_per_call": round(med, 3),
                  "time_vs_forward": round(med / tokens[v] / base, 2)}
    return out


def _forward(teacher: nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        hf.causal_lm_loss_sum(teacher, ids, ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--k-attr", type=int, default=4)
    ap.add_argument("--skip-smollm2", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    result: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "loadavg_start": round(os.getloadavg()[0], 2)}
    tiny = hf.build_tiny_model("llama", 512, hidden_size=128, num_layers=4, num_heads=4, seed=0,
                               max_position_embeddings=max(512, args.seq))
    result["tiny_llama_d128_l4_v512"] = bench_teacher("tiny", tiny, 1, 1024, 16, args, with_cache=True)
    if not args.skip_smollm2:
        t0 = time.perf_counter()
        smol = hf.load_causal_lm("smollm2-135m", dtype=torch.float32)
        load_s = time.perf_counter() - t0
        layers = len(teacher_blocks(smol))
        result["smollm2_135m"] = {"load_s": round(load_s, 1),
                                  **bench_teacher("smollm2-135m", smol, layers // 2, 8 * smol.config.hidden_size,
                                                  32, args, with_cache=False)}
    result["loadavg_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
