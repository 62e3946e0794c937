"""Cost of verifying the sha256 of prepared Parquet shards when they are read (issue 19: target <= 5 % of a stage).

``EmbeddedDocuments`` checks each shard against ``artifact.json`` the first time it decodes it. This script prepares
``configs/lcm/tiny_cpu.yaml``'s documents (or reads ``--data``), then measures side by side, interleaved
``--repeats`` times (medians):

- ``sha256_s``: hashing every shard once (what the verification adds);
- ``decode_s``: decoding every shard (``read_shard`` of the id / sentences / vectors columns);
- ``pass_verified_s`` / ``pass_unverified_s``: a full pass over ``EmbeddedDocuments(folder, "all")`` (open + every
  document) with and without verification;
- ``train_s``: ``conceptlm lcm train`` on ``tiny_cpu.yaml`` (``--steps`` steps) on that folder, whose
  verification is one hash of every shard: ``sha256_s / train_s`` is its share of the stage;
- ``prepare_rerun_s``: ``prepare`` on the complete folder again (every shard reused: fingerprint read and
  sha256 checked), next to ``sha256_s``.

    python benchmarks/lcm_checksum_cost.py --out runs/bench/lcm_checksum_cost.json
    python benchmarks/lcm_checksum_cost.py --steps 50 --repeats 5      # quick

Prints one JSON object (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CONCEPTLM_NO_PROGRESS", "1")

import torch  # noqa: E402

from conceptlm.core.artifact import file_sha256  # noqa: E402
from conceptlm.core.config import load_config  # noqa: E402
from conceptlm.core.io import atomic_write_text  # noqa: E402
from conceptlm.lcm import recipe  # noqa: E402
from conceptlm.lcm.config import LCMConfig  # noqa: E402
from conceptlm.lcm.data.store import EmbeddedDocuments, read_shard  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _full_pass(folder: Path, verify: bool) -> None:
    ds = EmbeddedDocuments(folder, "all", verify=verify)
    for i in range(len(ds)):
        ds[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="runs/bench/lcm_checksum_cost")
    ap.add_argument("--data", default=None, help="an existing prepared folder (default: prepare tiny_cpu's docs)")
    ap.add_argument("--steps", type=int, default=300, help="lcm train steps (tiny_cpu: 300)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    data = Path(args.data) if args.data else root / "data"
    over = [f"run.out_dir={root}", "run.name=train", f"prepare.out_dir={data}", f"train.max_steps={args.steps}",
            "train.eval_every=0", "train.progress=false", "run.resume=never", *args.overrides]
    cfg = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml", over)
    res: dict = {"command": "python benchmarks/lcm_checksum_cost.py " + " ".join(
        [f"--steps {args.steps}", f"--repeats {args.repeats}", f"--threads {args.threads}", *args.overrides]),
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "load_avg_start": os.getloadavg()}}
    t = time.perf_counter()
    summary = recipe.prepare(cfg)
    res["prepare_s"] = round(time.perf_counter() - t, 3)
    shards = sorted(data.glob("shard-*.parquet"))
    res["data"] = {"folder": str(data), "shards": len(shards), "bytes": sum(p.stat().st_size for p in shards),
                   "documents": summary["n_documents"], "sentences": summary["n_sentences"]}

    rows: dict[str, list[float]] = {"sha256_s": [], "decode_s": [], "pass_verified_s": [], "pass_unverified_s": [],
                                    "prepare_rerun_s": []}
    for r in range(args.repeats):
        rows["sha256_s"].append(_timed(lambda: [file_sha256(p) for p in shards]))
        rows["decode_s"].append(_timed(lambda: [read_shard(p, ["id", "sentences", "vectors"]) for p in shards]))
        for verify in ((True, False) if r % 2 else (False, True)):  # alternate the order: no position bias
            rows[f"pass_{'verified' if verify else 'unverified'}_s"].append(
                _timed(lambda v=verify: _full_pass(data, v)))
        rows["prepare_rerun_s"].append(_timed(lambda: recipe.prepare(cfg)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    res["median"] = {k: round(v, 5) for k, v in med.items()}
    res["sha256_MB_per_s"] = round(res["data"]["bytes"] / med["sha256_s"] / 1e6, 1)

    if cfg.run_dir.exists():
        import shutil

        shutil.rmtree(cfg.run_dir)
    t = time.perf_counter()
    tr = recipe.train(cfg)
    res["train_s"] = round(time.perf_counter() - t, 2)
    res["train_steps"] = tr.step
    res["ratios"] = {
        "sha256_over_decode": round(med["sha256_s"] / med["decode_s"], 4),
        "verified_pass_over_unverified": round(med["pass_verified_s"] / med["pass_unverified_s"], 4),
        "sha256_over_train": round(med["sha256_s"] / res["train_s"], 5),
        "sha256_over_prepare_rerun": round(med["sha256_s"] / med["prepare_rerun_s"], 4),
        "sha256_over_first_prepare": round(med["sha256_s"] / res["prepare_s"], 5),
    }
    res["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
