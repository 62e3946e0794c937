"""Curves read from metrics.jsonl: points against steps, items seen or compute, and a PNG per call."""

from __future__ import annotations

import json

import pytest

from conceptlm.core.errors import ConceptLMError
from conceptlm.plots.curves import curve_points, plot_curves

ROWS = [
    {"step": 1, "split": "train", "loss": 3.0, "tokens_seen": 100.0},
    {"step": 2, "split": "train", "loss": 2.5, "tokens_seen": 200.0},
    {"step": 2, "split": "eval", "loss": 2.7, "tokens_seen": 200.0},
    {"step": 3, "split": "train", "loss": 2.0},  # a row without the x column is skipped, not plotted at 0
]


def test_curve_points_against_steps_items_and_compute():
    assert curve_points(ROWS, "loss", split="train") == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert curve_points(ROWS, "loss", split="train", x="tokens_seen") == [(100.0, 3.0), (200.0, 2.5)]
    assert curve_points(ROWS, "loss", split="eval", x="tokens_seen", scale=6.0) == [(1200.0, 2.7)]
    assert curve_points(ROWS, "missing", split="train") == []


def test_plot_writes_a_png_and_names_a_missing_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = plot_curves({"a": run}, tmp_path / "c.png", keys=("loss",), x="tokens_seen", x_scale={"a": 2.0})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConceptLMError, match="no metrics file"):
        plot_curves({"b": tmp_path / "nope"}, tmp_path / "d.png")
