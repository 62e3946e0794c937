"""CoCoMix at scale: label extraction tokens/s with N processes (torchrun, gloo on CPU) vs 1, on a sharded label
cache (``labels.shard_windows``), with a tiny random teacher and a random SAE on generated documents.

Each setting runs the ``label`` verb in fresh processes (one torch thread each) on the same windows, into a fresh
cache folder; ``tokens_per_s`` is the verb's own figure (tokens labelled / seconds of the labelling section, all
processes together), ``wall_s`` the whole command (start-up, model loading and corpus included). The caches of every
setting are checked to hold the same label bytes. Writes one JSON object (``--json OUT``, and stdout).

    python benchmarks/data_scale_cocomix.py --documents 400 --window 64 --processes 1 2 --json /tmp/labels.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CONCEPTLM_NO_PROGRESS", "1")


@dataclass(kw_only=True)
class _LabelConfig:
    """The sections the label verb reads."""

    run: object
    teacher: object
    corpus: object
    labels: object

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


def _config(root: Path, a: argparse.Namespace) -> _LabelConfig:
    from conceptlm.cocomix.config import CorpusSection, LabelSection, TeacherSection
    from conceptlm.core.config import RunSection

    return _LabelConfig(run=RunSection(name="run", out_dir=str(root)),
                        teacher=TeacherSection(path=str(root / "teacher_export"), layer=1),
                        corpus=CorpusSection(n_documents=a.documents, window=a.window, val_fraction=0.05),
                        labels=LabelSection(batch_size=a.batch, chunk_windows=a.shard_windows,
                                            shard_windows=a.shard_windows, progress=False))


def _setup(root: Path, a: argparse.Namespace) -> None:
    """A tiny random teacher export (with a BPE tokenizer of the documents) and a random SAE on its block 1."""
    import torch

    from conceptlm.cocomix.corpus import load_documents
    from conceptlm.cocomix.sae import TopKSAE, save_sae
    from conceptlm.cocomix.sae_train import SAE_DIR
    from conceptlm.cocomix.teacher import teacher_identity
    from conceptlm.core.hf import build_tiny_model, save_model
    from conceptlm.core.tokenizer import train_bpe_tokenizer

    cfg = _config(root, a)
    tok = train_bpe_tokenizer(load_documents(cfg.corpus)[:200], vocab_size=512)
    model = build_tiny_model("llama", len(tok), hidden_size=a.hidden, num_layers=2, num_heads=4, seed=0,
                             max_position_embeddings=max(a.window, 16), eos_token_id=tok.eos_token_id)
    save_model(model, root / "teacher_export", tok)
    sae = TopKSAE(a.hidden, a.latents, 8, seed=0)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    save_sae(sae, cfg.run_dir / SAE_DIR, layer=1, teacher=teacher_identity(root / "teacher_export", 1))


def _worker(root: Path, out: Path, a: argparse.Namespace) -> None:
    import torch

    from conceptlm.cocomix.labels import label

    torch.set_num_threads(1)
    s = label(_config(root, a), output=out)
    if os.environ.get("RANK", "0") == "0":
        keys = ("windows", "tokens", "computed_tokens", "tokens_per_s", "processes")
        (out / "summary.json").write_text(json.dumps({k: s[k] for k in keys}))


def _content_digest(cache: Path) -> str:
    """sha256 of the label and mask bytes of both splits, in window order (shards concatenated)."""
    import numpy as np

    h = hashlib.sha256()
    for split in ("train", "val"):
        header = json.loads((cache / split / "header.json").read_text())
        n = -(-header["n_windows"] // header["shard_windows"])
        for kind in ("labels", "mask"):
            for s in range(n):
                h.update(np.load(cache / split / "shards" / f"{kind}-{s:06d}.npy").tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--documents", type=int, default=400, help="generated documents")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64, help="tiny teacher width")
    ap.add_argument("--latents", type=int, default=256, help="SAE latents")
    ap.add_argument("--batch", type=int, default=8, help="labels.batch_size")
    ap.add_argument("--shard-windows", type=int, default=32)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting, alternating (median reported)")
    ap.add_argument("--json", default="", help="write the result here too")
    ap.add_argument("--worker", nargs=2, metavar=("ROOT", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _worker(Path(a.worker[0]), Path(a.worker[1]), a)
        return
    import statistics

    args = ["--documents", str(a.documents), "--window", str(a.window), "--hidden", str(a.hidden), "--latents",
            str(a.latents), "--batch", str(a.batch), "--shard-windows", str(a.shard_windows)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    runs: dict[int, list[dict]] = {n: [] for n in a.processes}
    digests = set()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _setup(root, a)
        for rep in range(a.repeats):
            for n in a.processes:
                out = root / f"cache-{n}-{rep}"
                head = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        f"--nproc_per_node={n}"]
                t0 = time.perf_counter()
                subprocess.run([*head, __file__, *args, "--worker", str(root), str(out)], check=True, env=env,
                               stdout=subprocess.DEVNULL)
                wall = time.perf_counter() - t0
                runs[n].append({**json.loads((out / "summary.json").read_text()), "wall_s": round(wall, 2)})
                digests.add(_content_digest(out))
    result = {
        "config": {k: v for k, v in vars(a).items() if k != "worker"},
        "cpus": os.cpu_count(), "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "same_labels_in_every_run": len(digests) == 1,
        "settings": {str(n): {"processes": n, "tokens": r[0]["computed_tokens"],
                              "tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in r), 1),
                              "wall_s": statistics.median(x["wall_s"] for x in r), "runs": r}
                     for n, r in runs.items()},
    }
    if 1 in runs:
        base = result["settings"]["1"]["tokens_per_s"]
        result["speedup_vs_1"] = {str(n): round(result["settings"][str(n)]["tokens_per_s"] / base, 3)
                                  for n in a.processes}
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
