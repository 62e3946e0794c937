"""Benchmark conceptlm.core.modules.Decoder against HF LlamaModel (same weights, CPU fp32, SDPA).

Prints one JSON object:
  * fwd_bwd: median seconds per forward+backward (batch x seq of inputs_embeds) and ratio ours/HF
    (< 1 means ours is faster);
  * decode: incremental decoding (prefill a prompt, then one position at a time with a KV cache,
    feeding inputs_embeds) tokens/s for both and ratio ours/HF (> 1 means ours is faster).
Rounds of the two models are interleaved and medians reported.

    HF_HUB_OFFLINE=1 python benchmarks/modules_vs_hf.py
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch
import transformers
from transformers import DynamicCache

from conceptlm.core.modules import Decoder, KVCache, decoder_config_from_hf_llama, load_hf_llama_weights


def _build(args):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=args.d_model, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.d_ff, vocab_size=128,
        attn_implementation="sdpa",
    )
    hf = transformers.LlamaModel(cfg).float()
    ours = Decoder(decoder_config_from_hf_llama(cfg)).float()
    load_hf_llama_weights(ours, hf)
    return hf, ours


def _fwd_bwd_ours(model, x):
    model(x).pow(2).mean().backward()


def _fwd_bwd_hf(model, x):
    model(inputs_embeds=x).last_hidden_state.pow(2).mean().backward()


@torch.no_grad()
def _decode_ours(model, prompt, steps):
    cache = KVCache()
    h = model(prompt, cache=cache)
    for t in range(steps.shape[1]):
        h = model(steps[:, t : t + 1], cache=cache)
    return h


# transformers 5.x renamed `past_key_values` to `cache` in LlamaModel.forward
_HF_CACHE_KW = ("cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters
                else "past_key_values")


@torch.no_grad()
def _decode_hf(model, prompt, steps):
    cache = DynamicCache(config=model.config)  # updated in place by every call
    out = model(inputs_embeds=prompt, use_cache=True, **{_HF_CACHE_KW: cache})
    for t in range(steps.shape[1]):
        out = model(inputs_embeds=steps[:, t : t + 1], use_cache=True, **{_HF_CACHE_KW: cache})
    return out.last_hidden_state


def _timed(fn, *a):
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--train-rounds", type=int, default=7)
    p.add_argument("--decode-batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--generate", type=int, default=64)
    p.add_argument("--decode-rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hf, ours = _build(args)

    # sanity: same outputs
    x = torch.randn(args.batch, args.seq, args.d_model)
    with torch.no_grad():
        max_diff = (ours(x) - hf(inputs_embeds=x).last_hidden_state).abs().max().item()

    hf.train(), ours.train()  # dropout is 0 in both; train mode as in training
    for _ in range(2):  # warm-up
        _fwd_bwd_ours(ours, x), _fwd_bwd_hf(hf, x)
    t_ours, t_hf = [], []
    for r in range(args.train_rounds):
        pairs = [(t_ours, _fwd_bwd_ours, ours), (t_hf, _fwd_bwd_hf, hf)]
        for acc, fn, m in pairs if r % 2 == 0 else pairs[::-1]:
            m.zero_grad(set_to_none=True)
            acc.append(_timed(fn, m, x))

    hf.eval(), ours.eval()
    prompt = torch.randn(args.decode_batch, args.prompt, args.d_model)
    steps = torch.randn(args.decode_batch, args.generate, args.d_model)
    with torch.no_grad():
        dec_diff = (_decode_ours(ours, prompt, steps) - _decode_hf(hf, prompt, steps)).abs().max().item()
    d_ours, d_hf = [], []
    for r in range(args.decode_rounds):
        pairs = [(d_ours, _decode_ours, ours), (d_hf, _decode_hf, hf)]
        for acc, fn, m in pairs if r % 2 == 0 else pairs[::-1]:
            acc.append(_timed(fn, m, prompt, steps))

    n_tok = args.decode_batch * args.generate
    mo, mh = statistics.median(t_ours), statistics.median(t_hf)
    do, dh = statistics.median(d_ours), statistics.median(d_hf)
    print(json.dumps({
        "config": vars(args),
        "torch": torch.__version__,
        "hf_cache_kwarg": _HF_CACHE_KW,
        "transformers": transformers.__version__,
        "max_abs_diff_forward": max_diff,
        "max_abs_diff_decode_last_step": dec_diff,
        "fwd_bwd": {"ours_s": mo, "hf_s": mh, "ratio_ours_over_hf": mo / mh},
        "decode": {
            "ours_tok_per_s": n_tok / do, "hf_tok_per_s": n_tok / dh,
            "ratio_ours_over_hf": dh / do, "note": "time includes the prompt prefill; tokens = generated positions",
        },
    }, indent=2))


if __name__ == "__main__":
    main()
