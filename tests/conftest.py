"""Shared test fixtures: offline env, a tiny chat JSONL, the shared data location."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CONCEPTLM_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data" / "llm_jepa"

def load_benchmark(name: str):
    """The module of the script ``benchmarks/<name>.py`` (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


WORDS = ("dog truck ring lake lines with words number letter vowel capital before after containing string "
         "zero or more times at least once ending starting").split()


def make_chat_records(n: int, seed: int = 0) -> list[dict]:
    """Synthetic chat records with varied lengths (deterministic)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        answer = "".join(rng.choice("abcdxyz()[]*.|") for _ in range(rng.randint(2, 20)))
        out.append({"messages": [{"role": "system", "content": "Convert."},
                                 {"role": "user", "content": user},
                                 {"role": "assistant", "content": answer}]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def chat_files(tmp_path) -> tuple[Path, Path]:
    """(train.jsonl with 256 records, eval.jsonl with 48 records)."""
    return (write_jsonl(tmp_path / "train.jsonl", make_chat_records(256, seed=1)),
            write_jsonl(tmp_path / "eval.jsonl", make_chat_records(48, seed=2)))


def tiny_overrides(tmp_path: Path, train: Path, evalf: Path | None = None, **extra) -> list[str]:
    """Overrides for a seconds-long SFT run in ``tmp_path``."""
    base = {
        "run.out_dir": str(tmp_path / "runs"), "run.name": "t", "data.train": str(train),
        "data.max_length": 128, "tokenizer.vocab_size": 320, "model.hidden_size": 32, "model.num_layers": 2,
        "model.num_heads": 2, "model.max_position_embeddings": 128, "optim.lr": 3e-3, "schedule.warmup_steps": 2,
        "train.max_steps": 4, "train.micro_batch_size": 8, "train.log_every": 1, "train.eval_every": 0,
        "train.progress": False,
    }
    if evalf is not None:
        base["data.eval"] = str(evalf)
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is as fast, and far more robust when other processes share the cores.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
