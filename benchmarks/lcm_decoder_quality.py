"""Sentence-decoder quality on held-out sentences of real text: AutoBLEU and round-trip cosine of

(a) retrieval over a bank of the training sentences,
(b) the tiny from-scratch prefix decoder (Llama + BPE trained here),
(c) the SmolLM2-135M prefix decoder with LoRA (a short CPU run),

all for the frozen all-MiniLM-L6-v2 encoder. Data: the review texts of ``yelp_test.jsonl`` segmented by the rule
segmenter; reviews are split into training and held-out reviews, so no held-out sentence comes from a training
review. Every stage writes the results file again (atomically) as soon as it finishes.

    python benchmarks/lcm_decoder_quality.py --out runs/bench/lcm_decoder_quality.json
    python benchmarks/lcm_decoder_quality.py --only tiny --tiny-steps 100      # one stage, quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from conceptlm.core.config import load_config
from conceptlm.core.io import atomic_write_text
from conceptlm.lcm.config import DecoderTrainConfig, DocsSection, SegmentSection
from conceptlm.lcm.data.documents import iter_documents
from conceptlm.lcm.data.encoders import get_encoder
from conceptlm.lcm.data.segment import get_segmenter
from conceptlm.lcm.decoder_train import evaluate_decoder, train_decoder
from conceptlm.lcm.decoders import RetrievalDecoder, load_decoder

REPO = Path(__file__).resolve().parents[1]
YELP = REPO.parent / "shared" / "data" / "llm_jepa" / "yelp_test.jsonl"


class CachedEncoder:
    """Wraps an encoder and remembers every sentence's vector (the training sentences are embedded once)."""

    def __init__(self, encoder):
        self.encoder, self.dim, self.cache = encoder, encoder.dim, {}

    def encode(self, sentences, batch_size=None, progress=False) -> torch.Tensor:
        todo = list(dict.fromkeys(s for s in sentences if s not in self.cache))
        if todo:
            for s, v in zip(todo, self.encoder.encode(todo, batch_size=batch_size, progress=progress)):
                self.cache[s] = v
        return torch.stack([self.cache[s] for s in sentences]) if sentences else torch.empty(0, self.dim)

    def identity(self) -> dict:
        return self.encoder.identity()


def yelp_sentences(path: Path, n_docs: int, held_docs: int, max_train: int, n_test: int
                   ) -> tuple[list[str], list[str]]:
    """(training sentences, held-out sentences) from disjoint reviews; sentences of 3-40 words, deduplicated."""
    docs = DocsSection(source=str(path), text_field="messages.1.content", unescape=True, limit=n_docs)
    seg = get_segmenter(SegmentSection())
    texts = [t for _, t in iter_documents(docs)]
    keep = lambda s: 3 <= len(s.split()) <= 40  # noqa: E731
    train = [s for t in texts[:-held_docs] for s in seg.split(t) if keep(s)]
    held = [s for t in texts[-held_docs:] for s in seg.split(t) if keep(s)]
    train = list(dict.fromkeys(train))[:max_train]
    seen = set(train)
    held = [s for s in dict.fromkeys(held) if s not in seen][:n_test]
    return train, held


def prefix_config(out_dir: Path, name: str, steps: int, extra: dict) -> DecoderTrainConfig:
    base = {"run.out_dir": str(out_dir), "run.name": name, "run.resume": "never", "train.max_steps": steps,
            "train.eval_every": 0, "train.log_every": 25, "train.progress": False,
            "schedule.warmup_steps": min(20, steps),
            "decoder_train.eval_sentences": 0, "decoder_train.decode_eval": 0, "decoder_train.max_sentences": 10 ** 7}
    base.update(extra)
    return load_config(DecoderTrainConfig, None, [f"{k}={v}" for k, v in base.items()])


def run_prefix(label: str, cfg: DecoderTrainConfig, enc, train, held, results, write) -> None:
    t0 = time.perf_counter()
    res = train_decoder(cfg, sentences=train, encoder=enc)
    train_s = time.perf_counter() - t0
    dec = load_decoder(res.checkpoint, encoder=enc)
    t1 = time.perf_counter()
    m = evaluate_decoder(enc, dec, held, examples=6)
    results[label] = {"decoder": dec.identity(), "steps": res.step, "train_s": round(train_s, 1),
                      "decode_eval_s": round(time.perf_counter() - t1, 1),
                      "global_batch": cfg.train.micro_batch_size * cfg.train.grad_accum,
                      "final_train": res.last_train, "settings": {k: getattr(cfg.decoder, k) for k in (
                          "base", "n_prefix", "projector", "lora", "noise_std", "noise_schedule", "hidden_size",
                          "num_layers", "vocab_size")}, "lr": cfg.optim.lr, **m}
    write()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench/lcm_decoder_quality.json")
    ap.add_argument("--work", default="runs/bench/lcm_decoder_quality")
    ap.add_argument("--docs", type=int, default=2000, help="yelp reviews read")
    ap.add_argument("--held-docs", type=int, default=200, help="last reviews kept for held-out sentences")
    ap.add_argument("--train-sentences", type=int, default=6000)
    ap.add_argument("--test-sentences", type=int, default=200)
    ap.add_argument("--tiny-steps", type=int, default=800)
    ap.add_argument("--smol-steps", type=int, default=120)
    ap.add_argument("--smol-test-sentences", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1 is far faster when other processes share the cores)")
    ap.add_argument("--only", choices=["retrieval", "tiny", "smol"], action="append")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    stages = args.only or ["retrieval", "tiny", "smol"]
    out = Path(args.out)
    results: dict = {"command": "python benchmarks/lcm_decoder_quality.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "only"),
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "platform": platform.platform(), "load_avg_start": os.getloadavg()}}

    def write() -> None:
        results["machine"]["load_avg_now"] = os.getloadavg()
        atomic_write_text(out, json.dumps(results, indent=2, ensure_ascii=False))
        print(json.dumps({k: {m: v.get(m) for m in ("autobleu", "autobleu_sentence", "round_trip_cos", "train_s")}
                          for k, v in results.items() if isinstance(v, dict) and "autobleu" in v}), flush=True)

    t0 = time.perf_counter()
    train, held = yelp_sentences(YELP, args.docs, args.held_docs, args.train_sentences, args.test_sentences)
    enc = CachedEncoder(get_encoder())
    enc.encode(train + held, progress=False)
    results["data"] = {"source": str(YELP), "train_sentences": len(train), "test_sentences": len(held),
                       "mean_words_test": sum(len(s.split()) for s in held) / len(held),
                       "embed_s": round(time.perf_counter() - t0, 1), "encoder": enc.identity()}
    write()
    work = Path(args.work)
    if "retrieval" in stages:
        t1 = time.perf_counter()
        bank = RetrievalDecoder.build(train, enc)
        results["retrieval"] = {"decoder": bank.identity(), **evaluate_decoder(enc, bank, held, examples=6),
                                "eval_s": round(time.perf_counter() - t1, 1)}
        write()
    if "tiny" in stages:
        cfg = prefix_config(work, f"tiny-{int(time.time())}", args.tiny_steps, {
            "train.micro_batch_size": 32, "optim.lr": 2e-3, "optim.weight_decay": 0.01, "decoder.n_prefix": 4,
            "decoder.hidden_size": 256, "decoder.num_layers": 3, "decoder.num_heads": 4, "decoder.vocab_size": 4096,
            "decoder.noise_std": 0.2, "decoder.max_new_tokens": 48})
        run_prefix("tiny", cfg, enc, train, held, results, write)
    if "smol" in stages:
        cfg = prefix_config(work, f"smol-{int(time.time())}", args.smol_steps, {
            "train.micro_batch_size": 8, "optim.lr": 1e-3, "optim.weight_decay": 0.0, "decoder.base": "smollm2-135m",
            "decoder.lora": 16, "decoder.lora_alpha": 32, "decoder.n_prefix": 4, "decoder.noise_std": 0.2,
            "decoder.max_new_tokens": 40, "decoder.batch_size": 25})
        run_prefix("smollm2_lora", cfg, enc, train, held[:args.smol_test_sentences], results, write)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    write()


if __name__ == "__main__":
    main()
