"""``conceptlm data tokenize``: sources, the split, the trained tokenizer's sample, reuse / refuse / rebuild,
byte-identical output for 1 and 2 workers and 2 ranks, and a SIGKILLed run finished by a rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conceptlm.cli import main
from conceptlm.core.artifact import StaleArtifactError
from conceptlm.core.errors import DataError
from conceptlm.data.config import TokenizeConfig
from conceptlm.data.shards import ShardWindows, TokenShards, is_validation
from conceptlm.data.text import TextDataset
from conceptlm.data.token_pieces import SourceReader
from conceptlm.data.tokenize import tokenize, tokenizer_sample
from tests.data.test_shards import make_docs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from conceptlm.core.tokenizer import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(make_docs(60, seed=9), vocab_size=320).save_pretrained(d)
    return d


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative name -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def lines_file(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(d.replace("\n", " ") + "\n" for d in docs), encoding="utf-8")
    return path


def cfg(src, out, **kw) -> TokenizeConfig:
    base = dict(source=str(src), out=str(out), progress=False, docs_per_shard=7, val_fraction=0.25)
    base.update(kw)
    c = TokenizeConfig(**base)
    c.validate()
    return c


def test_split_is_a_function_of_the_text_and_seed():
    docs = make_docs(400, seed=4)
    val = [is_validation(d, 0, 0.25) for d in docs]
    assert 0.15 < sum(val) / len(val) < 0.35  # about val_fraction
    assert val == [is_validation(d, 0, 0.25) for d in docs]
    assert val != [is_validation(d, 1, 0.25) for d in docs]  # the seed changes it
    assert not any(is_validation(d, 0, 0.0) for d in docs)


def test_txt_folder_file_documents_equal_text_dataset(tmp_path, tok_dir):
    """text_unit=file: one document per file, as ``data.train: folder`` reads it (TextDataset over the paths)."""
    from conceptlm.core.hf import load_tokenizer

    folder = tmp_path / "txt"
    folder.mkdir()
    docs = make_docs(9, seed=2)
    for i, d in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    tokenize(cfg(folder, tmp_path / "out", tokenizer=str(tok_dir), val_fraction=0.0, docs_per_shard=2))
    tok = load_tokenizer(tok_dir)
    ref = TextDataset(sorted(folder.glob("*.txt")), tok, block_size=24)
    win = ShardWindows(TokenShards(tmp_path / "out"), 24)
    assert len(win) == len(ref) and all(win[i] == ref[i] for i in range(len(ref)))
    assert TokenShards(tmp_path / "out", "validation").num_tokens == 0


def test_line_paragraph_jsonl_parquet_sources_read_the_same_documents(tmp_path):
    docs = [d.replace("\n", " ") for d in make_docs(12, seed=5) if d.strip()]
    lines_file(tmp_path / "l.txt", docs)
    (tmp_path / "p.txt").write_text("\n\n".join(d[:40] + "\n" + d[40:] for d in docs) + "\n", encoding="utf-8")
    (tmp_path / "j.jsonl").write_text("".join(json.dumps({"t": d}) + "\n\n" for d in docs), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), tmp_path / "d.parquet",
                   row_group_size=5)

    def read(**kw):
        r = SourceReader(cfg("x", "y", **kw))
        got = [t for _, t, _, _ in r.records()]
        assert r.count == len(docs)
        return got

    assert read(source=str(tmp_path / "l.txt"), text_unit="line") == docs
    assert read(source=str(tmp_path / "p.txt"), text_unit="paragraph") == [d[:40] + "\n" + d[40:] for d in docs]
    assert read(source=str(tmp_path / "j.jsonl"), text_field="t") == docs
    assert read(source=str(tmp_path / "d.parquet")) == docs
    # only the kept documents are yielded, with their index and location
    r = SourceReader(cfg(tmp_path / "d.parquet", "y"))
    assert [(i, line) for i, _, _, line in r.records(lambda i: i % 5 == 1)] == [(1, 2), (6, 7)]
    r = SourceReader(cfg(tmp_path / "j.jsonl", "y", text_field="t", limit_documents=4))
    assert [(i, line) for i, _, _, line in r.records()] == [(0, 1), (1, 3), (2, 5), (3, 7)] and r.count == 4


def test_bad_record_is_one_line_naming_file_line_and_field(tmp_path, tok_dir):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "fine words"}\n{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected a string document"):
        tokenize(cfg(src, tmp_path / "out", tokenizer=str(tok_dir)))
    src.write_text('{"text": "fine words"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'text': no 'text'"):
        tokenize(cfg(src, tmp_path / "out2", tokenizer=str(tok_dir)))


def test_tokenizer_sample_is_bounded_seeded_and_training_only(tmp_path):
    docs = [d.replace("\n", " ") for d in make_docs(300, seed=6) if d.strip()]
    src = lines_file(tmp_path / "l.txt", docs)
    c = cfg(src, "y", text_unit="line", tokenizer_sample_docs=50)
    sample = tokenizer_sample(c)
    assert len(sample) == 50 and sample == tokenizer_sample(c)
    assert not any(is_validation(s, 0, 0.25) for s in sample)
    assert sample != tokenizer_sample(cfg(src, "y", text_unit="line", tokenizer_sample_docs=50, tokenizer_seed=1))
    assert sorted(sample, key=docs.index) == sample  # in source order
    everything = tokenizer_sample(cfg(src, "y", text_unit="line", tokenizer_sample_docs=10_000))
    assert everything == [d for d in docs if not is_validation(d, 0, 0.25)]


def test_reuse_refuse_rebuild(tmp_path, tok_dir):
    src = lines_file(tmp_path / "l.txt", make_docs(30, seed=1))
    out = tmp_path / "out"
    first = tokenize(cfg(src, out, text_unit="line", tokenizer=str(tok_dir)))
    before = tree(out)
    again = tokenize(cfg(src, out, text_unit="line", tokenizer=str(tok_dir), workers=1, batch_size=3))
    assert again["reused"] and again["fingerprint"] == first["fingerprint"] and tree(out) == before
    with pytest.raises(StaleArtifactError, match=r"docs_per_shard 7 -> 8.*on_change=rebuild"):
        tokenize(cfg(src, out, text_unit="line", tokenizer=str(tok_dir), docs_per_shard=8))
    src.write_text(src.read_text() + "one more document\n", encoding="utf-8")
    with pytest.raises(StaleArtifactError, match=r"input source changed"):
        tokenize(cfg(src, out, text_unit="line", tokenizer=str(tok_dir)))
    rebuilt = tokenize(cfg(src, out, text_unit="line", tokenizer=str(tok_dir), on_change="rebuild"))
    assert not rebuilt["reused"] and rebuilt["fingerprint"] != first["fingerprint"]
    assert rebuilt["train"]["documents"] + rebuilt["validation"]["documents"] == 30  # 29 + 1 (one is blank)


def test_cli_trains_a_tokenizer_when_none_is_given(tmp_path, capsys):
    src = lines_file(tmp_path / "l.txt", make_docs(40, seed=3))
    assert main(["data", "tokenize", f"source={src}", f"out={tmp_path / 'out'}", "text_unit=line",
                 "vocab_size=300", "docs_per_shard=10", "progress=false"]) == 0
    res = json.loads(capsys.readouterr().out)
    s = TokenShards(tmp_path / "out")
    assert res["fingerprint"] == s.fingerprint and res["pieces"] == 4
    assert s.vocab_size <= 300 and s.dtype == "uint16"
    assert main(["data", "tokenize", f"source={tmp_path / 'nope.txt'}", "out=x"]) == 2
    assert "field 'source': not found" in capsys.readouterr().err


@pytest.mark.slow
def test_one_and_two_workers_and_two_ranks_write_identical_folders(tmp_path, tok_dir):
    src = lines_file(tmp_path / "l.txt", make_docs(120, seed=8))
    kw = dict(text_unit="line", tokenizer=str(tok_dir), docs_per_shard=9)
    tokenize(cfg(src, tmp_path / "w1", **kw))
    tokenize(cfg(src, tmp_path / "w2", workers=2, **kw))
    ref = tree(tmp_path / "w1")
    assert tree(tmp_path / "w2") == ref
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "conceptlm", "data", "tokenize", f"source={src}", f"out={tmp_path / 'r2'}",
                        "text_unit=line", f"tokenizer={tok_dir}", "docs_per_shard=9", "val_fraction=0.25",
                        "progress=false"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert tree(tmp_path / "r2") == ref


KILLER = textwrap.dedent("""
    import json, os, signal, sys
    import conceptlm.data.token_pieces as t
    import conceptlm.data.tokenize as verb
    from conceptlm.data.config import TokenizeConfig

    cfg = TokenizeConfig(**json.loads(sys.argv[1]))
    mode, piece, log = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    save, write = t._save_npy, t.write_piece

    def save_npy(path, arr):  # killed half-way through writing a shard: a temporary file is left behind
        if mode == "in-shard" and path.name == f"{piece:05d}.tokens.npy" and path.parent.name == "validation":
            with open(path.parent / f".tmp-{path.name}.x", "wb") as f:
                f.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        save(path, arr)

    def atomic_write_text(path, text):  # killed after the shards, before the completion record
        if mode == "before-record" and path.name == f"{piece:05d}.json":
            os.kill(os.getpid(), signal.SIGKILL)
        t_atomic(path, text)

    def write_piece(out, k, read, buffers):
        with open(log, "a") as f:
            f.write(f"{k}\\n")
        write(out, k, read, buffers)

    t_atomic = t.atomic_write_text
    t._save_npy, t.atomic_write_text, t.write_piece = save_npy, atomic_write_text, write_piece
    verb.tokenize(cfg)
""")


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_the_missing_pieces_byte_identical(tmp_path):
    src = lines_file(tmp_path / "l.txt", make_docs(90, seed=7))
    base = dict(source=str(src), text_unit="line", docs_per_shard=10, val_fraction=0.25, vocab_size=300,
                progress=False)
    tokenize(TokenizeConfig(**base, out=str(tmp_path / "ref")))
    ref = tree(tmp_path / "ref")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    args = json.dumps({**base, "out": str(out)})
    log = tmp_path / "pieces.log"
    for mode, piece in (("in-shard", 3), ("before-record", 6), ("none", -1)):
        r = subprocess.run([sys.executable, "-c", KILLER, args, mode, str(piece), str(log)], env=env,
                           capture_output=True, text=True, timeout=300)
        if mode == "none":
            assert r.returncode == 0, r.stderr[-2000:]
        else:
            assert r.returncode == -9, r.stderr[-2000:]
            assert json.loads((out / "artifact.json").read_text())["complete"] is False
    written = [int(x) for x in log.read_text().split()]
    # run 1 wrote pieces 0-2 and died in 3; run 2 redid 3, wrote 4, 5 and died before 6's record; run 3 did 6-8
    assert written == [0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8]
    assert tree(out) == ref
    assert np.array_equal(TokenShards(out).tokens(0, 50), TokenShards(tmp_path / "ref").tokens(0, 50))
