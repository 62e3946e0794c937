"""Multi-process and kill/resume behaviour through the real CLI (subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_overrides

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]


def env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CONCEPTLM_NO_PROGRESS="1", OMP_NUM_THREADS="1",
             PYTHONPATH=str(REPO / "src"))
    return e


def cli(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "conceptlm", "sft", "train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "conceptlm", "sft", "train", *overrides]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model" / "model.safetensors"))


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(tmp_path, chat_files, strategy):
    """2 ranks x micro 2 x accum 2 == 1 rank x micro 8 (same global batch) after a few steps."""
    steps = 4
    one = tiny_overrides(tmp_path, chat_files[0], **{"run.name": "one", "train.max_steps": steps,
                                                     "train.micro_batch_size": 8})
    two = tiny_overrides(tmp_path, chat_files[0], **{"run.name": "two", "train.max_steps": steps,
                                                     "train.micro_batch_size": 2, "train.grad_accum": 2,
                                                     "dist.strategy": strategy})
    subprocess.run(cli(one), check=True, env=env(), cwd=tmp_path, timeout=300)
    r = subprocess.run(cli(two, nproc=2), env=env(), cwd=tmp_path, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(tmp_path / "runs" / "one", steps), weights(tmp_path / "runs" / "two", steps)
    assert max_diff(a, b) <= 1e-5
    # only rank 0 wrote metrics: one train row per step
    rows = (tmp_path / "runs" / "two" / "metrics.jsonl").read_text().splitlines()
    assert sum('"split": "train"' in r for r in rows) == steps


def test_sigkill_then_resume_auto_gives_identical_weights(tmp_path, chat_files):
    steps = 40
    base = {"train.max_steps": steps, "train.save_every": 2, "train.keep_checkpoints": 2, "run.resume": "auto",
            "train.micro_batch_size": 4}
    ref = tiny_overrides(tmp_path, chat_files[0], **{"run.name": "ref", **base})
    subprocess.run(cli(ref), check=True, env=env(), cwd=tmp_path, timeout=300)

    killed = tiny_overrides(tmp_path, chat_files[0], **{"run.name": "killed", **base})
    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(cli(killed), env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "checkpoints" / "step_00000006").exists():
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert done and done[-1] < f"step_{steps:08d}", done  # really killed mid-training

    subprocess.run(cli(killed), check=True, env=env(), cwd=tmp_path, timeout=300)
    a, b = weights(tmp_path / "runs" / "ref", steps), weights(run_dir, steps)
    assert max_diff(a, b) == 0.0
    # the metrics file reads as one run: each step logged once
    steps_logged = [l for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"split": "train"' in l]
    assert len(steps_logged) == steps


def test_fsdp_sharded_checkpoint_eval_refused_then_rewritten_as_full_on_one_process(tmp_path, chat_files):
    """dist.checkpoint=sharded through the CLI: no model/ export, so `sft eval` refuses in one line saying how to
    get one; resuming the finished run on one process with dist.checkpoint=full rewrites it, and eval then runs."""
    over = tiny_overrides(tmp_path, chat_files[0], chat_files[1], **{
        "run.name": "sh", "train.micro_batch_size": 2, "train.grad_accum": 2, "dist.strategy": "fsdp",
        "dist.checkpoint": "sharded", "run.resume": "auto", "generate.limit": 2, "generate.max_new_tokens": 4})
    r = subprocess.run(cli(over, nproc=2), env=env(), cwd=tmp_path, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / "runs" / "sh" / "checkpoints" / "step_00000004"
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model").exists()
    evaluate = [sys.executable, "-m", "conceptlm", "sft", "eval", *over]
    r = subprocess.run(evaluate, env=env(), cwd=tmp_path, timeout=300, capture_output=True, text=True)
    err = [line for line in r.stderr.splitlines() if line.startswith("conceptlm: error")]
    assert r.returncode != 0 and len(err) == 1 and "dist.checkpoint=full" in err[0], r.stderr[-2000:]
    one = [*over, "dist.strategy=none", "dist.checkpoint=full", "train.grad_accum=4", "run.resume_changes=apply"]
    subprocess.run(cli(one), check=True, env=env(), cwd=tmp_path, timeout=300, capture_output=True)
    assert (ckpt / "model" / "model.safetensors").is_file() and not (ckpt / "dcp").exists()
    r = subprocess.run(evaluate, env=env(), cwd=tmp_path, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
