"""Token shards (``conceptlm.data.shards``): the reader over a folder written by ``data tokenize``; windows equal
``TextDataset`` over the same documents, reads cross shard boundaries, damaged shards are named."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conceptlm.core.errors import DataError
from conceptlm.data.config import TokenizeConfig
from conceptlm.data.shards import ShardWindows, TokenShards, is_token_shards, is_validation, tokenizer_fingerprint
from conceptlm.data.text import TextDataset
from conceptlm.data.tokenize import tokenize

WORDS = "the a dog ran over lake with seven red boats and one small bird sang near old trees".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if i == 5:
            docs.append("   ")  # whitespace only: skipped, as TextDataset skips it
        elif i == 7:  # longer than 64k characters: tokenized in pieces cut after newlines
            docs.append("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(1400)))
        else:
            docs.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))))
    return docs


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from conceptlm.core.tokenizer import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(make_docs(60, seed=9), vocab_size=320).save_pretrained(d)
    return d


def write_source(path, docs):
    path.write_text("".join(json.dumps({"body": {"text": t}}) + "\n" for t in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok_dir):
    d = tmp_path_factory.mktemp("shards")
    docs = make_docs(40)
    src = write_source(d / "docs.jsonl", docs)
    tokenize(TokenizeConfig(source=str(src), out=str(d / "out"), text_field="body.text", tokenizer=str(tok_dir),
                            docs_per_shard=6, val_fraction=0.2, split_seed=3, progress=False))
    return d / "out", docs


def test_windows_equal_text_dataset_item_for_item(built):
    out, docs = built
    shards = TokenShards(out, "train")
    tok = shards.load_tokenizer()
    train_docs = [t for t in docs if not is_validation(t, 3, 0.2)]
    val_docs = [t for t in docs if is_validation(t, 3, 0.2)]
    assert 0 < len(val_docs) < len(train_docs)  # both splits hold documents
    for split, split_docs in (("train", train_docs), ("validation", val_docs)):
        s = TokenShards(out, split)
        for T in (16, 37):
            ref = TextDataset.from_texts(split_docs, tok, block_size=T)
            win = ShardWindows(s, T)
            assert len(win) == len(ref) and win.lengths == ref.lengths and win.num_tokens == ref.num_tokens
            assert all(win[i] == ref[i] for i in range(len(ref)))
    limited = ShardWindows(shards, 16, limit_tokens=100)
    ref = TextDataset.from_texts(train_docs, tok, block_size=16, limit_tokens=100)
    assert len(limited) == len(ref) == 6 and all(limited[i] == ref[i] for i in range(6))


def test_stream_crosses_shard_boundaries_and_documents(built):
    out, docs = built
    s = TokenShards(out, "train")
    tok = s.load_tokenizer()
    train_docs = [t for t in docs if t.strip() and not is_validation(t, 3, 0.2)]
    assert s.num_documents == len(train_docs) and len(s._shards) >= 4
    expected = [tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] if len(d) < 60000
                else None for d in train_docs]
    for i, e in enumerate(expected):
        if e is not None:
            assert s.document(i).tolist() == e
    stream = np.concatenate([s.document(i) for i in range(s.num_documents)])
    assert stream.shape == (s.num_tokens,)
    b = int(s._tok_starts[1])  # the first shard boundary
    assert s.tokens(b - 3, b + 4).tolist() == stream[b - 3:b + 4].tolist()
    assert s.tokens(0, s.num_tokens).tolist() == stream.tolist()
    assert s.tokens(5, 5).tolist() == []
    with pytest.raises(IndexError):
        s.tokens(0, s.num_tokens + 1)


def test_manifest_fields_and_identity(built, tok_dir):
    from conceptlm.core.hf import load_tokenizer

    out, _ = built
    assert is_token_shards(out) and not is_token_shards(out / "train") and not is_token_shards(tok_dir)
    s = TokenShards(out, "validation")
    m = json.loads((out / "artifact.json").read_text())
    assert s.fingerprint == m["fingerprint"] and s.dtype == "uint16" and s.vocab_size == len(s.load_tokenizer())
    assert s.tokenizer_fingerprint == tokenizer_fingerprint(load_tokenizer(tok_dir))
    assert s.eos_id == load_tokenizer(tok_dir).eos_token_id
    assert np.load(out / "train" / "00000.tokens.npy", allow_pickle=False).dtype == np.uint16
    assert m["splits"]["train"]["tokens"] + m["splits"]["validation"]["tokens"] == sum(
        np.load(out / f, allow_pickle=False).shape[0] for f in m["files"] if f.endswith(".tokens.npy"))


def test_damaged_shard_is_named_when_first_touched(built, tmp_path):
    import shutil

    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    f = copy / "train" / "00001.tokens.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    s = TokenShards(copy, "train")  # opening reads no shard
    s.tokens(0, 5)  # shard 0 is intact
    with pytest.raises(DataError, match=r"00001\.tokens\.npy: checksum mismatch"):
        s.tokens(0, s.num_tokens)
    assert TokenShards(copy, "train", verify=False).tokens(0, s.num_tokens).shape == (s.num_tokens,)


def test_not_a_shard_folder_is_one_line(tmp_path):
    with pytest.raises(DataError, match="not a token-shard folder"):
        TokenShards(tmp_path)
