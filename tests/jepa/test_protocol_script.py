"""The statistics of ``benchmarks/jepa_smollm2_protocol.py``: per-record outcomes restricted to test records not used
before (``--from-record``). Its exact McNemar test is :func:`conceptlm.eval.stats.mcnemar_exact` (tests/eval)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def protocol():
    return load_benchmark("jepa_smollm2_protocol")


def test_correct_lists_from_record(protocol, tmp_path):
    rows = [{"index": i, "prediction": p, "reference": r, "correct": c}
            for i, p, r, c in [(2, "a+", "a+", True), (0, "x", "y", False), (3, "(a)", "a", True), (1, "b", "b", True)]]
    path = tmp_path / "predictions_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sem, exact = protocol.correct_lists(path)
    assert sem == [False, True, True, True] and exact == [False, True, True, False]  # index order
    assert protocol.correct_lists(path, from_record=2) == ([True, True], [True, False])
    assert protocol.correct_lists(tmp_path / "absent.jsonl") == ([], [])
