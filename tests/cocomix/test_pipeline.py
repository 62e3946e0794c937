"""The CoCoMix pipeline: one config, every stage resumable and skipped when done, a report whose numbers come from
the students' own metrics."""

from __future__ import annotations

import json

import pytest

from conceptlm.cocomix.config import CocomixConfig
from conceptlm.cocomix.pipeline import build_report, pipeline, reach_point, report
from conceptlm.cocomix.sae_train import sae_run_config
from conceptlm.core.config import load_config
from conceptlm.core.errors import ConfigError
from conceptlm.core.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = "configs/cocomix/tiny_cpu.yaml"
TINY = [
    "corpus.n_documents=120", "corpus.window=24", "teacher.hidden_size=32", "teacher.num_layers=2",
    "teacher.steps=8", "teacher.warmup_steps=1", "teacher.vocab_size=300", "sae.n_latents=32", "sae.k=4", "sae.steps=4", "sae.batch_size=8",
    "student.d_model=32", "student.n_layers=2", "student.max_len=24", "student.n_concepts=32", "student.concept_k=4",
    "train.max_steps=4", "train.eval_every=2", "train.micro_batch_size=8", "schedule.warmup_steps=1",
    "train.progress=false", "labels.progress=false",
]


def tiny_cfg(tmp_path, *extra: str) -> CocomixConfig:
    return load_config(CocomixConfig, CONFIG, [f"run.out_dir={tmp_path}", *TINY, *extra])


def test_reach_point_interpolates_between_evaluations():
    curve = [(100.0, 3.0), (200.0, 2.0), (300.0, 1.5)]
    assert reach_point(curve, 3.0) == 100.0
    assert reach_point(curve, 2.5) == pytest.approx(150.0)
    assert reach_point(curve, 1.75) == pytest.approx(250.0)
    assert reach_point(curve, 1.0) is None


def test_config_cross_checks_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="student.n_concepts.*must equal sae.n_latents"):
        tiny_cfg(tmp_path, "student.n_concepts=64")
    with pytest.raises(ConfigError, match="cocomix.k_attr"):
        tiny_cfg(tmp_path, "cocomix.k_attr=2")
    with pytest.raises(ConfigError, match="pipeline.arms.*unknown arm"):
        tiny_cfg(tmp_path, "pipeline.arms=[ntp,bogus]")


def test_the_sae_stage_has_its_own_length_and_step_size(tmp_path):
    cfg = tiny_cfg(tmp_path, "sae.lr=0.5")
    s = sae_run_config(cfg)
    assert (s.train.max_steps, s.train.micro_batch_size, s.optim.lr) == (4, 8, 0.5)
    assert (cfg.train.max_steps, cfg.optim.lr) == (4, 1e-3)  # the students' are untouched
    unset = sae_run_config(tiny_cfg(tmp_path, "sae.steps=null", "sae.batch_size=null", "sae.lr=null"))
    assert (unset.train.max_steps, unset.train.micro_batch_size, unset.optim.lr) == (4, 8, 1e-3)


def test_pipeline_end_to_end_then_every_stage_is_skipped(tmp_path):
    cfg = tiny_cfg(tmp_path, "pipeline.arms=[ntp,cocomix]")
    first = pipeline(cfg)
    run = cfg.run_dir
    assert (run / "sae" / "sae.json").is_file() and (run / "labels" / "train").is_dir()
    assert first["sae"]["skipped"] is False and first["labels"]["windows"] > 0
    assert {k: v["skipped"] for k, v in first["students"].items()} == {"ntp-s0": False, "cocomix-s0": False}

    # the report's numbers are the students' own eval rows
    arms = json.loads((run / "report" / "report.json").read_text())["arms"]
    for arm in ("ntp", "cocomix"):
        rows = [r for r in read_metrics(run / "students" / f"{arm}-s0" / "metrics.jsonl") if r["split"] == "eval"]
        assert arms[arm]["final_val_loss"] == pytest.approx(rows[-1]["ntp"])
        assert arms[arm]["tokens"] == rows[-1]["tokens_seen"] == 4 * 8 * 24
    assert arms["ntp"]["tokens_fraction_of_baseline"] == pytest.approx(1.0)
    assert arms["cocomix"]["train_flops_per_token"] > arms["ntp"]["train_flops_per_token"]
    assert "| cocomix | 1 |" in (run / "report" / "report.md").read_text()
    assert (run / "report" / "val_loss_vs_flops.png").stat().st_size > 0

    again = pipeline(cfg)
    assert again["sae"]["skipped"] is True
    assert all(v["skipped"] for v in again["students"].values())
    assert again["labels"]["windows"] == first["labels"]["windows"]
    assert build_report(cfg)["arms"]["ntp"]["final_val_loss"] == arms["ntp"]["final_val_loss"]


def test_report_without_students_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no student .* has evaluation metrics yet"):
        report(tiny_cfg(tmp_path))
