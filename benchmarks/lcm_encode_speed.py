"""Sentence-encoding throughput: conceptlm's MiniLM forward vs ``SentenceTransformer.encode``, and the time of a
full ``prepare`` (segment + encode + Parquet + normalizer) over about 10k sentences.

Both encoders embed the same real sentences (Yelp reviews from ../shared, segmented with the rule splitter; the
built-in generated documents when the shared data is absent) with the same batch size. Runs alternate between the
two (ours, reference, ours, ...) so that load from other processes hits both alike; the script reports, for wall
time and for this process's CPU time (steadier on a shared machine), the best and the median of the repeats and the
median of the per-repeat ratios (reference time / our time: > 1 means ours is faster).

    python benchmarks/lcm_encode_speed.py                       # 2000 sentences, batch 32, 3 repeats + prepare
    python benchmarks/lcm_encode_speed.py --prepare-sentences 0 --repeats 5

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CONCEPTLM_NO_PROGRESS", "1")

import torch  # noqa: E402

from conceptlm.lcm.config import DocsSection, EncoderSection  # noqa: E402
from conceptlm.lcm.data.documents import iter_documents  # noqa: E402
from conceptlm.lcm.data.encoders import get_encoder  # noqa: E402
from conceptlm.lcm.data.segment import get_segmenter  # noqa: E402

YELP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llm_jepa" / "yelp_test.jsonl"


def docs_section(limit: int | None) -> DocsSection:
    if YELP.is_file():
        return DocsSection(source=str(YELP), text_field="messages.1.content", unescape=True, limit=limit)
    return DocsSection(n_documents=limit or 2000)


def real_sentences(n: int) -> tuple[list[str], str]:
    seg, out = get_segmenter(), []
    for _, text in iter_documents(docs_section(None)):
        out.extend(seg.split(text))
        if len(out) >= n:
            break
    return out[:n], ("yelp_test.jsonl" if YELP.is_file() else "generated")


def docs_for(n_sentences: int) -> int:
    """How many documents hold about ``n_sentences`` sentences (End of text. included)."""
    seg, total = get_segmenter(), 0
    for k, (_, text) in enumerate(iter_documents(docs_section(None)), start=1):
        total += len(seg.split(text)) + 1
        if total >= n_sentences:
            return k
    return k


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``; CPU time is steadier when other processes
    share the cores."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def bench_encode(args) -> dict:
    from sentence_transformers import SentenceTransformer

    sentences, source = real_sentences(args.n_sentences)
    ours = get_encoder(EncoderSection(name="minilm", batch_size=args.batch_size, device="cpu"))
    ref = SentenceTransformer(str(ours.path), device="cpu")
    warm = sentences[:64]
    ours.encode(warm)
    ref.encode(warm, batch_size=args.batch_size)
    a = ours.encode(sentences)
    b = torch.as_tensor(ref.encode(sentences, batch_size=args.batch_size, convert_to_numpy=True))
    runs = {"ours": [], "st": []}
    for _ in range(args.repeats):
        runs["ours"].append(timed(lambda: ours.encode(sentences, batch_size=args.batch_size)))
        runs["st"].append(timed(lambda: ref.encode(sentences, batch_size=args.batch_size, convert_to_numpy=True)))
    n = len(sentences)
    out = {"source": source, "n_sentences": n, "mean_chars": round(sum(map(len, sentences)) / n, 1),
           "batch_size": args.batch_size, "repeats": args.repeats, "max_abs_diff": float((a - b).abs().max())}
    for k, clock in enumerate(("wall", "cpu")):
        ours_t = [r[k] for r in runs["ours"]]
        st_t = [r[k] for r in runs["st"]]
        out[clock] = {"ours_sent_per_s": [round(n / t, 1) for t in ours_t],
                      "st_sent_per_s": [round(n / t, 1) for t in st_t],
                      "ours_best": round(n / min(ours_t), 1), "st_best": round(n / min(st_t), 1),
                      "ours_median": round(n / statistics.median(ours_t), 1),
                      "st_median": round(n / statistics.median(st_t), 1),
                      "ratio_best": round(min(st_t) / min(ours_t), 3),
                      "ratio_median_of_pairs": round(statistics.median(r / o for o, r in zip(ours_t, st_t)), 3)}
    return out


def bench_prepare(args) -> dict:
    from conceptlm.lcm.config import PrepareConfig, PrepareSection
    from conceptlm.lcm.data.prepare import prepare

    n_docs = docs_for(args.prepare_sentences)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PrepareConfig(docs=docs_section(n_docs),
                            encoder=EncoderSection(name="minilm", batch_size=args.batch_size, device="cpu"),
                            prepare=PrepareSection(out_dir=tmp, shard_size=250))
        summary = prepare(cfg)
        size = sum(p.stat().st_size for p in Path(tmp).glob("shard-*.parquet"))
    return {"n_documents": summary["n_documents"], "n_sentences": summary["n_sentences"],
            "seconds": summary["seconds"], "encode_seconds": summary["encode_seconds"],
            "sentences_per_second_overall": round(summary["n_sentences"] / summary["seconds"], 1),
            "parquet_mb": round(size / 2**20, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-sentences", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prepare-sentences", type=int, default=10_000, help="0 skips the prepare timing")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"torch_threads": torch.get_num_threads(), "load_average_start": os.getloadavg()[0],
           "encode": bench_encode(args)}
    if args.prepare_sentences:
        out["prepare"] = bench_prepare(args)
    out["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
