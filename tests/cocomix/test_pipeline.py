"""The CoCoMix pipeline: one config, every stage resumable and skipped when done, a report whose numbers come from
the students' own metrics."""

from __future__ import annotations

import json

import pytest
import yaml

from conceptlm.cocomix.config import CocomixConfig
from conceptlm.cocomix.pipeline import pipeline, report
from conceptlm.cocomix.report import build_report, reach_point
from conceptlm.cocomix.sae_train import sae_run_config
from conceptlm.core.config import load_config
from conceptlm.core.errors import ConfigError
from conceptlm.core.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = "configs/cocomix/tiny_cpu.yaml"
TINY = [
    "corpus.n_documents=120", "corpus.window=24", "teacher.hidden_size=32", "teacher.num_layers=2",
    "teacher.steps=8", "teacher.warmup_steps=1", "teacher.vocab_size=300",
    "sae.n_latents=32", "sae.k=4", "sae.steps=4", "sae.batch_size=8",
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

    # the run folder's config.yaml is the pipeline's; the SAE stage is a run of its own in sae/, like teacher/
    top = yaml.safe_load((run / "config.yaml").read_text())
    assert {"pipeline", "student", "cocomix", "labels", "sae"} <= set(top) and top["run"]["name"] == cfg.run.name
    assert top["pipeline"]["arms"] == ["ntp", "cocomix"] and top["train"]["max_steps"] == cfg.train.max_steps
    stage = yaml.safe_load((run / "sae" / "config.yaml").read_text())
    assert {"corpus", "teacher", "sae"} <= set(stage) and not {"pipeline", "student", "cocomix"} & set(stage)
    assert stage["run"]["name"] == "sae" and stage["train"]["max_steps"] == cfg.sae.steps
    assert (run / "sae" / "metrics.jsonl").is_file() and (run / "sae" / "checkpoints").is_dir()
    assert (run / "sae" / "artifact.json").is_file() and (run / "teacher" / "config.yaml").is_file()
    assert not any((run / n).exists() for n in ("checkpoints", "metrics.jsonl", "tb"))

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


def _fake_student(root, name, curve):
    d = root / "students" / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("student:\n  vocab_size: 300\n")
    rows = [{"step": i + 1, "split": "eval", "ntp": y, "tokens_seen": x} for i, (x, y) in enumerate(curve)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_numbers_by_hand_mean_sd_per_seed_and_reach_point(tmp_path):
    cfg = tiny_cfg(tmp_path, "pipeline.arms=[ntp,add]", "pipeline.seeds=[0,1]")
    root = cfg.run_dir
    _fake_student(root, "ntp-s0", [(100.0, 3.0), (200.0, 2.0)])
    _fake_student(root, "ntp-s1", [(100.0, 3.2), (200.0, 2.2)])
    _fake_student(root, "add-s0", [(100.0, 2.5), (200.0, 1.9)])
    _fake_student(root, "add-s1", [(100.0, 2.7), (200.0, 2.1)])
    summary = build_report(cfg)
    ntp, add = summary["arms"]["ntp"], summary["arms"]["add"]
    assert ntp["final_val_loss"] == pytest.approx(2.1) and ntp["final_val_loss_sd"] == pytest.approx(0.2 / 2 ** 0.5)
    assert add["final_val_loss_per_seed"] == [1.9, 2.1]
    # add's mean curve (100, 2.6) -> (200, 2.0) crosses NTP's final 2.1 at 100 + 100 * 0.5 / 0.6
    assert add["tokens_to_baseline"] == pytest.approx(100 + 100 * 0.5 / 0.6)
    assert add["tokens_fraction_of_baseline"] == pytest.approx((100 + 100 * 0.5 / 0.6) / 200)
    ratio = add["train_flops_per_token"] / ntp["train_flops_per_token"]
    assert add["flops_fraction_of_baseline"] == pytest.approx(add["tokens_fraction_of_baseline"] * ratio)
    assert "curve" not in add  # the curves are in report.json, not in what the CLI prints
    curve = json.loads((root / "report" / "report.json").read_text())["arms"]["add"]["curve"]
    assert curve == [[100.0, pytest.approx(2.6)], [200.0, pytest.approx(2.0)]]
    md = (root / "report" / "report.md").read_text()
    assert "| 2.0000 ± 0.1414 | 91.7% |" in md and "| 1.9000, 2.1000 |" in md

    one = build_report(tiny_cfg(tmp_path, "pipeline.arms=[ntp,add]", "pipeline.seeds=[0]"))
    assert one["arms"]["ntp"]["final_val_loss_sd"] is None  # a sample sd of one seed is undefined, not 0
    row = next(line for line in (root / "report" / "report.md").read_text().splitlines() if line.startswith("| ntp"))
    assert "±" not in row and "| 2.0000 | 100.0% |" in row
