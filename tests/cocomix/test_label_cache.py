"""Label cache: cached labels equal online labels bit for bit; a run killed mid-way (exception, real SIGKILL) resumes
to the identical files; a cache of another configuration is refused; the reader and the Dataset."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptlm.cocomix.attribution import ConceptLabeler
from conceptlm.cocomix.config import CorpusSection, LabelSection, TeacherSection
from conceptlm.cocomix.corpus import build_corpus, load_documents
from conceptlm.cocomix.label_cache import (
    HEADER,
    LABELS,
    MASK,
    PROGRESS,
    CacheSpec,
    LabelCache,
    LabelCacheError,
    LabeledWindows,
    label_dtype,
    state_fingerprint,
    write_label_cache,
)
from conceptlm.cocomix.labels import LABELS_DIR, label, open_labeled_windows
from conceptlm.cocomix.sae import load_sae, save_sae
from conceptlm.cocomix.sae_train import SAE_DIR
from conceptlm.cocomix.teacher import load_teacher, teacher_identity
from conceptlm.core.config import RunSection
from conceptlm.core.errors import ConfigError
from conceptlm.core.hf import build_tiny_model, save_model
from conceptlm.core.tokenizer import train_bpe_tokenizer
from tests.cocomix.test_attribution import VOCAB, make_sae, make_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
N, T = 22, 10


def make_windows(n: int = N, t: int = T, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def make_labeler(sae_seed: int = 0, **section) -> ConceptLabeler:
    return ConceptLabeler(make_teacher("llama"), make_sae(sae_seed), 1, LabelSection(**section))


def spec_for(labeler: ConceptLabeler, batch_size: int = 4, chunk_windows: int = 8, **corpus) -> CacheSpec:
    return CacheSpec(teacher={"name": "tiny-llama", "sha256": state_fingerprint(labeler.teacher)},
                     corpus={"name": "random", "split": "train", **corpus}, batch_size=batch_size,
                     chunk_windows=chunk_windows)


def files(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in (HEADER, LABELS, MASK, PROGRESS)}


class FailingLabeler(ConceptLabeler):
    """Raises on call number ``fail_at`` (a crash in the middle of a chunk)."""

    def __init__(self, base: ConceptLabeler, fail_at: int):
        super().__init__(base.teacher, base.sae, base.layer, base.section)
        self.calls, self.fail_at = 0, fail_at

    def forward(self, input_ids):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return super().forward(input_ids)


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """An uninterrupted cache of the default configuration."""
    path = tmp_path_factory.mktemp("cache") / "train"
    lab = make_labeler()
    summary = write_label_cache(path, make_windows(), lab, spec_for(lab), progress=False)
    return path, summary


# ------------------------------------------------------------------------------------------------- contents
def test_cached_labels_equal_online_labels_bit_for_bit(complete):
    path, summary = complete
    assert summary["windows"] == N and summary["tokens"] == N * T and summary["computed_windows"] == N
    assert summary["resumed_from"] == 0 and summary["tokens_per_s"] > 0
    lab, windows, cache = make_labeler(), make_windows(), LabelCache(path)
    assert len(cache) == N and cache.window == T and cache.k_attr == 4
    for b in range(0, N, 4):  # the batches the cache was written with
        online = lab.labels(windows[b:b + 4])
        for i in range(b, min(N, b + 4)):
            labels, mask = cache[i]
            assert labels.dtype == torch.long and mask.dtype == torch.bool
            assert torch.equal(labels, online.labels[i - b]) and torch.equal(mask, online.mask[i - b])
    assert not cache[0][1][-1] and cache[0][1][:-1].all()  # the last position is masked on disk too
    assert np.load(path / LABELS).dtype == np.uint16 and np.load(path / MASK).dtype == np.uint8
    header = json.loads((path / HEADER).read_text())
    assert header["n_windows"] == N and header["window"] == T and header["k_attr"] == 4
    assert header["dtype"] == "uint16" and header["labeling"]["mode"] == "post"
    assert header["sae"]["sha256"] == state_fingerprint(lab.sae) and header["corpus"]["tokens_sha256"]
    assert json.loads((path / PROGRESS).read_text()) == {"windows_done": N, "chunks_done": 3, "complete": True}


def test_label_dtype_and_a_wide_sae_cache(tmp_path):
    assert label_dtype(65535) == np.uint16 and label_dtype(65536) == np.int32
    sae = make_sae(n_latents=70_000)
    lab = ConceptLabeler(make_teacher("gpt2"), sae, 1, LabelSection(k_attr=2))
    windows = make_windows(n=3)
    write_label_cache(tmp_path, windows, lab, spec_for(lab, batch_size=3, chunk_windows=3), progress=False)
    assert np.load(tmp_path / LABELS).dtype == np.int32
    labels, mask = LabelCache(tmp_path)[1]
    assert torch.equal(labels, lab(windows)[0][1]) and labels.max() < 70_000


def test_complete_cache_is_not_recomputed(complete):
    path, _ = complete
    before = files(path)
    lab = make_labeler()
    summary = write_label_cache(path, make_windows(), lab, spec_for(lab), progress=False)
    assert summary["computed_windows"] == 0 and summary["resumed_from"] == N and files(path) == before


# --------------------------------------------------------------------------------------------------- resume
def test_crash_mid_chunk_resumes_to_identical_files(tmp_path, complete):
    lab, windows = make_labeler(), make_windows()
    with pytest.raises(RuntimeError, match="simulated crash"):  # 2 batches per chunk: crash in chunk 3
        write_label_cache(tmp_path, windows, FailingLabeler(lab, fail_at=5), spec_for(lab), progress=False)
    assert json.loads((tmp_path / PROGRESS).read_text()) == {"windows_done": 16, "chunks_done": 2,
                                                             "complete": False}
    with pytest.raises(LabelCacheError, match="incomplete label cache"):
        LabelCache(tmp_path)
    arr = np.load(tmp_path / LABELS, mmap_mode="r+")  # a half-written chunk after the last progress record
    arr[16:20] = 7
    arr.flush()
    del arr
    summary = write_label_cache(tmp_path, windows, lab, spec_for(lab), progress=False)
    assert summary["resumed_from"] == 16 and summary["computed_windows"] == N - 16
    assert files(tmp_path) == files(complete[0])


@pytest.mark.slow
def test_sigkill_mid_run_resumes_to_identical_files(tmp_path, complete):
    """A real SIGKILL of a writing process at an arbitrary point (a few chunks in), then a resume in this one."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, torch
        torch.set_num_threads(1)
        from tests.cocomix.test_label_cache import make_labeler, make_windows, spec_for
        from conceptlm.cocomix.attribution import ConceptLabeler
        from conceptlm.cocomix.label_cache import write_label_cache

        class Slow(ConceptLabeler):
            def forward(self, ids):
                time.sleep(0.05)
                return super().forward(ids)

        base = make_labeler()
        lab = Slow(base.teacher, base.sae, base.layer, base.section)
        write_label_cache({str(tmp_path / 'cache')!r}, make_windows(n=64), lab,
                          spec_for(base, batch_size=2, chunk_windows=2), progress=False)
    """))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env)
    progress, deadline = tmp_path / "cache" / PROGRESS, time.time() + 120
    try:
        while time.time() < deadline and child.poll() is None:
            if progress.exists() and json.loads(progress.read_text())["chunks_done"] >= 3:
                break
            time.sleep(0.02)
        assert child.poll() is None, "the child finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    done = json.loads(progress.read_text())
    assert not done["complete"] and 3 <= done["chunks_done"] < 32
    lab, windows = make_labeler(), make_windows(n=64)
    summary = write_label_cache(tmp_path / "cache", windows, lab, spec_for(lab, batch_size=2, chunk_windows=2),
                                progress=False)
    assert summary["resumed_from"] == done["windows_done"]
    fresh = tmp_path / "fresh"
    write_label_cache(fresh, windows, lab, spec_for(lab, batch_size=2, chunk_windows=2), progress=False)
    assert files(tmp_path / "cache") == files(fresh)


# ------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("change,field", [
    (dict(sae_seed=1), "sae.sha256"),
    (dict(k_attr=3), "k_attr"),
    (dict(mode="pre"), "labeling.mode"),
    (dict(windows_seed=4), "corpus.tokens_sha256"),
    (dict(split="val"), "corpus.split"),
    (dict(batch_size=2), "batch_size"),
])
def test_header_mismatch_is_refused(complete, change, field):
    path, _ = complete
    before = files(path)
    lab = make_labeler(sae_seed=change.get("sae_seed", 0),
                       **{k: v for k, v in change.items() if k in ("k_attr", "mode")})
    spec = spec_for(lab, batch_size=change.get("batch_size", 4), **{"split": change.get("split", "train")})
    windows = make_windows(seed=change.get("windows_seed", 3))
    with pytest.raises(LabelCacheError, match="written for another configuration") as err:
        write_label_cache(path, windows, lab, spec, progress=False)
    assert field in str(err.value) and "\n" not in str(err.value)
    assert files(path) == before  # nothing touched


def test_reader_refuses_missing_and_mismatched_caches(tmp_path, complete):
    path, _ = complete
    with pytest.raises(LabelCacheError, match="no label cache here"):
        LabelCache(tmp_path)
    with pytest.raises(LabelCacheError, match="k_attr"):
        LabelCache(path, expect={"k_attr": 5})
    lab = make_labeler()
    ok = LabelCache(path, expect={"k_attr": 4, "sae": {"sha256": state_fingerprint(lab.sae)},
                                  "labeling": {"layer": 1}})
    with pytest.raises(IndexError):
        ok[N]


# ------------------------------------------------------------------------------------------------- dataset
def test_labeled_windows_dataset_with_records_and_workers_pickling(complete):
    path, _ = complete
    tensor = make_windows()
    records = [{"id": f"w{i}", "input_ids": tensor[i].tolist()} for i in range(N)]
    cache = LabelCache(path)
    cache[0]  # opens the memory maps; pickling must drop them
    ds = LabeledWindows(records, pickle.loads(pickle.dumps(cache)))
    item = ds[5]
    assert item["id"] == "w5" and torch.equal(item["input_ids"], tensor[5])
    labels, mask = cache[5]
    assert torch.equal(item["concept_labels"], labels) and torch.equal(item["concept_mask"], mask)
    batch = next(iter(torch.utils.data.DataLoader(LabeledWindows(tensor, cache), batch_size=4)))
    assert batch["concept_labels"].shape == (4, T, 4) and batch["concept_mask"].shape == (4, T)
    with pytest.raises(LabelCacheError, match="not the ones the labels were computed"):
        LabeledWindows(make_windows(seed=9), cache)
    with pytest.raises(LabelCacheError, match="22 cached windows, but 21"):
        LabeledWindows(tensor[:21], cache)


# ------------------------------------------------------------------------------------------------ label verb
@dataclass(kw_only=True)
class LabelConfig:
    """The sections the label verb reads."""

    run: RunSection
    teacher: TeacherSection
    corpus: CorpusSection
    labels: LabelSection

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


@pytest.fixture(scope="module")
def label_run(tmp_path_factory):
    """A run folder with a tiny teacher export (model + tokenizer) and an SAE on its block 1."""
    root = tmp_path_factory.mktemp("label_run")
    corpus = CorpusSection(n_documents=24, window=16, val_fraction=0.25)
    tok = train_bpe_tokenizer(load_documents(corpus), vocab_size=300)
    model = build_tiny_model("llama", len(tok), hidden_size=32, num_layers=2, num_heads=4, seed=0,
                             eos_token_id=tok.eos_token_id)
    save_model(model, root / "teacher_export", tok)
    cfg = LabelConfig(run=RunSection(name="run", out_dir=str(root)),
                      teacher=TeacherSection(path=str(root / "teacher_export"), layer=1), corpus=corpus,
                      labels=LabelSection(batch_size=4, chunk_windows=8, progress=False))
    save_sae(make_sae(), cfg.run_dir / SAE_DIR, layer=1, teacher=teacher_identity(root / "teacher_export", 1))
    return cfg


def test_label_verb_writes_train_and_val_caches_equal_to_online_labels(label_run):
    cfg = label_run
    summary = label(cfg)
    json.dumps(summary)  # JSON-able
    cache_dir = cfg.run_dir / LABELS_DIR
    assert summary["path"] == str(cache_dir) and set(summary["splits"]) == {"train", "val"}
    teacher, tok = load_teacher(cfg.teacher)
    splits = build_corpus(cfg.corpus, tok)
    n_train, n_val = len(splits.train), len(splits.val)
    assert summary["windows"] == n_train + n_val and summary["tokens"] == (n_train + n_val) * 16
    assert summary["computed_tokens"] == summary["tokens"] and summary["tokens_per_s"] > 0
    labeler = ConceptLabeler(teacher, load_sae(cfg.run_dir / SAE_DIR), 1, cfg.labels)
    for split, data in (("train", splits.train), ("val", splits.val)):
        ds = open_labeled_windows(cache_dir / split, data, k_attr=4, n_latents=96)
        for b in range(0, len(data), 4):
            labels, mask = labeler(data.windows[b:b + 4])
            for i in range(b, min(len(data), b + 4)):
                item = ds[i]
                assert torch.equal(item["concept_labels"], labels[i - b])
                assert torch.equal(item["concept_mask"], mask[i - b]) and item["id"] == i
    again = label(cfg)  # complete caches are reused
    assert again["computed_tokens"] == 0 and again["splits"]["train"]["resumed_from"] == n_train
    with pytest.raises(LabelCacheError, match="k_attr"):
        open_labeled_windows(cache_dir / "train", splits.train, k_attr=3)


def test_label_verb_refuses_wrong_layer_missing_sae_and_changed_settings(label_run, tmp_path):
    cfg = label_run
    wrong = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, layer=0))
    with pytest.raises(ConfigError, match="trained on block 1"):
        label(wrong, output=tmp_path / "a")
    with pytest.raises(ConfigError, match="no SAE at"):
        label(cfg, checkpoint=tmp_path / "nowhere", output=tmp_path / "b")
    foreign = tmp_path / "foreign_sae"
    save_sae(make_sae(), foreign, layer=1, teacher={"path": "elsewhere", "fingerprint": "0123456789abcdef"})
    with pytest.raises(ConfigError, match="trained on another teacher"):
        label(cfg, checkpoint=foreign, output=tmp_path / "e")
    # teacher.path null and no tiny teacher in the run: the teacher the SAE names is used
    unnamed = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, path=None))
    assert label(unnamed, output=tmp_path / "f")["teacher"] == str(cfg.teacher.path)
    label(cfg, output=tmp_path / "c")
    other = dataclasses.replace(cfg, labels=dataclasses.replace(cfg.labels, mode="pre"))
    with pytest.raises(LabelCacheError, match="labeling.mode"):
        label(other, output=tmp_path / "c")
    assert label(other, output=tmp_path / "d")["splits"]["train"]["computed_windows"] > 0
