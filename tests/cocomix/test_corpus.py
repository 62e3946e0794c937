"""Corpus: the latent-topic generator, reading .txt/.jsonl with located errors, the document split, windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conceptlm.cocomix.config import CorpusSection
from conceptlm.cocomix.corpus import (
    TOPICS,
    WindowDataset,
    build_corpus,
    collate_windows,
    corpus_identity,
    generate_documents,
    load_documents,
    read_documents,
    split_documents,
    tokenize_windows,
)
from conceptlm.core.errors import ConfigError, DataError
from conceptlm.core.tokenizer import train_bpe_tokenizer

YELP = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "llm_jepa" / "yelp_test.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer([d.text for d in generate_documents(100, seed=3)], vocab_size=400)


def test_generator_is_deterministic_and_topical():
    a, b = generate_documents(30, seed=5), generate_documents(30, seed=5)
    assert a == b and a != generate_documents(30, seed=6)
    nouns = {i: set(TOPICS[i][1]) for i in range(16)}
    hits = total = 0
    for doc in a:
        assert 1 <= len(doc.topics) <= 2 and set(doc.sentence_topics) == set(doc.topics)
        for word in (w.strip(".,").lower() for w in doc.text.split()):
            owners = [t for t in range(16) if word in nouns[t]]
            hits += any(t in doc.topics for t in owners)
            total += bool(owners)
    # about 10% of the slots take a word of a random topic; the rest come from the document's own topics
    assert 0.85 < hits / total < 0.97, hits / total
    many = generate_documents(3, n_topics=20, seed=0, topics_per_document=3)
    assert all(len(d.topics) <= 3 for d in many)


def test_txt_paragraphs_or_lines_and_jsonl_dotted_field(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nstill first\n\n\nsecond doc\n", encoding="utf-8")
    assert read_documents(txt) == ["first doc\nstill first", "second doc"]
    assert read_documents(txt, txt_split="line") == ["first doc", "still first", "second doc"]
    js = tmp_path / "b.jsonl"
    js.write_text(json.dumps({"m": [{"c": "x"}, {"c": "hello"}]}) + "\n\n" + json.dumps({"m": [{}, {"c": "bye"}]})
                  + "\n", encoding="utf-8")
    assert read_documents(js, text_field="m.1.c") == ["hello", "bye"]
    assert read_documents(tmp_path, text_field="m.1.c", limit=3) == ["first doc\nstill first", "second doc",
                                                                      "hello"]


@pytest.mark.parametrize("line, field, message", [
    ('{"text": "ok"}\n{"text": 3}\n', "text", r"b.jsonl:2: field 'text': must be a string, got int"),
    ('{"text": "ok"}\n{"txt": "x"}\n', "text", r"b.jsonl:2: field 'text': missing"),
    ('{"text": "ok"}\n\n{oops\n', "text", r"b.jsonl:3: not valid JSON"),
    ('{"m": [1]}\n', "m.4", r"b.jsonl:1: field 'm.4': missing"),
])
def test_bad_jsonl_records_name_file_line_and_field(tmp_path, line, field, message):
    js = tmp_path / "b.jsonl"
    js.write_text(line, encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        read_documents(js, text_field=field)
    assert "\n" not in str(err.value)


def test_section_validation_and_empty_directory(tmp_path):
    with pytest.raises(ConfigError, match="corpus.source"):
        CorpusSection(source=str(tmp_path / "missing.txt")).validate()
    with pytest.raises(ConfigError, match="corpus.window"):
        CorpusSection(window=1).validate()
    with pytest.raises(DataError, match="holds no .txt or .jsonl files"):
        read_documents(tmp_path)


def test_file_corpus_identity_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    (b / "x.jsonl").symlink_to(a / "x.jsonl")
    ident = corpus_identity(CorpusSection(source=str(a)))
    assert ident == corpus_identity(CorpusSection(source=str(b)))  # a linked copy elsewhere: the same data
    assert str(a) not in ident
    assert ident != corpus_identity(CorpusSection(source=str(a), window=32))
    assert ident != corpus_identity(CorpusSection(source=str(a), text_field="body"))
    (a / "x.jsonl").unlink()
    (a / "x.jsonl").write_text('{"text": "one"}\n{"text": "three"}\n', encoding="utf-8")
    assert ident != corpus_identity(CorpusSection(source=str(a)))  # edited content: another corpus
    (a / "y.txt").write_text("more\n", encoding="utf-8")
    assert corpus_identity(CorpusSection(source=str(a))) != corpus_identity(CorpusSection(source=str(a),
                                                                                          txt_split="line"))


def test_split_is_by_document_deterministic_and_disjoint():
    docs = [f"doc {i}" for i in range(40)]
    train, val = split_documents(docs, 0.1, seed=1)
    assert (train, val) == split_documents(docs, 0.1, seed=1)
    assert len(val) == 4 and not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert split_documents(docs, 0.1, seed=2)[1] != val
    assert split_documents(docs, 0.0, seed=1) == (docs, [])


def test_windows_join_documents_with_eos(tokenizer):
    docs = ["the soup is hot.", "a rocket lands.", "the team wins again."]
    w = tokenize_windows(docs, tokenizer, 5)
    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert w.dtype == torch.long and w.shape == (len(stream) // 5, 5)
    assert w.reshape(-1).tolist() == stream[: w.numel()]
    with pytest.raises(DataError, match="fewer than one window"):
        tokenize_windows(["hi"], tokenizer, 500)
    ds = WindowDataset(w)
    item = ds[1]
    assert item["id"] == 1 and torch.equal(item["input_ids"], w[1])
    batch = collate_windows([ds[0], ds[2]])
    assert batch["ids"].tolist() == [0, 2] and torch.equal(batch["input_ids"], w[[0, 2]])


def test_build_corpus_generated(tokenizer):
    sec = CorpusSection(n_documents=60, window=16, val_fraction=0.1, seed=4)
    sec.validate()
    a, b = build_corpus(sec, tokenizer), build_corpus(sec, tokenizer)
    assert torch.equal(a.train.windows, b.train.windows) and torch.equal(a.val.windows, b.val.windows)
    assert len(a.val_documents) == 6 and len(a.train_documents) == 54
    assert len(load_documents(sec)) == 60


@pytest.mark.skipif(not YELP.is_file(), reason=f"shared data not present: {YELP}")
def test_real_reviews_from_shared_jsonl(tokenizer):
    sec = CorpusSection(source=str(YELP), text_field="messages.1.content", n_documents=40, window=32)
    sec.validate()
    docs = load_documents(sec)
    assert len(docs) == 40 and all(isinstance(d, str) and d for d in docs)
    splits = build_corpus(sec, tokenizer)
    assert splits.train.windows.shape[1] == 32 and len(splits.train) > 10
