"""Sharded label caches (``labels.shard_windows`` > 0): the same label bytes as the single-file cache; a run killed
by SIGKILL computes only its missing shards; 2 processes (torchrun, gloo) write the same files as 1; the reader maps a
few shards at a time; a damaged shard is a one-line error."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptlm.cocomix.config import LabelSection
from conceptlm.cocomix.corpus import load_documents
from conceptlm.cocomix.label_cache import (
    HEADER,
    LABELS,
    MASK,
    SHARDS,
    LabelCache,
    LabelCacheError,
    shard_file,
)
from conceptlm.cocomix.labels import open_labeled_windows
from conceptlm.cocomix.sae import save_sae
from conceptlm.cocomix.sae_train import SAE_DIR
from conceptlm.cocomix.teacher import teacher_identity
from conceptlm.core.errors import ConfigError, DataError
from conceptlm.core.hf import build_tiny_model, save_model
from conceptlm.core.tokenizer import train_bpe_tokenizer
from tests.cocomix.label_shards_worker import config, main
from tests.cocomix.test_attribution import make_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
SHARD = 8  # windows per shard (4 batches of 2)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny teacher export (model + tokenizer) and an SAE on its block 1, laid out as the worker expects."""
    root = tmp_path_factory.mktemp("label_shards")
    cfg = config(root, 0)
    tok = train_bpe_tokenizer(load_documents(cfg.corpus), vocab_size=300)
    model = build_tiny_model("llama", len(tok), hidden_size=32, num_layers=2, num_heads=4, seed=0,
                             eos_token_id=tok.eos_token_id)
    save_model(model, root / "teacher_export", tok)
    save_sae(make_sae(), cfg.run_dir / SAE_DIR, layer=1, teacher=teacher_identity(root / "teacher_export", 1))
    return root


@pytest.fixture(scope="module")
def single(root) -> Path:
    """The single-file caches (the 1-process default layout)."""
    main([str(root), str(root / "single"), "0"])
    return root / "single"


@pytest.fixture(scope="module")
def sharded(root) -> Path:
    """The sharded caches written by one process."""
    main([str(root), str(root / "sharded"), str(SHARD)])
    return root / "sharded"


def _label_content(cache: Path) -> tuple[bytes, bytes]:
    """The labels and the mask of a cache as bytes, in window order (shards concatenated)."""
    header = json.loads((cache / HEADER).read_text())
    if "shard_windows" not in header:
        return np.load(cache / LABELS).tobytes(), np.load(cache / MASK).tobytes()
    n = -(-header["n_windows"] // header["shard_windows"])
    return (b"".join(np.load(cache / shard_file("labels", s)).tobytes() for s in range(n)),
            b"".join(np.load(cache / shard_file("mask", s)).tobytes() for s in range(n)))


def _files(cache: Path) -> dict[str, bytes]:
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*"))
            if p.is_file() and p.name not in (".lock", "artifact.json")}


def test_sharded_cache_holds_the_single_file_labels_and_reads_them_back(root, single, sharded):
    for split in ("train", "val"):
        header = json.loads((sharded / split / HEADER).read_text())
        n = header["n_windows"]
        assert header["shard_windows"] == SHARD and n > SHARD  # several shards, the last one shorter
        names = sorted(p.name for p in (sharded / split / SHARDS).iterdir())
        assert names == sorted(f"{kind}-{s:06d}.npy" for s in range(-(-n // SHARD)) for kind in ("labels", "mask"))
        last = (n - 1) // SHARD
        assert np.load(sharded / split / shard_file("labels", last)).shape[0] == n - last * SHARD
        assert _label_content(sharded / split) == _label_content(single / split)
        # the reader (verified against the manifest) gives the single-file cache's items
        a = LabelCache(sharded / split)
        b = LabelCache(single / split)
        for i in list(range(n)) + [-1, -n]:
            (la, ma), (lb, mb) = a[i], b[i]
            assert torch.equal(la, lb) and torch.equal(ma, mb) and la.dtype == torch.int64
            assert len(a._shards) <= 4  # a few shards mapped at a time, whatever the corpus size
        with pytest.raises(IndexError):
            a[n]
        manifest = json.loads((sharded / split / "artifact.json").read_text())
        assert shard_file("labels", 0) in manifest["files"] and manifest["settings"]["labels"]["shard_windows"] == SHARD
        assert "shard_windows" not in json.loads((single / split / "artifact.json").read_text())["settings"]["labels"]
    again = main([str(root), str(sharded), str(SHARD)])  # complete: reused, nothing computed
    assert again["computed_tokens"] == 0


def test_a_damaged_shard_is_a_one_line_error_naming_the_file(root, sharded, tmp_path):
    import shutil

    copy = tmp_path / "train"
    shutil.copytree(sharded / "train", copy)
    arr = np.load(copy / shard_file("labels", 1))
    arr[0, 0, 0] ^= 1
    np.save(copy / shard_file("labels", 1), arr)
    with pytest.raises(DataError, match="labels-000001.npy"):
        open_labeled_windows(copy, np.zeros((1, 16)), verify=True)
    (copy / shard_file("mask", 2)).write_bytes(b"\x93NUMPY")  # truncated
    with pytest.raises(LabelCacheError, match="mask-000002.npy: unreadable"):
        LabelCache(copy)


def test_shard_windows_must_fit_the_batches_and_is_needed_for_several_processes(root, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="labels.shard_windows"):
        LabelSection(batch_size=4, chunk_windows=8, shard_windows=6).validate()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="labels.shard_windows"):
        main([str(root), str(tmp_path / "x"), "0"])


def _env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CONCEPTLM_NO_PROGRESS="1", OMP_NUM_THREADS="1",
             PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'src'}")
    return e


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_computes_only_the_missing_shards(root, sharded, tmp_path):
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-m", "tests.cocomix.label_shards_worker", str(root), str(out),
                              str(SHARD), "0.3"], cwd=REPO, env=_env())
    deadline = time.time() + 120
    try:
        while time.time() < deadline and child.poll() is None:
            if len(list((out / "train" / SHARDS).glob("labels-*.npy"))) >= 2 if (out / "train" / SHARDS).is_dir() \
                    else False:
                break
            time.sleep(0.02)
        assert child.poll() is None, "the child finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not (out / "train" / "progress.json").exists()
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "train" / SHARDS).glob("*.npy")}
    assert kept
    summary = main([str(root), str(out), str(SHARD)])
    train = summary["splits"]["train"]
    n_kept = sum(np.load(p, mmap_mode="r").shape[0] for p in kept if p.name.startswith("labels"))
    assert train["resumed_from"] == n_kept and train["computed_windows"] == train["windows"] - n_kept
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == v for p, v in kept.items())  # not rewritten
    for split in ("train", "val"):
        assert _files(out / split) == _files(sharded / split)


@pytest.mark.distributed
def test_two_processes_write_the_same_cache_as_one(root, sharded, single, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tests.cocomix.label_shards_worker", str(root), str(out), str(SHARD)]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for split in ("train", "val"):
        assert _files(out / split) == _files(sharded / split)  # header, every shard, progress: byte for byte
        assert _label_content(out / split) == _label_content(single / split)
        ours, ref = (json.loads((d / split / "artifact.json").read_text()) for d in (out, sharded))
        assert ours["fingerprint"] == ref["fingerprint"] and ours["files"] == ref["files"]
    # each rank computed its own shards: every window was computed once, by all ranks together
    # the ranks' summaries, however their writes to the shared pipe interleaved
    summaries = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", r.stdout)]
    assert len(summaries) == 2 and all(s["processes"] == 2 for s in summaries)
    assert all(s["computed_tokens"] == s["windows"] * 16 for s in summaries)
