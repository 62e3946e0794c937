"""Numbers you can trust: every CoCoMix stage output carries the identity of what made it (settings + inputs by
content), a changed config is refused with one line or rebuilds exactly what is downstream of the change, the
teacher, SAE and label caches are checked by content, and the report charges each arm what it costs."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from conceptlm.cocomix.arms import make_arm
from conceptlm.cocomix.config import CocomixConfig, CorpusSection, LabelSection, TeacherSection
from conceptlm.cocomix.corpus import load_documents, split_documents
from conceptlm.cocomix.costs import count_parameters, flops_per_token
from conceptlm.cocomix.labels import label
from conceptlm.cocomix.pipeline import pipeline, report, train
from conceptlm.cocomix.sae import TopKSAE, load_sae, save_sae
from conceptlm.cocomix.sae_train import SAE_DIR
from conceptlm.cocomix.teacher import load_teacher, teacher_identity, train_tiny_teacher
from conceptlm.core.artifact import Identity, StaleArtifactError, read_manifest, write_manifest
from conceptlm.core.config import RunSection, load_config
from conceptlm.core.distributed import DistInfo
from conceptlm.core.errors import ConfigError, DataError, RunLockedError
from conceptlm.core.hf import build_tiny_model, save_model
from conceptlm.core.lock import RunLock
from conceptlm.core.metrics import read_metrics
from conceptlm.core.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = "configs/cocomix/tiny_cpu.yaml"
TINY = [
    "corpus.n_documents=120", "corpus.window=24", "teacher.hidden_size=32", "teacher.num_layers=2",
    "teacher.steps=8", "teacher.warmup_steps=1", "teacher.vocab_size=300",
    "sae.n_latents=32", "sae.k=4", "sae.steps=4", "sae.batch_size=8",
    "student.d_model=32", "student.n_layers=2", "student.max_len=24", "student.n_concepts=32", "student.concept_k=4",
    "train.max_steps=4", "train.eval_every=2", "train.save_every=2", "train.micro_batch_size=8",
    "schedule.warmup_steps=1", "train.progress=false", "labels.progress=false",
]
NAME = "cocomix_tiny"


def tiny_cfg(out_dir, *extra: str) -> CocomixConfig:
    return load_config(CocomixConfig, CONFIG, [f"run.out_dir={out_dir}", *TINY, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_torch_thread):
    """One finished tiny pipeline run (ntp + cocomix, seed 0; students checkpointed at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("trust")
    summary = pipeline(tiny_cfg(root))
    return root, summary


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A private copy of the finished run; returns its ``run.out_dir``."""
    shutil.copytree(finished[0] / NAME, tmp_path / NAME, symlinks=True)
    return tmp_path


def _final_eval(run_dir: Path) -> float:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"][-1]["ntp"]


# ------------------------------------------------------------------------------------------------ 1. changed config
def test_a_changed_config_is_refused_with_one_line_before_anything_is_rewritten(run):
    root = run / NAME
    kept = [root / "report" / "report.md", root / "report" / "report.json", root / "students" / "ntp-s0" /
            "config.yaml", root / "sae" / "sae.safetensors", root / "teacher" / "config.yaml"]
    before = {p: p.read_bytes() for p in kept}
    with pytest.raises(StaleArtifactError, match=r"^students/ntp-s0: student\.d_model \d+ -> \d+; rerun with "
                                                 r"pipeline\.on_change=rebuild$"):
        pipeline(tiny_cfg(run, "student.d_model=48"))
    with pytest.raises(StaleArtifactError, match=r"^teacher: teacher\.steps 8 -> 9; rerun with "
                                                 r"pipeline\.on_change=rebuild$"):
        pipeline(tiny_cfg(run, "teacher.steps=9"))
    with pytest.raises(StaleArtifactError, match=r"^sae: sae\.k 4 -> 5; rerun with pipeline\.on_change=rebuild$"):
        pipeline(tiny_cfg(run, "sae.k=5", "labels.k_attr=4"))
    assert {p: p.read_bytes() for p in kept} == before  # the report was not rewritten with mixed numbers


def test_an_sae_of_the_layout_before_its_own_run_folder_is_refused_or_rebuilt(run):
    """An SAE folder of format 1 (its run's checkpoints and metrics at the top of the run folder) is never mixed
    with the current layout: refused with one line, or rebuilt on request with the old top-level run removed."""
    root = run / NAME
    m = read_manifest(root / "sae")
    write_manifest(root / "sae", Identity(m["kind"], 1, m["settings"], m["inputs"]), files=list(m["files"]),
                   extra={"cost": m["cost"]})
    (root / "checkpoints" / "step_00000004").mkdir(parents=True)  # what the old SAE run left at the top
    (root / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(StaleArtifactError, match=r"^sae: format 1 -> 2; rerun with pipeline\.on_change=rebuild$"):
        pipeline(tiny_cfg(run))
    summary = pipeline(tiny_cfg(run, "pipeline.on_change=rebuild"))
    assert summary["sae"]["skipped"] is False and read_manifest(root / "sae")["format"] == 2
    assert not (root / "checkpoints").exists() and not (root / "metrics.jsonl").exists()
    assert (root / "sae" / "checkpoints").is_dir()


def test_rebuild_redoes_exactly_the_stages_downstream_of_a_student_change(run, caplog):
    caplog.set_level(logging.INFO)
    cfg = tiny_cfg(run, "student.d_model=48", "pipeline.on_change=rebuild")
    summary = pipeline(cfg)
    assert summary["sae"]["skipped"] is True
    assert {k: v["skipped"] for k, v in summary["students"].items()} == {"ntp-s0": False, "cocomix-s0": False}
    for line in ("teacher: reused", "sae: reused", "labels/train: reused", "labels/val: reused",
                 "students/ntp-s0: rebuilding (student.d_model 32 -> 48",
                 "students/cocomix-s0: rebuilding (student.d_model 32 -> 48"):
        assert line in caplog.text
    # the report's sizes are each run's own (the new ones), next to that run's own losses
    arms = json.loads((cfg.run_dir / "report" / "report.json").read_text())["arms"]
    for arm in ("ntp", "cocomix"):
        student, _ = make_arm(arm, dataclasses.replace(cfg.student, vocab_size=300), cfg.cocomix, seq_len=24)
        assert arms[arm]["active_parameters"] == count_parameters(student)["active"]
        assert arms[arm]["final_val_loss"] == pytest.approx(_final_eval(cfg.run_dir / "students" / f"{arm}-s0"))


def test_an_sae_change_rebuilds_the_sae_the_labels_and_the_concept_students_but_not_ntp(run):
    root = run / NAME
    labels_before = read_manifest(root / "labels" / "train")["fingerprint"]
    ntp_before = (root / "students" / "ntp-s0" / "artifact.json").read_bytes()
    summary = pipeline(tiny_cfg(run, "sae.steps=5", "pipeline.on_change=rebuild"))
    assert summary["sae"]["skipped"] is False
    assert read_manifest(root / "sae")["settings"]["sae"]["steps"] == 5
    assert read_manifest(root / "labels" / "train")["fingerprint"] != labels_before
    assert summary["students"]["ntp-s0"]["skipped"] is True  # it reads no labels
    assert summary["students"]["cocomix-s0"]["skipped"] is False
    assert (root / "students" / "ntp-s0" / "artifact.json").read_bytes() == ntp_before


def test_an_interrupted_student_resumes_but_not_with_changed_settings(run, finished):
    student = run / NAME / "students" / "ntp-s0"
    shutil.rmtree(student / "checkpoints" / "step_00000004")  # stopped after its step-2 checkpoint
    (student / "checkpoints" / "latest").write_text("step_00000002\n")
    if (student / "artifact.json").is_file():  # as recorded when the run started: its identity, no files yet
        m = json.loads((student / "artifact.json").read_text())
        (student / "artifact.json").write_text(json.dumps({**m, "files": {}, "complete": False}))
    # train.max_steps is free to change on a plain resume: here it would silently continue another schedule
    with pytest.raises(StaleArtifactError, match=r"^students/ntp-s0: train\.max_steps 4 -> 6; rerun"):
        pipeline(tiny_cfg(run, "train.max_steps=6"))
    summary = pipeline(tiny_cfg(run))
    assert summary["students"]["ntp-s0"]["skipped"] is False and summary["students"]["cocomix-s0"]["skipped"]
    assert _final_eval(student) == _final_eval(finished[0] / NAME / "students" / "ntp-s0")  # same as uninterrupted
    assert read_manifest(student).get("complete", True) is True


def test_a_moved_run_folder_is_reused_and_reuse_is_logged(run, caplog):
    caplog.set_level(logging.INFO)
    shutil.move(run / NAME, run / "moved")
    summary = pipeline(tiny_cfg(run, "run.name=moved"))
    assert summary["sae"]["skipped"] is True and all(v["skipped"] for v in summary["students"].values())
    for line in ("teacher: reused", "sae: reused", "labels/train: reused", "students/ntp-s0: reused",
                 "students/cocomix-s0: reused"):
        assert line in caplog.text


# ------------------------------------------------------------------------------------------------ 2. the report
def test_the_report_is_built_from_each_runs_own_config_and_refuses_other_ones(run, finished):
    arms = finished[1]["report"]["arms"]
    with pytest.raises(StaleArtifactError, match=r"^students/ntp-s0: student\.d_model"):
        report(tiny_cfg(run, "student.d_model=48"))
    flagged = report(tiny_cfg(run, "student.d_model=48", "pipeline.on_change=rebuild"))
    for arm in ("ntp", "cocomix"):  # the sizes of the runs as they were trained, not of the current config
        assert flagged["arms"][arm]["active_parameters"] == arms[arm]["active_parameters"]
        assert flagged["arms"][arm]["train_flops_per_token"] == arms[arm]["train_flops_per_token"]
    assert any("ntp-s0: stale" in n for n in flagged["notes"])
    assert "ntp-s0: stale" in (run / NAME / "report" / "report.md").read_text()


def test_the_report_charges_label_extraction_and_lists_one_off_costs(finished):
    from conceptlm.cocomix.costs import label_flops_per_token, sae_train_flops, teacher_forward_flops

    root, summary = finished
    cfg = tiny_cfg(root)
    arms = json.loads((cfg.run_dir / "report" / "report.json").read_text())
    teacher, _ = load_teacher(cfg.teacher, path=str(cfg.run_dir / "teacher"))
    per_label = label_flops_per_token(teacher, 1, n_latents=32, k=4, labels=cfg.labels)
    for arm, extra in (("ntp", 0.0), ("cocomix", per_label)):
        student, _ = make_arm(arm, dataclasses.replace(cfg.student, vocab_size=300), cfg.cocomix, seq_len=24)
        assert arms["arms"][arm]["train_flops_per_token"] == pytest.approx(
            flops_per_token(student, 24)["total"] + extra)
    assert arms["arms"]["cocomix"]["label_flops_per_token"] == pytest.approx(per_label)
    one = arms["one_off"]
    assert one["teacher_training"] == {"tokens": 8 * 16 * 24,
                                       "flops": pytest.approx(3 * teacher_forward_flops(teacher) * 8 * 16 * 24)}
    assert one["sae_training"]["flops"] == pytest.approx(
        sae_train_flops(teacher, 1, n_latents=32, k=4, tokens=4 * 8 * 24))
    assert one["label_pass"]["flops"] == pytest.approx(per_label * one["label_pass"]["tokens"])
    assert "One-off costs" in (cfg.run_dir / "report" / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ 3. identities
def _llama(tie: bool) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=50, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tie", [True, False])
def test_kd_teacher_forward_flops_by_hand_tied_and_untied(tie):
    from conceptlm.cocomix.costs import label_flops_per_token, teacher_forward_flops

    model = _llama(tie)
    block = 4 * 16 * 16 + 3 * 16 * 40  # q, k, v, o + gate, up, down; norms are no matmul
    head = 50 * 16  # tied or not, every position is multiplied by the (V, d) matrix; the lookup costs nothing
    assert teacher_forward_flops(model) == 2 * (2 * block + head)
    # labels: the whole forward + input gradients above block 0 (block 1 and the head) + SAE encoder + k rows
    post = LabelSection(mode="post")
    assert label_flops_per_token(model, 0, n_latents=32, k=4, labels=post) == \
        2 * (2 * block + head) + 2 * (block + head) + 2 * 32 * 16 + 2 * 4 * 16
    pre = LabelSection(mode="pre")
    assert label_flops_per_token(model, 0, n_latents=32, k=4, labels=pre) == \
        2 * (2 * block + head) + 2 * (block + head) + 2 * 32 * 16 + 2 * 32 * 16
    act = LabelSection(selection="activation")  # the pass stops after block 0, no backward
    assert label_flops_per_token(model, 0, n_latents=32, k=4, labels=act) == 2 * block + 2 * 32 * 16


def test_kd_teacher_forward_flops_of_gpt2_conv1d_by_hand():
    from conceptlm.cocomix.costs import teacher_forward_flops

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50,
                                                                 n_positions=32, bos_token_id=0, eos_token_id=0))
    assert teacher_forward_flops(model) == 2 * (2 * 12 * 16 * 16 + 50 * 16)  # c_attn 3d², c_proj d², MLP 8d²


def test_a_reinitialised_teacher_of_the_same_shape_is_another_teacher(tmp_path):
    @dataclasses.dataclass(kw_only=True)
    class Cfg:
        run: RunSection
        teacher: TeacherSection
        corpus: CorpusSection
        labels: LabelSection

        @property
        def run_dir(self) -> Path:
            return Path(self.run.out_dir) / self.run.name

    corpus = CorpusSection(n_documents=24, window=16, val_fraction=0.25)
    tok = train_bpe_tokenizer(load_documents(corpus), vocab_size=300)
    export = tmp_path / "teacher_export"
    save_model(build_tiny_model("llama", len(tok), hidden_size=32, num_layers=2, num_heads=4, seed=0), export, tok)
    cfg = Cfg(run=RunSection(name="run", out_dir=str(tmp_path)), teacher=TeacherSection(path=str(export), layer=1),
              corpus=corpus, labels=LabelSection(batch_size=4, chunk_windows=8, k_attr=2, progress=False))
    first = teacher_identity(export, 1)
    save_sae(TopKSAE(32, 24, 4, seed=0), cfg.run_dir / SAE_DIR, layer=1, teacher=first)
    save_model(build_tiny_model("llama", len(tok), hidden_size=32, num_layers=2, num_heads=4, seed=1), export, tok)
    again = teacher_identity(export, 1)
    assert again["fingerprint"] != first["fingerprint"]
    assert {k: v for k, v in again.items() if k != "fingerprint"} == {k: v for k, v in first.items()
                                                                      if k != "fingerprint"}
    with pytest.raises(ConfigError, match="trained on another teacher"):
        label(cfg)
    assert not (cfg.run_dir / "labels").exists()


def test_students_check_the_sae_recorded_in_the_label_cache(run):
    cfg = tiny_cfg(run)
    sae = load_sae(cfg.run_dir / SAE_DIR)
    with torch.no_grad():
        sae.W_enc.add_(0.01)  # another SAE of the same shape (e.g. retrained elsewhere)
    save_sae(sae, cfg.run_dir / SAE_DIR)
    with pytest.raises(ValueError, match=r"does not match: sae\.sha256"):
        train(cfg)
    assert not (cfg.run_dir / "students" / NAME).exists()


def _info() -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_the_teacher_and_its_tokenizer_are_keyed_by_the_corpus_content(tmp_path):
    from conceptlm.cocomix.identity import documents_fingerprint

    sec = TeacherSection(hidden_size=16, num_heads=2, num_layers=1, vocab_size=300, steps=2, batch_size=4,
                         warmup_steps=0, layer=0)
    a, b = CorpusSection(n_documents=40, window=16, seed=1), CorpusSection(n_documents=40, window=16, seed=2)
    out = tmp_path / "teacher"
    train_tiny_teacher(a, sec, out, _info(), progress=False)
    tok_a = (out / "tokenizer" / "tokenizer.json").read_bytes()
    with pytest.raises(StaleArtifactError, match=r"^teacher: input documents changed \(\w+ -> \w+\); rerun with "
                                                 r"pipeline\.on_change=rebuild$"):
        train_tiny_teacher(b, sec, out, _info(), progress=False)
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == tok_a  # nothing rewritten
    export = train_tiny_teacher(b, sec, out, _info(), progress=False, on_change="rebuild")
    train_b, _ = split_documents(load_documents(b), b.val_fraction, b.seed)
    assert read_manifest(out / "tokenizer")["inputs"]["train_documents"] == documents_fingerprint(train_b)
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() != tok_a
    assert read_manifest(out)["export"] == export.relative_to(out).as_posix()


# ------------------------------------------------------------------------------------------------ 4. checksums
def test_zeroed_label_rows_are_a_one_line_error_naming_the_file(run):
    cfg = tiny_cfg(run)
    path = cfg.run_dir / "labels" / "train" / "labels.npy"
    before = path.read_bytes()
    arr = np.load(path, mmap_mode="r+")
    arr[:3] = 0
    arr.flush()
    del arr
    assert path.read_bytes() != before and path.stat().st_size == len(before)
    with pytest.raises(DataError, match=r"labels/train/labels\.npy: checksum mismatch"):
        train(cfg)
    with pytest.raises(DataError, match=r"labels/train/labels\.npy: checksum mismatch.*on_change=rebuild"):
        label(cfg)


# ------------------------------------------------------------------------------------------------ 5. arms, locks
def test_the_cocomix_arm_does_not_silently_become_add_or_pause(tmp_path):
    base = tiny_cfg(tmp_path)
    for mix in ("add", "pause"):
        with pytest.raises(ConfigError, match=r"student\.mix"):
            make_arm("cocomix", dataclasses.replace(base.student, mix=mix), base.cocomix, seq_len=24)
    add, _ = make_arm("add", base.student, base.cocomix, seq_len=24)
    assert add.mix == "add"
    with pytest.raises(ConfigError, match=r"student\.mix"):
        pipeline(tiny_cfg(tmp_path, "student.mix=add"))
    assert not (tmp_path / NAME).exists()  # refused before the teacher was trained


def test_label_takes_the_run_folder_lock(run):
    cfg = tiny_cfg(run)
    with RunLock(cfg.run_dir):
        with pytest.raises(RunLockedError, match="in use"):
            label(cfg)
    assert label(cfg)["computed_tokens"] == 0  # free again: the complete caches are reused


def test_an_unfinished_artifact_is_recorded_but_never_consumed(tmp_path):
    from conceptlm.core.artifact import Identity, begin, decide, fingerprint_of, is_complete, require, write_manifest

    identity = Identity("cocomix.labels", settings={"k_attr": 4})
    begin(tmp_path, identity)
    assert not is_complete(read_manifest(tmp_path)) and read_manifest(tmp_path)["files"] == {}
    assert decide(tmp_path, identity) == "reuse"  # the same identity: the stage may continue it
    with pytest.raises(StaleArtifactError, match="did not finish"):
        require(tmp_path, kind="cocomix.labels")
    with pytest.raises(StaleArtifactError, match="did not finish"):
        fingerprint_of(tmp_path)
    (tmp_path / "labels.npy").write_bytes(b"\x01\x02")
    write_manifest(tmp_path, identity)
    assert is_complete(require(tmp_path, kind="cocomix.labels"))
    assert fingerprint_of(tmp_path) == identity.fingerprint
