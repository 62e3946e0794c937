"""The LCM data layer at scale (issue 21): parallel ``prepare`` and training memory against the number of documents.

Documents are real text (``--text PATH ...``: every non-empty line is a document; a line longer than
``--max-chars`` characters, e.g. a novel's chapter on one line, is cut after the first space past every
``--max-chars`` characters), written to a JSONL file with distinct ids, repeated as often as a size needs.

(a) ``prepare``: the same ``--prepare-docs`` documents prepared with ``--workers`` (default 1 and 2) worker
    processes into fresh folders; per worker count the wall time of the whole verb (spawning the workers and
    loading the encoder in each included), ``sentences_per_s`` = sentences / wall time, and whether the folder is
    byte-identical to the 1-worker one.
(b) training memory: ``--train-docs N`` (default 300) and 10 N documents are prepared (``--shard-size`` documents
    per shard, ``prepare.row_group_size`` as configured), then ``conceptlm lcm train`` of the fixed tiny LCM of
    ``configs/lcm/tiny_cpu.yaml`` (``--steps`` steps, one evaluation over the validation split) runs on each in a
    child process; ``train_peak_rss_mb`` is the child's peak RSS (``os.wait4`` rusage, the child started by a
    small launcher process so that the rusage does not count this process's image). Goal: RSS at 10 N <= 1.25
    x RSS at N. ``--baseline-src DIR`` also runs the training with another checkout's ``src`` (e.g. the code before
    lazy reading) on the same folders.

    python benchmarks/data_scale_lcm.py --text /path/lee_background.cor /path/crime-and-punishment.txt \\
        --json runs/bench/data_scale_lcm.json

Prints one JSON object (and writes it to ``--json``). The encoder is ``--encoder`` (default ``minilm``, the offline
all-MiniLM-L6-v2 of ``configs/lcm/tiny_cpu.yaml``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CONCEPTLM_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "lcm" / "tiny_cpu.yaml"


def read_documents(paths: list[str], max_chars: int) -> list[str]:
    """Every non-empty line of the files, long lines cut after the first space past every ``max_chars``."""
    docs: list[str] = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            while len(line) > max_chars:
                cut = line.find(" ", max_chars)
                if cut < 0:
                    break
                docs.append(line[:cut])
                line = line[cut + 1:].strip()
            if line:
                docs.append(line)
    if not docs:
        raise SystemExit("no documents in --text")
    return docs


def write_jsonl(path: Path, docs: list[str], n: int) -> Path:
    """``n`` documents (the texts repeated) with distinct ids."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"d{i:08d}", "text": docs[i % len(docs)]}, ensure_ascii=False) + "\n")
    return path


def prepare_config(source: Path, out: Path, args, workers: int, shard_size: int):
    from conceptlm.core.config import load_config
    from conceptlm.lcm.config import LCMConfig, prepare_config

    overrides = [f"docs.source={source}", "docs.text_field=text", "docs.id_field=id", f"prepare.out_dir={out}",
                 f"prepare.workers={workers}", f"prepare.shard_size={shard_size}", f"encoder.name={args.encoder}"]
    return prepare_config(load_config(LCMConfig, str(CONFIG), overrides))


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and p.name != ".lock"}


def bench_prepare(args, docs: list[str], tmp: Path) -> list[dict]:
    from conceptlm.lcm.data.prepare import prepare

    source = write_jsonl(tmp / "prepare_docs.jsonl", docs, args.prepare_docs)
    rows, first = [], None
    for workers in args.workers:
        out = tmp / f"prepared-w{workers}"
        t = time.perf_counter()
        summary = prepare(prepare_config(source, out, args, workers, args.prepare_shard_size))
        wall = time.perf_counter() - t
        files = folder_bytes(out)
        first = first or files
        rows.append({"workers": workers, "documents": summary["n_documents"], "sentences": summary["n_sentences"],
                     "shards": summary["n_shards"], "wall_s": round(wall, 2),
                     "sentences_per_s": round(summary["n_sentences"] / wall, 1),
                     "identical_to_first": files == first})
        shutil.rmtree(out)
    return rows


def train_rss(folder: Path, run_dir: Path, args, src: Path) -> dict:
    """Peak RSS (MB) of ``conceptlm lcm train`` on ``folder`` in a child process."""
    cmd = [sys.executable, "-m", "conceptlm", "lcm", "train", "--config", str(CONFIG),
           f"lcm_data.source={folder}", f"run.out_dir={run_dir}", "run.name=rss", f"train.max_steps={args.steps}",
           f"train.eval_every={args.steps}", "train.save_every=0", "train.log_every=1000", "train.progress=false",
           f"schedule.warmup_steps={min(20, args.steps // 2)}"]
    env = dict(os.environ, PYTHONPATH=str(src))
    t = time.perf_counter()
    # a small launcher starts the training: a child's ru_maxrss counts the image it was forked from, so forking
    # it from this (large) process would report this process's size
    run = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"training failed ({run.returncode}): {run.stderr[-2000:]}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"train_peak_rss_mb": round(int(run.stdout.split()[-1]) / 1024, 1),
            "train_wall_s": round(time.perf_counter() - t, 1)}


_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
code = os.waitstatus_to_exitcode(status)
if code:
    sys.exit(code)
print(usage.ru_maxrss)
"""


def bench_train(args, docs: list[str], tmp: Path) -> dict:
    from conceptlm.lcm.data.prepare import prepare

    sizes = [args.train_docs, 10 * args.train_docs]
    rows = []
    for n in sizes:
        source = write_jsonl(tmp / f"train_docs_{n}.jsonl", docs, n)
        folder = tmp / f"train-{n}"
        summary = prepare(prepare_config(source, folder, args, 1, args.shard_size))
        row = {"documents": summary["n_documents"], "sentences": summary["n_sentences"],
               "shards": summary["n_shards"],
               "parquet_mb": round(sum(p.stat().st_size for p in folder.glob("shard-*")) / 2 ** 20, 1)}
        row.update(train_rss(folder, tmp / "runs", args, REPO / "src"))
        if args.baseline_src:
            base = train_rss(folder, tmp / "runs", args, Path(args.baseline_src))
            row.update({f"baseline_{k}": v for k, v in base.items()})
        rows.append(row)
        shutil.rmtree(folder)
    ratio = rows[1]["train_peak_rss_mb"] / rows[0]["train_peak_rss_mb"]
    out = {"sizes": rows, "rss_ratio_10x": round(ratio, 3), "goal_rss_ratio_10x_max": 1.25,
           "goal_reached": ratio <= 1.25}
    if args.baseline_src:
        out["baseline_rss_ratio_10x"] = round(rows[1]["baseline_train_peak_rss_mb"]
                                              / rows[0]["baseline_train_peak_rss_mb"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", nargs="+", required=True, help="text files: one document per non-empty line")
    ap.add_argument("--max-chars", type=int, default=2000, help="cut longer lines into documents of about this")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prepare-docs", type=int, default=300, help="documents for the prepare timing (0: skip)")
    ap.add_argument("--prepare-shard-size", type=int, default=25)
    ap.add_argument("--train-docs", type=int, default=300, help="N: training memory at N and 10 N (0: skip)")
    ap.add_argument("--shard-size", type=int, default=1000, help="documents per shard of the training folders")
    ap.add_argument("--steps", type=int, default=100, help="training steps of each RSS run")
    ap.add_argument("--baseline-src", help="also measure training RSS with this src folder (another checkout)")
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args()
    from conceptlm.core.progress import silence_library_bars

    silence_library_bars()
    docs = read_documents(args.text, args.max_chars)
    result: dict = {"text": [Path(p).name for p in args.text], "text_documents": len(docs),
                    "encoder": args.encoder, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="data_scale_lcm-") as d:
        tmp = Path(d)
        if args.prepare_docs:
            result["prepare"] = bench_prepare(args, docs, tmp)
            base = result["prepare"][0]["sentences_per_s"]
            result["prepare_speedup"] = {str(r["workers"]): round(r["sentences_per_s"] / base, 3)
                                         for r in result["prepare"]}
        if args.train_docs:
            result["train"] = bench_train(args, docs, tmp)
    result["loadavg_end"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
