"""Data at scale, token part: ``conceptlm data tokenize`` throughput vs the bare tokenizer, the token-shard
reader's speed, and the peak RSS and speed of a short training run reading the shards, per corpus size.

The corpus is real text: the non-empty lines of the ``--text`` files (one document per line, e.g. the 300 news
articles of gensim's ``lee_background.cor`` and ``crime-and-punishment.txt``), repeated until the corpus holds about
N tokens, written as one ``.txt`` file read with ``text_unit=line``. One byte-level BPE (``--vocab-size``), trained
once on the ``--text`` files, tokenizes every size, so the tiny model is the same for every size.

    python benchmarks/data_scale.py --text /tmp/gensim_data/lee_background.cor \\
        /tmp/gensim_data/crime-and-punishment.txt --tokens 5000000 50000000 --workers 2 --json data_scale.json

Per size it writes: ``tokens`` (in the shards, both splits), ``tokenize_tokens_per_s`` (the verb, ``workers``
processes, wall time including hashing the source and the shards), ``bare_tokens_per_s`` (the same tokenizer's
batch encode, ``workers`` plain processes, documents already in memory, no I/O; measured on at most
``--bare-max-tokens`` of the corpus), ``workers``, ``train_peak_rss_mb`` (peak RSS of a ``conceptlm sft train``
subprocess of a fixed tiny model reading the shards), ``train_tokens_per_s`` (that run's median ``tokens_per_s``,
what the model consumes), ``reader_tokens_per_s`` (ShardWindows items/s in the training order x block size) and
``reader_vs_train`` (their ratio). Both tokenizer measurements run with ``TOKENIZERS_PARALLELISM=false``: one
thread per process, so W processes use W cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("CONCEPTLM_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
BLOCK = 256


def read_documents(paths: list[str]) -> list[str]:
    docs = []
    for p in paths:
        docs += [line.strip() for line in Path(p).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not docs:
        sys.exit("the --text files hold no non-empty line")
    return docs


def write_corpus(path: Path, docs: list[str], chars: int) -> int:
    """Repeat ``docs`` (one per line) until the file holds about ``chars`` characters; returns the lines written."""
    n = written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < chars:
            d = docs[n % len(docs)]
            f.write(d + "\n")
            written += len(d) + 1
            n += 1
    return n


def _bare_worker(tok_dir: str, corpus: str, worker: int, n_workers: int, max_docs: int, batch: int, barrier, out):
    from conceptlm.core.hf import load_tokenizer

    tok = load_tokenizer(tok_dir)
    backend = tok.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    with open(corpus, encoding="utf-8") as f:
        docs = [line.rstrip("\n") for i, line in enumerate(f) if i < max_docs and i % n_workers == worker]
    barrier.wait()
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(docs), batch):
        n += sum(len(e.ids) + 1 for e in encode(docs[i:i + batch], add_special_tokens=False))
    out.put((n, time.perf_counter() - t0))


def bare_rate(tok_dir: Path, corpus: Path, workers: int, max_docs: int, batch: int) -> tuple[float, int]:
    """(tokens/s of the bare batch encode in ``workers`` processes, tokens encoded)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_bare_worker, args=(str(tok_dir), str(corpus), w, workers, max_docs, batch, barrier,
                                                    out)) for w in range(workers)]
    for p in procs:
        p.start()
    res = [out.get() for _ in procs]
    for p in procs:
        p.join()
    tokens = sum(n for n, _ in res)
    return tokens / max(t for _, t in res), tokens


def reader_rate(shards: Path, seconds: float = 3.0) -> float:
    """Windows/s x block size, reading items of ShardWindows in the training order of a BatchPlan."""
    from conceptlm.core.sampling import BatchPlan
    from conceptlm.data.shards import ShardWindows, TokenShards

    ds = ShardWindows(TokenShards(shards, "train"), BLOCK)
    plan = BatchPlan(ds.lengths, micro_batch_size=8, grad_accum=1, seed=0)
    n, step, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in plan.global_batch(step):
            ds[i]
            n += 1
        step += 1
    return n * BLOCK / (time.perf_counter() - t0)


_RSS_WRAPPER = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)
"""


def train_run(shards: Path, work: Path, steps: int) -> tuple[float, float]:
    """(peak RSS in MB, median tokens/s) of a short ``conceptlm sft train`` of a fixed tiny model on the shards."""
    run_dir = work / "runs"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "conceptlm", "sft", "train", f"data.train={shards}", f"run.out_dir={run_dir}",
           "run.name=t", f"data.max_length={BLOCK}", "model.hidden_size=64", "model.num_layers=2",
           "model.num_heads=4", f"train.max_steps={steps}", "train.micro_batch_size=8", "train.eval_every=0",
           "train.log_every=1", "train.progress=false", f"train.save_every={steps}"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *cmd], env=env, capture_output=True, text=True)
    last = r.stdout.strip().splitlines()[-1].split() if r.stdout.strip() else ["0", "1"]
    if last[1] != "0":
        sys.exit(f"the training run failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "t" / "metrics.jsonl").read_text().splitlines()]
    speeds = [x["tokens_per_s"] for x in rows if x.get("split") == "train" and "tokens_per_s" in x][2:]
    return int(last[0]) / 1024, statistics.median(speeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", required=True, help="corpus sizes (tokens, approximate)")
    ap.add_argument("--text", nargs="+", required=True, help="UTF-8 text files, one document per line")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--bare-max-tokens", type=int, default=20_000_000)
    ap.add_argument("--workdir", help="where corpora and shards go (default: a temporary folder, removed)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from conceptlm.core.tokenizer import train_bpe_tokenizer
    from conceptlm.data.config import TokenizeConfig
    from conceptlm.data.tokenize import tokenize

    work = Path(args.workdir or tempfile.mkdtemp(prefix="data_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    docs = read_documents(args.text)
    tok_dir = work / "tokenizer"
    tok = train_bpe_tokenizer(docs, vocab_size=args.vocab_size)
    tok.save_pretrained(tok_dir)
    sample = "\n".join(docs)
    tokens_per_char = (len(tok(sample, add_special_tokens=False)["input_ids"]) + len(docs)) / (len(sample) + 1)
    results = []
    for n_tokens in args.tokens:
        corpus = work / f"corpus-{n_tokens}.txt"
        n_docs = write_corpus(corpus, docs, int(n_tokens / tokens_per_char))
        out = work / f"shards-{n_tokens}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = TokenizeConfig(source=str(corpus), out=str(out), text_unit="line", tokenizer=str(tok_dir),
                             docs_per_shard=max(50, n_docs // (16 * args.workers)), val_fraction=0.01,
                             workers=args.workers, progress=False)
        t0 = time.perf_counter()
        summary = tokenize(cfg)
        t_tok = time.perf_counter() - t0
        tokens = summary["train"]["tokens"] + summary["validation"]["tokens"]
        max_docs = max(1, int(n_docs * min(1.0, args.bare_max_tokens / tokens)))
        bare, bare_tokens = bare_rate(tok_dir, corpus, args.workers, max_docs, 256)
        reader = reader_rate(out)
        rss, train_tps = train_run(out, work, args.train_steps)
        row = {"tokens": tokens, "documents": n_docs, "workers": args.workers,
               "tokenize_s": round(t_tok, 2), "tokenize_tokens_per_s": round(tokens / t_tok),
               "bare_tokens_per_s": round(bare), "bare_tokens_measured": bare_tokens,
               "tokenize_vs_bare": round(tokens / t_tok / bare, 3),
               "train_peak_rss_mb": round(rss, 1), "train_tokens_per_s": round(train_tps),
               "reader_tokens_per_s": round(reader), "reader_vs_train": round(reader / train_tps, 1),
               "shard_bytes": sum(p.stat().st_size for p in out.rglob("*.npy"))}
        results.append(row)
        print(json.dumps(row), flush=True)
        corpus.unlink()
        shutil.rmtree(out)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine_cpus": os.cpu_count(), "results": results}, indent=1) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
