"""The statistics of ``benchmarks/jepa_smollm2_protocol.py``: the exact McNemar test by hand, and per-record
outcomes restricted to test records not used before (``--from-record``)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def protocol():
    return load_benchmark("jepa_smollm2_protocol")


def test_mcnemar_exact_by_hand(protocol):
    a = [True, False, False, False, False, True, True]
    b = [False, True, True, True, True, True, False]
    # discordant: only a = 2 (records 0, 6), only b = 4 -> p = 2 * (C(6,0) + C(6,1) + C(6,2)) / 2**6 = 44/64
    assert protocol.mcnemar_exact(a, b) == {"only_a": 2, "only_b": 4, "p": pytest.approx(44 / 64)}
    assert protocol.mcnemar_exact([True, False], [True, False]) == {"only_a": 0, "only_b": 0, "p": 1.0}
    assert protocol.mcnemar_exact([True] * 5 + [False] * 3, [False] * 8)["p"] == pytest.approx(2 / 32)


def test_correct_lists_from_record(protocol, tmp_path):
    rows = [{"index": i, "prediction": p, "reference": r, "correct": c}
            for i, p, r, c in [(2, "a+", "a+", True), (0, "x", "y", False), (3, "(a)", "a", True), (1, "b", "b", True)]]
    path = tmp_path / "predictions_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sem, exact = protocol.correct_lists(path)
    assert sem == [False, True, True, True] and exact == [False, True, True, False]  # index order
    assert protocol.correct_lists(path, from_record=2) == ([True, True], [True, False])
    assert protocol.correct_lists(tmp_path / "absent.jsonl") == ([], [])
