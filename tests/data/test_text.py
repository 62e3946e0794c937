"""TextDataset: EOS-separated token stream cut into blocks; strict UTF-8; HF `text` columns."""

from __future__ import annotations

import os
import random

import pytest
import torch

from conceptlm.core.errors import DataError
from conceptlm.core.tokenizer import train_bpe_tokenizer
from conceptlm.data import text as text_mod
from conceptlm.data.text import TextDataset, read_text_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = "the cursor moves to the next line when you press enter in normal mode and insert text".split()


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    return train_bpe_tokenizer(texts, vocab_size=400)


DOC_A = "the cursor moves to the next line\nwhen you press enter\n"
DOC_B = "insert text in normal mode"


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_blocks_are_the_eos_joined_stream(tmp_path, tok):
    torch.manual_seed(0)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(DOC_A, encoding="utf-8")
    b.write_text(DOC_B, encoding="utf-8")
    eos = tok.eos_token_id
    stream = ids_of(tok, DOC_A) + [eos] + ids_of(tok, DOC_B) + [eos]
    block = next(k for k in range(5, 12) if len(stream) % k)
    ds = TextDataset([a, b], tok, block_size=block)
    n = len(stream) // block
    assert len(stream) % block != 0  # the last partial block really is dropped here
    assert len(ds) == n and ds.lengths == [block] * n and ds.num_tokens == len(stream)
    for i in range(n):
        item = ds[i]
        assert item["input_ids"] == stream[i * block:(i + 1) * block]
        assert item["labels"] == item["input_ids"]
    flat = [t for i in range(n) for t in ds[i]["input_ids"]]
    assert flat.count(eos) == stream[: n * block].count(eos) >= 1
    # one path works like a list of one
    single = TextDataset(str(a), tok, block_size=4)
    assert single[0]["input_ids"] == (ids_of(tok, DOC_A) + [eos])[:4]


def test_limit_tokens_and_from_texts(tok):
    eos = tok.eos_token_id
    stream = ids_of(tok, DOC_A) + [eos] + ids_of(tok, DOC_B) + [eos]
    ds = TextDataset.from_texts([DOC_A, "", "   ", DOC_B], tok, block_size=4)  # blank documents are skipped
    assert [t for i in range(len(ds)) for t in ds[i]["input_ids"]] == stream[: len(stream) // 4 * 4]
    lim = TextDataset.from_texts([DOC_A, DOC_B], tok, block_size=4, limit_tokens=9)
    assert lim.num_tokens == 9 and len(lim) == 2
    assert lim[1]["input_ids"] == stream[4:8]


def test_long_documents_are_chunked_after_newlines(tok, monkeypatch):
    monkeypatch.setattr(text_mod, "_CHUNK_CHARS", 20)
    doc = "the cursor moves\nto the next line\nin normal mode\n"
    assert text_mod._chunks(doc) == ["the cursor moves\n", "to the next line\n", "in normal mode\n"]
    # no newline in reach: cut before a space; no space either: cut anywhere
    assert text_mod._chunks("the cursor moves to the next") == ["the cursor moves to", " the next"]
    assert text_mod._chunks("x" * 45) == ["x" * 20, "x" * 20, "x" * 5]
    # chunk boundaries sit after newlines, so the tokens equal those of the whole text here
    ds = TextDataset.from_texts([doc], tok, block_size=1)
    assert [ds[i]["input_ids"][0] for i in range(len(ds))] == ids_of(tok, doc) + [tok.eos_token_id]


def test_bad_utf8_names_path_and_line(tmp_path, tok):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"fine line\nsecond line\nbad \xff\xfe here\n")
    with pytest.raises(DataError) as info:
        TextDataset([p], tok, block_size=4)
    assert str(info.value) == f"{p}:3: not valid UTF-8 (bad byte at offset 4 of the line)"
    assert (info.value.path, info.value.line) == (p, 3)


def test_bom_and_errors(tmp_path, tok):
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfthe cursor")
    assert read_text_file(p) == "the cursor"
    with pytest.raises(DataError, match="file not found"):
        TextDataset([tmp_path / "missing.txt"], tok, block_size=4)
    with pytest.raises(DataError, match="fewer than one block of 1000"):
        TextDataset([p], tok, block_size=1000)
    with pytest.raises(ValueError, match="block_size"):
        TextDataset([p], tok, block_size=0)


def test_hf_text_column(tmp_path, tok):
    pytest.importorskip("datasets")
    from conceptlm.data.hf_datasets import load_hf_records

    p = tmp_path / "corpus.txt"
    p.write_text("first line\nsecond line\nthird line\n", encoding="utf-8")
    texts = load_hf_records(str(p), cache_dir=str(tmp_path / "c"))
    assert texts == ["first line", "second line", "third line"]
    assert load_hf_records(str(p), limit=2, cache_dir=str(tmp_path / "c")) == texts[:2]
    ds = TextDataset.from_texts(texts, tok, block_size=3)
    eos = tok.eos_token_id
    stream = [t for line in texts for t in ids_of(tok, line) + [eos]]
    assert [t for i in range(len(ds)) for t in ds[i]["input_ids"]] == stream[: len(stream) // 3 * 3]
