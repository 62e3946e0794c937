"""The prepare verb and EmbeddedDocuments: Parquet round trip, resumption after an exception and after SIGKILL
(no duplicates, no holes, same bytes), settings/input changes refused, bad input, caps, splits, the normalizer."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conceptlm.core.errors import ConceptLMError, ConfigError, DataError
from conceptlm.lcm.config import DocsSection, EncoderSection, PrepareConfig, PrepareSection, SegmentSection
from conceptlm.lcm.data import prepare as prep_mod
from conceptlm.lcm.data.documents import iter_documents
from conceptlm.lcm.data.encoders import get_encoder
from conceptlm.lcm.data.normalizer import RobustNormalizer
from conceptlm.lcm.data.prepare import prepare, segment_document
from conceptlm.lcm.data.segment import get_segmenter
from conceptlm.lcm.data.store import EmbeddedDocuments, assign_split
from tests.lcm.test_encoders import SHARED_YELP, make_tiny_st_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    return make_tiny_st_dir(tmp_path_factory.mktemp("enc") / "tiny")


def _cfg(encoder_dir: Path, out: Path, **prepare_kw) -> PrepareConfig:
    docs = prepare_kw.pop("docs", DocsSection(n_documents=23, seed=1))
    prepare_kw.setdefault("shard_size", 5)
    prepare_kw.setdefault("val_fraction", 0.2)
    return PrepareConfig(docs=docs, segment=SegmentSection(max_chars=64),
                         encoder=EncoderSection(name=str(encoder_dir), batch_size=8),
                         prepare=PrepareSection(out_dir=str(out), **prepare_kw))


def _contents(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.parquet"))} | {
        "normalizer.json": (root / "normalizer.json").read_bytes()}


def test_parquet_round_trip_boundaries_vectors_and_normalizer(tiny_encoder_dir, tmp_path):
    cfg = _cfg(tiny_encoder_dir, tmp_path / "out")
    summary = prepare(cfg)
    assert (summary["n_documents"], summary["n_shards"], summary["shards_written"]) == (23, 5, 5)
    ds = EmbeddedDocuments(tmp_path / "out")
    seg, enc = get_segmenter(cfg.segment), get_encoder(cfg.encoder)
    expected = list(iter_documents(cfg.docs))
    assert len(ds) == 23 and ds.ids == [i for i, _ in expected]
    items = [ds[k] for k in range(len(ds))]
    direct = enc.encode([s for it in items for s in it["sentences"]]).split([len(it["sentences"]) for it in items])
    for (doc_id, text), item, vec in zip(expected, items, direct):
        assert item["id"] == doc_id
        assert item["sentences"] == seg.split(text) + ["End of text."]
        assert item["vectors"].dtype == torch.float32 and item["vectors"].shape == (len(item["sentences"]), 32)
        torch.testing.assert_close(item["vectors"], vec, atol=2e-3, rtol=2e-3)
    assert ds.lengths == [len(ds[k]["sentences"]) for k in range(len(ds))]
    train, val = EmbeddedDocuments(tmp_path / "out", "train"), EmbeddedDocuments(tmp_path / "out", "validation")
    assert sorted(train.ids + val.ids) == sorted(ds.ids) and not set(train.ids) & set(val.ids)
    assert all(assign_split(i, 0.2) == "validation" for i in val.ids) and len(val) == summary["n_validation_documents"]
    # the normalizer is fitted on the stored training vectors
    x = torch.cat([train[k]["vectors"] for k in range(len(train))])
    ref = RobustNormalizer(32).fit(x)
    norm = ds.normalizer()
    assert torch.equal(norm.center, ref.center) and torch.equal(norm.scale, ref.scale) and norm.n_fit == len(x)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["encoder"]["fingerprint"] == enc.identity()["fingerprint"]
    assert manifest["segmenter"]["max_chars"] == 64 and manifest["n_sentences"] == sum(ds.lengths)


def test_resume_after_exception_has_no_duplicates_or_holes(tiny_encoder_dir, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    prepare(_cfg(tiny_encoder_dir, clean))
    real_write = prep_mod._write_shard

    def write_then_die(path, *args, **kw):
        real_write(path, *args, **kw)
        if path.name == "shard-00001.parquet":
            raise RuntimeError("killed")

    monkeypatch.setattr(prep_mod, "_write_shard", write_then_die)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        prepare(_cfg(tiny_encoder_dir, out))
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [  # .lock: prepare's folder lock
        "prepare_state.json", "shard-00000.parquet", "shard-00001.parquet"]
    monkeypatch.setattr(prep_mod, "_write_shard", real_write)
    summary = prepare(_cfg(tiny_encoder_dir, out))
    assert (summary["shards_reused"], summary["shards_written"]) == (2, 3)
    assert _contents(out) == _contents(clean)  # byte for byte
    again = prepare(_cfg(tiny_encoder_dir, out))
    assert (again["shards_reused"], again["shards_written"]) == (5, 0)


_KILL_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from conceptlm.lcm.data import prepare as prep_mod
from tests.lcm.test_prepare import _cfg
real = prep_mod._write_shard
def slow(path, *a, **k):
    real(path, *a, **k)
    time.sleep(30)
prep_mod._write_shard = slow
prep_mod.prepare(_cfg(Path({enc!r}), Path({out!r})))
"""


@pytest.mark.slow
def test_resume_after_sigkill(tiny_encoder_dir, tmp_path):
    out = tmp_path / "killed"
    script = _KILL_SCRIPT.format(repo=str(REPO), enc=str(tiny_encoder_dir), out=str(out))
    env = dict(os.environ, CONCEPTLM_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (out / "shard-00000.parquet").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "subprocess did not write a shard in time"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists()
    summary = prepare(_cfg(tiny_encoder_dir, out))
    assert summary["shards_reused"] == 1 and summary["shards_written"] == 4
    clean = tmp_path / "clean"
    prepare(_cfg(tiny_encoder_dir, clean))
    assert _contents(out) == _contents(clean)
    assert not list(out.glob(".tmp-*"))


def test_changed_settings_or_input_are_refused(tiny_encoder_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(_cfg(tiny_encoder_dir, out))
    cfg = _cfg(tiny_encoder_dir, out)
    cfg.segment.max_chars = 32
    with pytest.raises(ConfigError, match="segment.max_chars") as e:
        prepare(cfg)
    assert "\n" not in str(e.value)
    # same settings, but the generator now yields other documents for shard 0
    monkeypatch.setattr(prep_mod, "iter_documents",
                        lambda section, **kw: ((f"other-{i}", "Some text. More text.") for i in range(23)))
    with pytest.raises(ConceptLMError, match="holds other documents"):
        prepare(_cfg(tiny_encoder_dir, out))


def test_bad_input_error_or_counted_skip(tiny_encoder_dir, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "A fine document. It has two sentences."}\n{"text": "bad \xff"}\n'
                     b'{"text": ""}\n{"text": "Another one."}\n{"text": "\\ud800 lone surrogate."}\n')
    docs = DocsSection(source=str(path))
    with pytest.raises(DataError, match=r"docs\.jsonl:2: not valid UTF-8") as e:
        prepare(_cfg(tiny_encoder_dir, tmp_path / "b", docs=docs, val_fraction=0.0))
    assert "\n" not in str(e.value)
    # the same folder, now skipping the bad records
    summary = prepare(_cfg(tiny_encoder_dir, tmp_path / "b", docs=docs, skip_bad=True, val_fraction=0.0))
    assert summary["n_documents"] == 2
    assert summary["skipped"] == {"bad_record": 1, "bad_text": 1, "empty_document": 1}
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["skipped"] == summary["skipped"]
    assert [d for d in EmbeddedDocuments(tmp_path / "b").ids] == ["docs.jsonl:1", "docs.jsonl:4"]


def test_caps_wrap_and_end_of_text():
    seg = get_segmenter()
    text = "One. Two. Three. Four. Five."
    assert segment_document("d", text, seg, PrepareSection()) == [
        ("d", ["One.", "Two.", "Three.", "Four.", "Five.", "End of text."])]
    assert segment_document("d", text, seg, PrepareSection(end_of_text=False, max_sentences=5)) == [
        ("d", ["One.", "Two.", "Three.", "Four.", "Five."])]
    assert segment_document("d", text, seg, PrepareSection(max_sentences=4)) == [
        ("d", ["One.", "Two.", "Three.", "Four."])]
    assert segment_document("d", text, seg, PrepareSection(max_sentences=4, long_documents="wrap")) == [
        ("d#0", ["One.", "Two.", "Three.", "Four."]), ("d#1", ["Five.", "End of text."])]
    assert segment_document("d", "   ", seg, PrepareSection()) == []


def test_wrapped_chunks_share_the_split(tiny_encoder_dir, tmp_path):
    cfg = _cfg(tiny_encoder_dir, tmp_path / "w", max_sentences=4, long_documents="wrap", val_fraction=0.5,
               docs=DocsSection(n_documents=6, seed=2))
    prepare(cfg)
    ds, val = EmbeddedDocuments(tmp_path / "w"), set(EmbeddedDocuments(tmp_path / "w", "validation").ids)
    assert all(n <= 4 for n in ds.lengths) and any("#1" in i for i in ds.ids)
    for i in ds.ids:
        assert (i in val) == (assign_split(i.split("#")[0], 0.5) == "validation")


def test_incomplete_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConceptLMError, match="no manifest.json") as e:
        EmbeddedDocuments(tmp_path)
    assert "\n" not in str(e.value)


def test_yelp_reviews_prepare(tiny_encoder_dir, tmp_path):
    if not SHARED_YELP.is_file():
        pytest.skip(f"shared data not available ({SHARED_YELP})")
    docs = DocsSection(source=str(SHARED_YELP), text_field="messages.1.content", unescape=True, limit=12)
    summary = prepare(_cfg(tiny_encoder_dir, tmp_path / "y", docs=docs))
    ds = EmbeddedDocuments(tmp_path / "y")
    assert summary["n_documents"] == 12 and ds[0]["id"] == "yelp_test.jsonl:1"
    assert all(len(s) <= 64 or " " not in s for k in range(len(ds)) for s in ds[k]["sentences"])


def test_lazy_row_group_reading_equals_one_group_shards(tiny_encoder_dir, tmp_path):
    """Bounded row groups read through a 1-group LRU give the same documents as shards written with one row group
    (the layout before row groups were bounded); the index is numpy arrays; the cache never holds more."""
    import numpy as np
    import pyarrow.parquet as pq

    small, whole = tmp_path / "small", tmp_path / "whole"
    prepare(_cfg(tiny_encoder_dir, small, row_group_size=2))
    prepare(_cfg(tiny_encoder_dir, whole, row_group_size=1000))
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in sorted(small.glob("shard-*"))] == [3, 3, 3, 3, 2]
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in sorted(whole.glob("shard-*"))] == [1] * 5
    for split in ("all", "train", "validation"):
        lazy, ref = EmbeddedDocuments(small, split, cache_row_groups=1), EmbeddedDocuments(whole, split)
        assert len(lazy) == len(ref) and lazy.lengths == ref.lengths and lazy.ids == ref.ids
        assert lazy._shard_of.dtype == lazy._group_of.dtype == lazy._row_of.dtype == np.int32
        order = torch.randperm(len(lazy), generator=torch.Generator().manual_seed(0)).tolist()
        for i in order:
            a, b = lazy[i], ref[i]
            assert a["id"] == b["id"] and a["sentences"] == b["sentences"] and torch.equal(a["vectors"], b["vectors"])
            assert len(lazy._cache) == 1
        assert lazy[-1]["id"] == ref[len(ref) - 1]["id"]
        with pytest.raises(IndexError):
            lazy[len(lazy)]
    # the row groups of document i: shard i // 5, group (i % 5) // 2, row (i % 5) % 2
    ds = EmbeddedDocuments(small)
    i = np.arange(23)
    assert ds._shard_of.tolist() == (i // 5).tolist() and ds._group_of.tolist() == (i % 5 // 2).tolist()
    assert ds._row_of.tolist() == (i % 5 % 2).tolist()


def test_streaming_normalizer_fit_exact_then_seeded_uniform_sample(tiny_encoder_dir, tmp_path):
    """Under normalizer_max_fit_vectors the streaming fit equals fitting on the (strided) training matrix; beyond it
    it equals fitting on the bottom-k sample of PCG64(seed) keys, whatever the row groups; the setting is part of
    the folder's identity."""
    import numpy as np

    from conceptlm.core.artifact import read_manifest

    out = tmp_path / "out"
    cfg = _cfg(tiny_encoder_dir, out, row_group_size=2)
    prepare(cfg)
    records = json.loads((out / "manifest.json").read_text())["shards"]
    train = EmbeddedDocuments(out, "train")
    x = torch.cat([train[k]["vectors"] for k in range(len(train))])
    n = len(x)
    assert n > 100

    def fit(**kw) -> RobustNormalizer:
        sec = PrepareSection(out_dir=str(out), **kw)
        return prep_mod.fit_normalizer_streaming(out, records, 32, sec)

    def same(a: RobustNormalizer, b: RobustNormalizer) -> bool:
        return torch.equal(a.center, b.center) and torch.equal(a.scale, b.scale) and a.n_fit == b.n_fit

    assert same(fit(), RobustNormalizer(32).fit(x))
    stride = -(-n // 50)  # normalizer_max_samples=50: every stride-th vector, as before
    assert same(fit(normalizer_max_samples=50), RobustNormalizer(32).fit(x[::stride]))
    assert same(fit(normalizer_max_fit_vectors=n), RobustNormalizer(32).fit(x))  # exactly at the bound: exact
    for seed, m in ((0, 40), (3, 40), (0, n - 1)):
        keys = np.random.Generator(np.random.PCG64(seed)).random(n)
        idx = np.sort(np.argsort(keys)[:m])
        got = fit(normalizer_max_fit_vectors=m, normalizer_sample_seed=seed)
        assert got.n_fit == m and same(got, RobustNormalizer(32).fit(x[torch.from_numpy(idx)]))
    assert not same(fit(normalizer_max_fit_vectors=40), fit(normalizer_max_fit_vectors=40, normalizer_sample_seed=3))
    sel = x[::stride]  # both: the sample is drawn from the strided vectors
    keys = np.random.Generator(np.random.PCG64(0)).random(len(sel))
    idx = torch.from_numpy(np.sort(np.argsort(keys)[:20]))
    assert same(fit(normalizer_max_samples=50, normalizer_max_fit_vectors=20), RobustNormalizer(32).fit(sel[idx]))
    # one row group per shard: the same fit
    whole = tmp_path / "whole"
    prepare(_cfg(tiny_encoder_dir, whole, row_group_size=1000))
    sec = PrepareSection(out_dir=str(whole), normalizer_max_fit_vectors=40)
    assert same(prep_mod.fit_normalizer_streaming(whole, records, 32, sec), fit(normalizer_max_fit_vectors=40))
    # recorded in the identity: another bound is another folder
    assert read_manifest(out)["settings"]["prepare"]["normalizer_max_fit_vectors"] == 1_000_000
    with pytest.raises(ConfigError, match="prepare.normalizer_max_fit_vectors"):
        prepare(_cfg(tiny_encoder_dir, out, row_group_size=2, normalizer_max_fit_vectors=40))


def _folder(root: Path) -> dict[str, bytes]:
    """Every file of a prepared folder (shards, normalizer, state and both manifests), not the lock."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_two_workers_write_the_same_folder_and_finish_a_killed_run(tiny_encoder_dir, tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    prepare(_cfg(tiny_encoder_dir, one))
    summary = prepare(_cfg(tiny_encoder_dir, two, workers=2))
    assert (summary["shards_written"], summary["workers"]) == (5, 2)
    assert _folder(two) == _folder(one)  # shards, normalizer, prepare_state, artifact and manifest: byte for byte
    # a run that died after two shards, finished by 2 workers: only the missing shards are written
    real_write = prep_mod._write_shard

    def write_then_die(path, *args, **kw):
        real_write(path, *args, **kw)
        if path.name == "shard-00001.parquet":
            raise RuntimeError("killed")

    monkeypatch.setattr(prep_mod, "_write_shard", write_then_die)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        prepare(_cfg(tiny_encoder_dir, out))
    monkeypatch.setattr(prep_mod, "_write_shard", real_write)
    summary = prepare(_cfg(tiny_encoder_dir, out, workers=2))
    assert (summary["shards_reused"], summary["shards_written"]) == (2, 3)
    assert _folder(out) == _folder(one)


_FIFO_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from conceptlm.lcm.config import DocsSection
from conceptlm.lcm.data import prepare as prep_mod
from tests.lcm.test_prepare import _cfg
prep_mod.prepare(_cfg(Path({enc!r}), Path({out!r}), workers=2, docs=DocsSection(source={src!r})))
"""


@pytest.mark.slow
def test_resume_after_sigkill_with_two_workers(tiny_encoder_dir, tmp_path):
    """The documents come through a named pipe, so the run is killed (with its workers) at a known point: after
    shards 0 and 1, the next documents not yet given; the rerun with 2 workers writes only shards 2-4."""
    import threading

    from conceptlm.lcm.data.documents import generate_document

    lines = [json.dumps({"text": generate_document(1, i)}) + "\n" for i in range(23)]
    (tmp_path / "file").mkdir()
    (tmp_path / "pipe").mkdir()
    source = tmp_path / "file" / "docs.jsonl"  # the same name: document ids are <file>:<line>
    source.write_text("".join(lines))
    fifo = tmp_path / "pipe" / "docs.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "killed"
    script = _FIFO_SCRIPT.format(repo=str(REPO), enc=str(tiny_encoder_dir), out=str(out), src=str(fifo))
    env = dict(os.environ, CONCEPTLM_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    writer: dict = {}

    def feed() -> None:
        writer["fh"] = fh = open(fifo, "w")  # noqa: SIM115 - blocks until prepare opens the pipe
        fh.write("".join(lines[:12]))  # shards 0 and 1 fill up; documents 11-12 wait for more
        fh.flush()

    threading.Thread(target=feed, daemon=True).start()
    try:
        deadline = time.time() + 180
        while not ((out / "shard-00000.parquet").exists() and (out / "shard-00001.parquet").exists()):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "prepare did not write two shards in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # prepare and its worker processes
        proc.wait()
        if "fh" in writer:
            with contextlib.suppress(OSError):
                writer["fh"].close()
    assert not (out / "manifest.json").exists() and not (out / "shard-00002.parquet").exists()
    cfg = _cfg(tiny_encoder_dir, out, workers=2, docs=DocsSection(source=str(source)))
    summary = prepare(cfg)
    assert (summary["shards_reused"], summary["shards_written"]) == (2, 3)
    clean = tmp_path / "clean"
    prepare(_cfg(tiny_encoder_dir, clean, docs=DocsSection(source=str(source))))
    assert _folder(out) == _folder(clean)
    assert not list(out.glob(".tmp-*"))


_RANK_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from conceptlm.lcm.data.prepare import prepare
from tests.lcm.test_prepare import _cfg
s = prepare(_cfg(Path({enc!r}), Path({out!r})))
# one write per rank (the ranks share the pipe)
sys.stdout.write(json.dumps({{k: s[k] for k in ("ranks", "shards_written", "shards_reused", "n_documents",
                                               "fingerprint")}}) + chr(10))
sys.stdout.flush()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_torchrun_ranks_write_the_same_folder(tiny_encoder_dir, tmp_path):
    """Under torchrun each rank writes the shards k % 2 == rank, rank 0 the normalizer and manifests: the folder
    equals the one-process one byte for byte; a second 2-rank run reuses every shard."""
    one = tmp_path / "one"
    prepare(_cfg(tiny_encoder_dir, one))
    out = tmp_path / "ranks"
    script = tmp_path / "rank_prepare.py"
    script.write_text(_RANK_SCRIPT.format(repo=str(REPO), enc=str(tiny_encoder_dir), out=str(out)))
    env = dict(os.environ, OMP_NUM_THREADS="1", CONCEPTLM_NO_PROGRESS="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'src'}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    for written in (5, 0):
        run = subprocess.run(cmd, env=env, cwd=REPO, timeout=300, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        summaries = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", run.stdout)]  # however the writes interleave
        assert len(summaries) == 2 and all(s["ranks"] == 2 and s["n_documents"] == 23 for s in summaries)
        assert all(s["shards_written"] == written and s["shards_reused"] == 5 - written for s in summaries)
        assert _folder(out) == _folder(one)
