"""SFT / JEPA (STP) runs reading a token-shard folder: the same losses as the in-memory text path, the tokenizer
check, the shards' fingerprint in the checkpoints' data state, exact resume mid-epoch, 2 ranks = 1 rank."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conceptlm.cli import main
from conceptlm.core.config import load_config
from conceptlm.data.config import TokenizeConfig
from conceptlm.data.shards import TokenShards
from conceptlm.data.tokenize import tokenize
from conceptlm.sft.config import SFTConfig
from conceptlm.sft.recipe import train
from tests.conftest import tiny_overrides
from tests.data.test_shards import make_docs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder of .txt files, token-shard folder of the same documents with no validation split, a token-shard
    folder with one, the tokenizer folder)."""
    from conceptlm.core.tokenizer import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("corpus")
    tok = d / "tok"
    train_bpe_tokenizer(make_docs(80, seed=9), vocab_size=320).save_pretrained(tok)
    txt = d / "txt"
    txt.mkdir()
    for i, doc in enumerate(make_docs(60, seed=11)):
        if i != 7:  # no 64k-character document: keep the corpus small
            (txt / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    common = dict(source=str(txt), tokenizer=str(tok), docs_per_shard=8, progress=False)
    tokenize(TokenizeConfig(out=str(d / "shards"), val_fraction=0.0, **common))
    tokenize(TokenizeConfig(out=str(d / "shards_val"), val_fraction=0.2, **common))
    return txt, d / "shards", d / "shards_val", tok


def overrides(tmp_path, train_data, name, **kw):
    base = {"run.name": name, "data.max_length": 32, "train.micro_batch_size": 4, "train.max_steps": 6,
            "model.max_position_embeddings": 64}
    base.update(kw)
    return tiny_overrides(tmp_path, train_data, **base)


def rows(run_dir, split="train"):
    out = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in out if r.get("split") == split]


def weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model" / "model.safetensors"))


def test_shard_run_equals_the_in_memory_text_run(tmp_path, corpus):
    txt, shards, _, tok = corpus
    assert main(["sft", "train", *overrides(tmp_path, txt, "text", **{"tokenizer.path": tok})]) == 0
    assert main(["sft", "train", *overrides(tmp_path, shards, "shards")]) == 0  # the folder's own tokenizer
    a, b = rows(tmp_path / "runs" / "text"), rows(tmp_path / "runs" / "shards")
    assert len(a) == 6 and [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = weights(tmp_path / "runs" / "text", 6), weights(tmp_path / "runs" / "shards", 6)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state = torch.load(tmp_path / "runs" / "shards" / "checkpoints" / "step_00000006" / "trainer_state.pt",
                       weights_only=True)
    assert state["data"]["train"] == f"{shards}[train] {TokenShards(shards).fingerprint}"


def test_another_tokenizer_is_refused_in_one_line(tmp_path, corpus, capsys):
    from conceptlm.core.tokenizer import train_bpe_tokenizer

    _, shards, _, _ = corpus
    other = tmp_path / "other_tok"
    train_bpe_tokenizer(make_docs(50, seed=1), vocab_size=310).save_pretrained(other)
    assert main(["sft", "train", *overrides(tmp_path, shards, "x", **{"tokenizer.path": other})]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "field 'tokenizer.path'" in err and "another tokenizer" in err
    assert not (tmp_path / "runs").exists()


def test_eval_reads_the_validation_split_and_stp_trains_on_shards(tmp_path, corpus):
    _, _, shards_val, _ = corpus
    ov = overrides(tmp_path, shards_val, "stp", **{"data.eval": shards_val, "jepa.objective": "stp",
                                                   "jepa.stp.variant": "random_span", "train.max_steps": 2,
                                                   "train.eval_every": 2, "jepa.stp.linear_predictor": True})
    assert main(["jepa", "train", *ov]) == 0
    run_dir = tmp_path / "runs" / "stp"
    assert all(r["stp"] > 0 for r in rows(run_dir)) and rows(run_dir, "eval")[-1]["stp"] > 0
    from conceptlm.data.sources import resolve_source

    src = resolve_source(str(shards_val), split="test")
    assert src.shards.split == "validation" and 0 < src.shards.num_tokens < TokenShards(shards_val).num_tokens


@pytest.mark.slow
def test_resume_mid_epoch_is_exact(tmp_path, corpus, caplog):
    _, shards, _, _ = corpus
    kw = {"train.save_every": 3, "train.keep_checkpoints": 3, "run.resume": "auto"}
    cfg = load_config(SFTConfig, None, overrides(tmp_path, shards, "straight", **kw))
    res = train(cfg)
    from conceptlm.core.recipe import make_plan
    from conceptlm.core.run import prepare_run
    from conceptlm.data.sources import build_dataset, resolve_source

    plan = make_plan(cfg, prepare_run(cfg), build_dataset(resolve_source(str(shards), split="train"), None,
                                                          max_length=32))
    assert plan.steps_per_epoch > 6  # the resume at step 3 is mid-epoch
    split_cfg = load_config(SFTConfig, None, overrides(tmp_path, shards, "split", **kw))
    split = train(split_cfg).run_dir
    shutil.rmtree(split / "checkpoints" / "step_00000006")  # as if killed after the step-3 checkpoint
    with caplog.at_level(logging.INFO):
        again = train(split_cfg)
    assert "resumed from" in caplog.text and "at step 3" in caplog.text
    assert again.step == 6 and (split / "checkpoints" / "step_00000003").is_dir()
    a, b = weights(res.run_dir, 6), weights(split, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed
def test_two_processes_equal_one_process_on_shards(tmp_path, corpus):
    from tests.core.test_distributed import env, max_diff

    _, shards, _, _ = corpus
    one = overrides(tmp_path, shards, "one", **{"train.max_steps": 3, "train.micro_batch_size": 8})
    two = overrides(tmp_path, shards, "two", **{"train.max_steps": 3, "train.micro_batch_size": 2,
                                                 "train.grad_accum": 2})
    assert main(["sft", "train", *one]) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "conceptlm", "sft", "train", *two], env=env(), cwd=tmp_path, timeout=300,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert max_diff(weights(tmp_path / "runs" / "one", 3), weights(tmp_path / "runs" / "two", 3)) <= 1e-5
