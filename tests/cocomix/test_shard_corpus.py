"""A token-shard folder as the CoCoMix corpus: its windows equal the in-memory windows of the same documents, read
lazily; the teacher's tokenizer is checked against the shards'; the corpus identity is the shard fingerprint; the
whole pipeline (tiny teacher -> SAE -> sharded labels -> students -> report) runs on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptlm.cocomix.config import CorpusSection
from conceptlm.cocomix.corpus import (
    ShardWindowArray,
    build_corpus,
    corpus_identity,
    generate_documents,
    is_shard_corpus,
    shard_tokenizer,
    tokenize_windows,
)
from conceptlm.cocomix.label_cache import windows_fingerprint
from conceptlm.cocomix.pipeline import pipeline
from conceptlm.core.errors import DataError
from conceptlm.core.tokenizer import train_bpe_tokenizer
from conceptlm.data.config import TokenizeConfig
from conceptlm.data.shards import TokenShards, is_validation
from conceptlm.data.tokenize import tokenize
from tests.cocomix.test_trust import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = 24


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    """Generated documents tokenized into a token-shard folder (several shards per split, 20% validation)."""
    root = tmp_path_factory.mktemp("shard_corpus")
    docs = [d.text for d in generate_documents(120, seed=4)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    train_bpe_tokenizer(docs[:60], vocab_size=300).save_pretrained(root / "tok")
    tokenize(TokenizeConfig(source=str(root / "docs.jsonl"), out=str(root / "shards"), tokenizer=str(root / "tok"),
                            docs_per_shard=25, val_fraction=0.2, split_seed=1, progress=False))
    return root / "shards", docs


def test_shard_windows_equal_the_in_memory_windows_of_the_same_documents(shard_folder):
    folder, docs = shard_folder
    section = CorpusSection(source=str(folder), window=WINDOW)
    assert is_shard_corpus(section) and not is_shard_corpus(CorpusSection())
    tok = shard_tokenizer(section)
    splits = build_corpus(section, tok)
    val_docs = [d for d in docs if is_validation(d, 1, 0.2)]
    train_docs = [d for d in docs if not is_validation(d, 1, 0.2)]
    assert 0 < len(val_docs) < len(train_docs)
    for got, want_docs in ((splits.train.windows, train_docs), (splits.val.windows, val_docs)):
        want = tokenize_windows(want_docs, tok, WINDOW)
        assert isinstance(got, ShardWindowArray) and tuple(got.shape) == tuple(want.shape)
        assert torch.equal(got[:], want) and torch.equal(got[3], want[3]) and torch.equal(got[-1], want[-1])
        assert torch.equal(got[2:7], want[2:7]) and torch.equal(got[:1, :5], want[:1, :5])
        assert torch.equal(got[torch.tensor([4, 0])], want[[4, 0]]) and torch.equal(got[1:9:3], want[1:9:3])
        assert windows_fingerprint(got) == windows_fingerprint(want)  # the label caches' token hash
    item = splits.train[5]
    assert item["id"] == 5 and torch.equal(item["input_ids"], splits.train.windows[5])
    fp = TokenShards(folder, "train").fingerprint
    assert corpus_identity(section) == f"token_shards(fingerprint={fp},window={WINDOW})"


def test_a_teacher_tokenizer_other_than_the_shards_is_refused(shard_folder):
    folder, docs = shard_folder
    other = train_bpe_tokenizer(docs[:30], vocab_size=280)
    with pytest.raises(DataError, match="not the one these token shards were made with"):
        build_corpus(CorpusSection(source=str(folder), window=WINDOW), other)


@pytest.mark.slow
def test_pipeline_on_token_shards_end_to_end(shard_folder, tmp_path):
    folder, _ = shard_folder
    cfg = tiny_cfg(tmp_path, f"corpus.source={folder}", f"corpus.window={WINDOW}", "pipeline.arms=[ntp,cocomix]",
                   "labels.shard_windows=8", "labels.batch_size=4", "labels.chunk_windows=8")
    first = pipeline(cfg)
    run = cfg.run_dir
    teacher = json.loads((run / "teacher" / "artifact.json").read_text())
    assert teacher["inputs"] == {"token_shards": TokenShards(folder).fingerprint}
    assert first["labels"]["windows"] > 0 and (run / "labels" / "train" / "shards" / "labels-000000.npy").is_file()
    header = json.loads((run / "labels" / "train" / "header.json").read_text())
    assert header["corpus"]["identity"].startswith("token_shards(fingerprint=")
    assert {k: v["skipped"] for k, v in first["students"].items()} == {"ntp-s0": False, "cocomix-s0": False}
    rows = [json.loads(line) for line in (run / "students" / "cocomix-s0" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "eval" and np.isfinite(r["ntp"]) for r in rows)
    again = pipeline(cfg)  # every stage reused
    assert again["sae"]["skipped"] is True and all(v["skipped"] for v in again["students"].values())
