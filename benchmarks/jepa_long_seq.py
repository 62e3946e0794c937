"""LLM-JEPA step cost at long sequences: packed mode with the dense 4-D tree mask vs with a FlexAttention block
mask, next to NTP and separate mode, side by side in one process (the GPU check of the long-sequence path).

    python benchmarks/jepa_long_seq.py                                   # CUDA, bf16, SmolLM2-135M shape, T_LM=1024
    python benchmarks/jepa_long_seq.py --lm-len 2048 --code-len 256 --batch 4
    python benchmarks/jepa_long_seq.py --device cpu --tiny --steps 3     # CPU smoke run (no flex arm: no CPU backward)

The model is a Llama of SmolLM2-135M's shape (d 576, 30 layers, 9 heads / 3 KV heads, d_ff 1536, vocab 49,152,
134.5 M parameters) with random weights: step time does not depend on the weights, and nothing is loaded. Examples
are random token ids in the ``context`` layout: an LM sequence of ``--lm-len`` tokens whose last ``--code-len`` are
the answer (the only LM targets), a Text view = the prompt + k predictor tokens (packed: R_T = the k predictors), a
Code view = the answer alone. Lengths are jittered by up to ``--jitter`` tokens per example so rows need padding,
as real batches do.

Arms (each its own copy of the model and AdamW, same initial weights, same batches; one step = forward, loss
``lm/n + λ·jepa/B``, backward, AdamW step):

* ``ntp``: λ = 0, the LM rows alone with a 2-D padding mask (``sdpa``: the fused kernels);
* ``separate``: three ``sdpa`` forwards (LM, Text, Code);
* ``packed_dense``: one forward over ``[F | R_T | C]`` with the dense (B, 1, T, T) additive mask (``sdpa`` falls
  back to its masked kernel, memory ∝ T²);
* ``packed_flex``: the same rows with the tree mask as a FlexAttention ``BlockMask`` (``flex_attention``; HF
  compiles the kernel on first use; the warm-up steps absorb it). CUDA only.

Token bound: packed row tokens / LM tokens (what a packed step costs if time ∝ tokens). Reports the median step time
per arm, its ratio to NTP, and ``packed_*/bound``; peak CUDA memory per arm; and each arm's first-step LM / JEPA loss
and gradient norm with their largest disagreement (:func:`first_step_agreement`: the arms start from the same
weights on the same batch, so on CUDA this is also the exactness check of the flex path's backward). Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from conceptlm.jepa.config import JepaSection  # noqa: E402
from conceptlm.jepa.packing import collate_packed, collate_separate  # noqa: E402
from conceptlm.jepa.unit import JepaUnit  # noqa: E402
from conceptlm.jepa.views import JepaExample  # noqa: E402

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
                    rope_theta=100000.0)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=512, tie_word_embeddings=True)


def make_examples(n: int, args, vocab: int, seed: int) -> list[JepaExample]:
    """Random-token examples in the ``context`` layout (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    preds = tuple(range(vocab - args.k, vocab))  # the last k ids stand for the predictor tokens
    out = []
    for _ in range(n):
        lm_len = args.lm_len - int(torch.randint(0, args.jitter + 1, (1,), generator=g))
        code_len = args.code_len - int(torch.randint(0, min(args.jitter, args.code_len // 2) + 1, (1,), generator=g))
        ids = tuple(int(x) for x in torch.randint(0, vocab - args.k, (lm_len,), generator=g))
        prompt, answer = ids[: lm_len - code_len], ids[lm_len - code_len:]
        labels = (-100,) * len(prompt) + answer
        text = prompt + preds
        out.append(JepaExample(lm_ids=ids, lm_labels=labels, text_ids=text, text_enc=len(text) - 1, code_ids=answer,
                               code_enc=len(answer) - 1, text_prefix_len=len(prompt), num_predictors=args.k,
                               predictor_position="after", text_view="context", code_view="alone"))
    return out


class Arm:
    def __init__(self, name: str, base: torch.nn.Module, attn: str, lam: float, mode: str, args):
        self.name, self.mode = name, mode
        model = copy.deepcopy(base)
        model.set_attn_implementation(attn)
        self.unit = JepaUnit(model, JepaSection(lam=lam, num_predictors=args.k, mode=mode)).to(args.device)
        self.unit.train()
        self.opt = torch.optim.AdamW(self.unit.parameters(), lr=1e-5, weight_decay=0.0, fused=args.device == "cuda")
        self.times: list[float] = []
        self.peak_gib = 0.0
        self.first: dict[str, float] | None = None  # loss parts and grad norm of the first step (same for all arms)

    def step(self, batch, args) -> float:
        dev = torch.device(args.device)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            out = self.unit(batch)
        counts = self.unit.counts(batch)
        loss = sum(w * out[k] / counts[k] for k, w in self.unit.loss_weights.items() if counts.get(k))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.unit.parameters(), 1.0)
        if self.first is None:
            parts = {k: out[k].item() / counts[k] for k in ("lm", "jepa") if k in out and counts.get(k)}
            self.first = {"loss": loss.item(), **parts, "grad_norm": grad_norm.item()}
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            self.peak_gib = max(self.peak_gib, torch.cuda.max_memory_allocated() / 2 ** 30)
        return time.perf_counter() - t0


def first_step_agreement(arms: list[Arm]) -> dict[str, float]:
    """Every arm starts from the same weights on the same batch, so the first step's LM loss (all arms), JEPA loss
    and gradient norm (the JEPA arms) must agree up to rounding: the largest difference of each to the first arm
    that has it. On CUDA this checks the flex path's forward *and* backward against the dense mask and against
    separate mode (CPU tests cover the forward only: PyTorch has no CPU backward for flex_attention)."""
    out = {}
    for key in ("lm", "jepa", "grad_norm"):
        have = [a.first[key] for a in arms if a.first and key in a.first and (key == "lm" or a.name != "ntp")]
        if len(have) > 1:
            out[key] = max(abs(v - have[0]) for v in have)
    return out


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = TINY if args.tiny else SMOLLM2_135M
    cfg = transformers.LlamaConfig(**shape, max_position_embeddings=max(4096, 2 * args.lm_len), attention_dropout=0.0,
                                   pad_token_id=0)
    base = transformers.LlamaForCausalLM(cfg).float()
    vocab = cfg.vocab_size
    n_params = sum(p.numel() for p in base.parameters())
    arm_names = [a for a in args.arms.split(",") if a]
    if args.device == "cpu" and "packed_flex" in arm_names:
        arm_names.remove("packed_flex")  # PyTorch has no CPU backward for flex_attention
    specs = {"ntp": ("sdpa", 0.0, "packed"), "separate": ("sdpa", args.lam, "separate"),
             "packed_dense": ("sdpa", args.lam, "packed"), "packed_flex": ("flex_attention", args.lam, "packed")}
    arms = [Arm(n, base, *specs[n], args) for n in arm_names]
    del base
    steps = args.warmup + args.steps
    batches = [make_examples(args.batch, args, vocab, seed=s) for s in range(steps)]
    dev = torch.device(args.device)
    packed = [collate_packed(b, pad_token_id=0, pad_to_multiple_of=8).to(dev) for b in batches]
    separate = [collate_separate(b, pad_token_id=0, pad_to_multiple_of=8).to(dev) for b in batches]
    for s in range(steps):
        order = arms[s % len(arms):] + arms[: s % len(arms)]  # rotate so drift hits every arm alike
        for arm in order:
            t = arm.step(separate[s] if arm.mode == "separate" else packed[s], args)
            if s >= args.warmup:
                arm.times.append(t)
    lm_tokens = sum(p.lm.real_tokens for p in packed[args.warmup:])
    packed_tokens = sum(p.real_tokens for p in packed[args.warmup:])
    sep_tokens = sum(b.real_tokens for b in separate[args.warmup:])
    med = {a.name: statistics.median(a.times) for a in arms}
    ntp = med.get("ntp")
    result = {
        "config": {"device": args.device, "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
                   "torch": torch.__version__, "transformers": transformers.__version__, "bf16": args.bf16,
                   "parameters": n_params, "batch": args.batch, "lm_len": args.lm_len, "code_len": args.code_len,
                   "k": args.k, "lam": args.lam, "steps": args.steps, "warmup": args.warmup,
                   "packed_row_len": int(packed[-1].input_ids.shape[1])},
        "token_bound": {"packed": packed_tokens / lm_tokens, "separate": sep_tokens / lm_tokens},
        "step_s_median": med,
        "ratio_vs_ntp": {n: m / ntp for n, m in med.items()} if ntp else None,
        "peak_gib": {a.name: round(a.peak_gib, 2) for a in arms} if dev.type == "cuda" else None,
        "first_step": {a.name: a.first for a in arms},
        "first_step_max_abs_diff": first_step_agreement(arms),
    }
    if ntp:
        bound = result["token_bound"]["packed"]
        result["vs_bound"] = {n: med[n] / ntp / bound for n in ("packed_dense", "packed_flex") if n in med}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer d64 model instead of SmolLM2-135M's shape")
    p.add_argument("--lm-len", type=int, default=1024, help="LM sequence tokens (default: %(default)s)")
    p.add_argument("--code-len", type=int, default=192, help="answer (Code view) tokens (default: %(default)s)")
    p.add_argument("--jitter", type=int, default=64, help="max tokens dropped per example (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=1, help="predictor tokens")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--arms", default="ntp,separate,packed_dense,packed_flex")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 (default: bf16 autocast on CUDA)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.device == "cpu":
        args.bf16 = False
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
